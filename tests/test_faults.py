"""When things go wrong: a NaN on one rank, a checkpoint that does not load, a full disk, a resume into another run.
Faults are injected from the test side (tests/helpers/faults/sitecustomize.py), never by the package."""

import math
import shutil
import subprocess
import sys

import pytest
import torch

from helpers.runs import ONE_STEP, ROOT, SHORT, faults, final_state, run, torchrun



def one_line_error(res, starts: str):
    assert res.returncode != 0, res.stdout[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines and lines[0].startswith(starts), res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return lines[0]


def finite_weights(state) -> bool:
    return all(torch.isfinite(v).all() for part in ("model", "ema") for v in state[part].values()
               if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("kind,policy,fault", [("ddp", "skip", "1:3"), ("ddp", "stop", "1:3:grad"),
                                               ("fsdp", "skip", "1:3:grad"), ("fsdp", "stop", "1:3")])
def test_a_nan_on_one_rank_is_decided_by_all_ranks(env, tmp_path, kind, policy, fault):
    """Rank 1 alone sees a NaN loss (or a finite loss with an inf gradient) at step 3 of 4: with skip both ranks skip
    it and end finite; with stop both stop with one line naming the last checkpoint, which is finite."""
    args = [*ONE_STEP, f"dist={kind}", "batch_size=32", "micro_batch_size=16", "max_steps=4",
            "checkpoint.every_n_steps=2", f"nan_policy={policy}", f"run_dir={tmp_path}"]
    res = run("train.py", *args, env=faults({**env, "OMP_NUM_THREADS": "1"}, NAN=fault), prefix=torchrun(2),
              check=policy == "skip")
    state = final_state(tmp_path)
    assert finite_weights(state)
    if policy == "skip":
        assert state["state"]["global_step"] == 4 and state["state"]["skipped_steps"] == 1
        assert "step skipped on every rank (1 so far)" in res.stdout
    else:
        assert state["state"]["global_step"] == 2
        errors = [line for line in res.stderr.splitlines() if line.startswith("error: non-finite")]
        assert len(errors) == 2, res.stderr[-3000:]  # both ranks, at the same step
        assert all("at epoch 0, step 2 (global step 3)" in e and "Last good checkpoint: " in e for e in errors)
        assert ("loss [nan]" in errors[0] + errors[1]) == (fault == "1:3")


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "deleted", "non_finite"])
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(env, tmp_path, five_steps, damage):
    d = copy_run(five_steps, tmp_path / "run")
    last = d / "checkpoints" / "last.pth.tar"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "deleted":
        last.unlink()
    else:
        state = torch.load(last, weights_only=True)
        next(v for v in state["model"].values() if v.is_floating_point()).fill_(math.nan)
        torch.save(state, last)
    res = run("train.py", *SHORT, "max_steps=7", f"run_dir={d}", env=env)
    assert "resumed from" in res.stdout and "global step 4" in res.stdout, res.stdout[-2000:]
    if damage != "deleted":
        assert "warning: skipped last.pth.tar (" in res.stdout
    assert final_state(d)["state"]["global_step"] == 7 and finite_weights(final_state(d))


@pytest.mark.slow
def test_a_checkpoint_folder_where_nothing_loads_stops_with_one_line(env, tmp_path, five_steps):
    d = copy_run(five_steps, tmp_path / "run")
    for p in (d / "checkpoints").glob("*.pth.tar"):
        p.write_bytes(b"not a checkpoint")
    res = run("train.py", *SHORT, "max_steps=7", f"run_dir={d}", env=env, check=False)
    one_line_error(res, "error: no checkpoint in ")
    (d / "checkpoints" / "notes.txt").write_text("x")
    for p in (d / "checkpoints").glob("*.pth*"):
        p.unlink()
    one_line_error(run("train.py", *SHORT, f"run_dir={d}", env=env, check=False), "error: ")


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint(env, tmp_path, five_steps):
    """The next save cannot be written (file size limit, as on a full disk): one line, no temporary file left, and
    the same command without the limit resumes from the checkpoint before it."""
    d = copy_run(five_steps, tmp_path / "run")
    before = (d / "checkpoints" / "last.pth.tar").read_bytes()
    cmd = " ".join([sys.executable, str(ROOT / "train.py"), *SHORT, "max_steps=7", f"run_dir={d}"])
    res = subprocess.run(["bash", "-c", f"ulimit -f 20000; exec {cmd}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    line = one_line_error(res, "error: could not write a checkpoint in ")
    assert "File too large" in line and "the previous one is intact" in line
    assert (d / "checkpoints" / "last.pth.tar").read_bytes() == before
    assert not list((d / "checkpoints").glob(".*tmp*"))
    run("train.py", *SHORT, "max_steps=7", f"run_dir={d}", env=env)
    assert final_state(d)["state"]["global_step"] == 7


@pytest.mark.slow
def test_resume_refuses_another_run_unless_allowed_and_then_applies_the_change(env, tmp_path, five_steps):
    d = copy_run(five_steps, tmp_path / "run")
    line = one_line_error(run("train.py", *SHORT, "max_steps=7", "optim.lr=0.006", f"run_dir={d}", env=env,
                              check=False), "error: ")
    assert "is another run: optim.lr 0.003 -> 0.006" in line and "resume_allow_changes=true" in line
    line = one_line_error(run("train.py", *SHORT, "max_steps=7", "model=mambavision_t", f"run_dir={d}", env=env,
                              check=False), "error: ")
    assert "model.name mambavision_demo -> mambavision_t" in line
    # Allowed: the new learning rate really applies from the restored step on, as in a run that had it throughout.
    res = run("train.py", *SHORT, "max_steps=7", "optim.lr=0.006", "resume_allow_changes=true", f"run_dir={d}",
              env=env)
    assert "warning: resuming" in res.stdout and "optim.lr 0.003 -> 0.006" in res.stdout
    fresh = tmp_path / "fresh"
    run("train.py", *SHORT, "max_steps=7", "optim.lr=0.006", f"run_dir={fresh}", env=env)
    got, want = final_state(d)["optimizer"]["param_groups"], final_state(fresh)["optimizer"]["param_groups"]
    assert [(g["lr"], g["weight_decay"]) for g in got] == [(g["lr"], g["weight_decay"]) for g in want]
    assert final_state(d)["scheduler"]["base_values"] == final_state(fresh)["scheduler"]["base_values"]


@pytest.mark.slow
def test_amp_may_change_on_resume_in_both_directions(env, tmp_path, five_steps):
    """amp is a resumable change (a run moved to a GPU without bf16): an fp32 run goes on in fp16 with a fresh
    GradScaler, then back in fp32 (the scaler's state is dropped). A disabled scaler saves an empty state, which an
    enabled one would refuse to load."""
    d = copy_run(five_steps, tmp_path / "run")
    res = run("train.py", *SHORT, "max_steps=6", "amp=fp16", f"run_dir={d}", env=env)
    assert "amp=fp16 from here on: the GradScaler starts at scale 65536" in res.stdout
    state = final_state(d)
    assert state["state"]["global_step"] == 6 and 0 < state["scaler"]["scale"] <= 65536 and finite_weights(state)
    run("train.py", *SHORT, "max_steps=7", "amp=fp32", f"run_dir={d}", env=env)
    state = final_state(d)
    assert state["state"]["global_step"] == 7 and state["scaler"] == {} and finite_weights(state)


@pytest.mark.slow
def test_resume_on_another_world_size_is_refused_or_announced(env, tmp_path, five_steps):
    d = copy_run(five_steps, tmp_path / "run")
    env1 = {**env, "OMP_NUM_THREADS": "1"}
    res = run("train.py", *SHORT, "max_steps=7", "micro_batch_size=16", f"run_dir={d}", env=env1,
              prefix=torchrun(2), check=False)
    assert res.returncode != 0 and "error: " in res.stderr and "world size 1 -> 2" in res.stderr, res.stderr[-2000:]
    res = run("train.py", *SHORT, "max_steps=7", "micro_batch_size=16", "resume_allow_changes=true", f"run_dir={d}",
              env=env1, prefix=torchrun(2))
    assert "world size 1 -> 2" in res.stdout and "not bit-exact" in res.stdout
    assert final_state(d)["state"]["global_step"] == 7 and final_state(d)["world_size"] == 2


@pytest.mark.parametrize("links", [True, False])
def test_best_is_a_second_name_of_last_that_outlives_the_next_save(tmp_path, monkeypatch, links):
    """best is a hard link to the last it was (a copy where os.link fails); the next save puts a new file under last
    and previous, and best keeps its bytes."""
    from mambavision_train import files
    if not links:
        monkeypatch.setattr(files.os, "link", lambda *a: (_ for _ in ()).throw(OSError(95, "Operation not supported")))
    last, prev, best = (tmp_path / n for n in ("last.pth.tar", "previous.pth.tar", "best.pth.tar"))
    files.save_torch({"step": torch.tensor(1)}, last, previous=prev)
    files.duplicate(last, best)
    assert (best.stat().st_ino == last.stat().st_ino) == links and last.stat().st_nlink == (2 if links else 1)
    files.save_torch({"step": torch.tensor(2)}, last, previous=prev)
    assert [int(torch.load(p, weights_only=True)["step"]) for p in (last, prev, best)] == [2, 1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth.tar", "last.pth.tar", "previous.pth.tar"]


def test_an_experiment_with_another_model_gets_its_own_run_dir(monkeypatch):
    from hydra import compose, initialize_config_dir
    monkeypatch.delenv("MAMBAVISION_RUNS", raising=False)  # the default root, runs/
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        b = compose("train", overrides=["experiment=paper_mambavision_b"])
        t = compose("train", overrides=["experiment=paper_mambavision_b", "model=mambavision_t"])
    assert b.run_dir == "runs/paper_mambavision_b" and t.run_dir == "runs/paper_mambavision_t"
