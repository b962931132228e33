"""train.py and eval.py end to end on the bundled digits: configs, errors, the demo, exact resume after SIGKILL,
W&B offline continuity, and eval of an official-format checkpoint."""

import argparse
import json
import os
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers.runs import ONE_STEP, ROOT, assert_same, assert_same_run, faults, final_state, run, run_in_process
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_on_meta(experiment):
    import timm
    import mambavision_train  # noqa: F401
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    with torch.device("meta"):
        model = timm.create_model(cfg.model.name, drop_path_rate=cfg.model.drop_path_rate or 0.0)
    assert sum(p.numel() for p in model.parameters()) > 1e6
    if experiment.startswith("paper_"):
        size = experiment.rsplit("_", 1)[1]
        want = {"t": (0.05, 20, 0.5, 0.25), "t2": (0.05, 20, 0.75, 0.25), "s": (0.05, 20, 1.0, 0.25),
                "b": (0.075, 35, 1.0, 0.3), "l": (0.12, 20, 6.0, 0.25), "l2": (0.12, 20, 6.0, 0.25)}[size]
        assert (cfg.optim.weight_decay, cfg.sched.warmup_epochs, cfg.mesa.weight, cfg.mesa.start_ratio) == want
        assert (cfg.optim.name, cfg.optim.lr, cfg.batch_size, cfg.epochs + cfg.sched.cooldown_epochs) == ("lamb", 0.005, 4096, 320)
        assert (cfg.ema.decay, cfg.clip_grad, cfg.seed, cfg.aug.rand_augment) == (0.9998, 5.0, 31, "rand-m9-mstd0.5-inc1")


def test_eval_config_composes():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=["model=mambavision_s", "data=imagenet_folder"])
    assert cfg.model.name == "mambavision_s" and cfg.data.kind == "folder"


BAD_REQUESTS = [  # (script, overrides, what the one line on stderr starts with)
    ("train.py", ["experiment=paper_mambavsion_b"], "error: experiment=paper_mambavsion_b does not exist; choose one of: demo, finetune, finetune_mambavision_l2_512"),
    ("train.py", ["model=mambavision_xl"], "error: model=mambavision_xl does not exist; choose one of: mambavision_b"),
    ("train.py", ["model.name=mambavision_xl"], "error: model.name='mambavision_xl' is not one of: mambavision_b"),
    ("train.py", ["dist=fsdpp"], "error: dist=fsdpp does not exist; choose one of: ddp, fsdp, none"),
    ("train.py", ["optim.lrr=1"], "error: optim.lrr: no such key; OptimConfig has name, lr, weight_decay, betas, eps"),
    ("train.py", ["+foo=1"], "error: foo: no such key"),
    ("train.py", ["epochs=abc"], "error: epochs: Value 'abc' of type 'str' could not be converted to Integer"),
    ("train.py", ["aug.mixup=abc"], "error: aug.mixup: Value 'abc' of type 'str' could not be converted to Float"),
    ("train.py", ["amp=bf17"], "error: amp: Invalid value 'bf17', expected one of [auto, bf16, fp16, fp32]"),
    ("train.py", ["nan_policy=ignore"], "error: nan_policy: Invalid value 'ignore', expected one of [stop, skip]"),
    ("train.py", ["dist.kind=zero"], "error: dist.kind: Invalid value 'zero', expected one of [none, ddp, fsdp]"),
    ("train.py", ["logger.mode=cloud"], "error: logger.mode: Invalid value 'cloud'"),
    ("train.py", ["experiment=demo", "micro_batch_size=0"], "error: micro_batch_size=0 is out of range: it must be in [1, inf]"),
    ("train.py", ["experiment=demo", "epochs=0"], "error: epochs=0 is out of range"),
    ("train.py", ["experiment=demo", "optim.name=adamww"], "error: optim.name='adamww' is not a timm optimizer (timm.optim.list_optimizers()); closest: adamw"),
    ("train.py", ["experiment=demo", "device=gpu"], "error: device='gpu' is not one of: auto, cpu, cuda, cuda:N"),
    ("train.py", ["experiment=demo", "device=cuda:3"], "error: device=cuda:3: this machine has"),
    ("train.py", ["experiment=demo", "batch_size=100"], "error: batch_size=100 is not a multiple of micro_batch_size (64)"),
    ("train.py", ["experiment=demo", "ema.decay=1.5"], "error: ema.decay=1.5 is out of range: it must be in [0, 1]"),
    ("train.py", ["experiment=demo", "optim.lr=-1"], "error: optim.lr=-1.0 is out of range: it must be in (0, inf]"),
    ("train.py", ["experiment=demo", "aug.reprob=2"], "error: aug.reprob=2.0 is out of range"),
    ("train.py", ["experiment=demo", "model.drop_path_rate=1.5"], "error: model.drop_path_rate=1.5 is out of range"),
    ("train.py", ["experiment=demo", "checkpoint.keep_last_n=0"], "error: checkpoint.keep_last_n=0 is out of range"),
    ("train.py", ["experiment=demo", "data.kind=lmdb"], "error: data.kind='lmdb' is not one of: ffcv, folder, synthetic"),
    ("train.py", ["experiment=demo", "sched.warmup_epochs=20"], "error: sched.warmup_epochs=20.0 is longer than epochs=8"),
    ("train.py", ["experiment=demo", "aug=paper", "batch_size=63", "micro_batch_size=63"], "error: micro_batch_size=63: Mixup/CutMix pairs images"),
    ("train.py", ["experiment=demo", "optim.lr=???"], "error: optim.lr must be set (e.g. optim.lr=...)"),
    ("train.py", ["data.root=/nope"], "error: data.root=/nope does not exist; prepare ImageNet with"),
    ("train.py", [], "error: data.root is not set"),
    ("train.py", ["experiment=demo", "data.kind=folder", "batch_size=4096"], "error: one optimizer step needs 4096 "
                                                                           "images per epoch but this rank has"),
    ("eval.py", ["pretrain=22k"], "error: pretrain: Invalid value '22k', expected one of [auto, 1k, 21k]"),
    ("eval.py", ["weights=best"], "error: weights: Invalid value 'best'"),
    ("eval.py", ["batch_size=0"], "error: batch_size=0 is out of range"),
    ("eval.py", ["model=mambavision_q"], "error: model=mambavision_q does not exist"),
    ("eval.py", ["checkpoint=best.pth.tar"], "error: checkpoint: renamed; use source= with the same value"),
    ("eval.py", ["source=/nope/best.pth.tar"], "error: source=/nope/best.pth.tar does not exist (a file, one of our run"),
]


# Each path a refusal can take, run as a user would (a fresh interpreter: nothing printed while importing either);
# the rest run in this process (runs.run_in_process), which checks the same exit code and output for a fraction of
# the CPU. A composition error (Hydra), a type (OmegaConf), a range (validate_train), the data check, and eval.py.
IN_SUBPROCESS = {"experiment=paper_mambavsion_b", "epochs=abc", "experiment=demo micro_batch_size=0", "no data",
                 "batch_size=0"}
BAD_IDS = [" ".join(o) or "no data" for _, o, _ in BAD_REQUESTS]


@pytest.mark.parametrize("i", range(len(BAD_REQUESTS)), ids=BAD_IDS)
def test_bad_requests_fail_at_once_with_one_line(env, tmp_path, i):
    """Exit code 2, one line on stderr that names the key and what is valid, nothing built or written."""
    script, overrides, message = BAD_REQUESTS[i]
    run_dir = tmp_path / "run"
    extra = [f"run_dir={run_dir}"] if script == "train.py" else []
    request_env = {**env, "IMAGENET_FFCV": "", "IMAGENET_ROOT": ""}
    if BAD_IDS[i] in IN_SUBPROCESS:
        res = run(script, *overrides, *extra, env=request_env, check=False, timeout=300)
    else:
        res = run_in_process(script, *overrides, *extra, env=request_env)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr  # one line
    assert res.stderr.startswith(message), res.stderr
    assert not run_dir.exists() and not res.stdout.strip(), res.stdout[-2000:]


def test_the_subprocess_cases_are_in_the_table():
    assert IN_SUBPROCESS <= set(BAD_IDS)


@pytest.mark.slow
def test_demo_reaches_90_percent(env, tmp_path):
    """The demo, shortened to 4 of its 8 epochs (documented bound: >= 90% base top-1 after 4 epochs)."""
    res = run("train.py", "experiment=demo", f"run_dir={tmp_path}", "epochs=4", "progress=false", env=env,
              fresh=True)  # W&B offline
    rows = dict(re.findall(r"^\| (.+?)\s+\| (.+?) \|$", res.stdout, re.M))
    assert float(rows["val top-1, base weights"]) >= 90.0, res.stdout
    ckpts = tmp_path / "checkpoints"
    assert {"last.pth.tar", "best.pth.tar", "ema_last.pth", "ema_best.pth"} <= {p.name for p in ckpts.iterdir()}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val_ema/top1" in r for r in records) and any("train/img_per_s" in r for r in records)


SMALL = ["experiment=demo", "batch_size=32", "micro_batch_size=32", "max_steps=7", "checkpoint.every_n_steps=2",
         "progress=false", "log_every=1", "logger.mode=disabled", "aug=paper", "aug.hflip=0.0"]


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(env, tmp_path):
    """7 optimizer steps in one go == 4 steps, SIGKILL right after the mid-epoch checkpoint, the same command again;
    with the paper augmentation, 2 micro-batches per step and MESA (each with state a resume must restore). Plain
    runs resume exactly in tests/test_slurm.py (requeue and preemption), 2 ranks in tests/test_rank_failures.py
    (a rank killed, torchrun's restart) and tests/test_slurm.py (a killed task requeued)."""
    extra = ["micro_batch_size=16", "mesa.weight=1.0", "mesa.start_ratio=0.0"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run("train.py", *SMALL, *extra, f"run_dir={whole}", env=env)
    killed = run("train.py", *SMALL, *extra, f"run_dir={broken}", env=faults(env, KILL_AT_STEP=4), check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert final_state(broken)["state"]["global_step"] == 4
    resumed = run("train.py", *SMALL, *extra, f"run_dir={broken}", env=env)
    assert "resumed from" in resumed.stdout and "step 4/" in resumed.stdout
    a, b = final_state(whole), final_state(broken)
    assert a["state"]["global_step"] == b["state"]["global_step"] == 7
    assert_same_run(a, b)


def read_wandb_log(path):
    """The records of a .wandb transaction log: LevelDB-log framing (7-byte file header ':W&B' + magic + version,
    32 KiB blocks, records of crc32 | length | type, split across blocks as FIRST/MIDDLE/LAST) around protobufs."""
    import struct
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def wandb_history(run_dir):
    """(run id, [steps], {keys}) of every offline W&B run file."""
    from wandb.proto import wandb_internal_pb2
    runs = []
    for f in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        steps, keys = [], set()
        for data in read_wandb_log(f):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "history":
                steps.append(rec.history.step.num)
                keys |= {i.key or "/".join(i.nested_key) for i in rec.history.item}
        runs.append((f.stem.split("-", 1)[1], steps, keys))
    return runs


@pytest.mark.slow
def test_wandb_offline_run_continues_after_resume(env, tmp_path):
    # A run that stops at step 4 (time limit, preemption with a signal), then the same command to step 7. (After a
    # SIGKILL W&B loses what it had not flushed yet; metrics.jsonl keeps every step.)
    args = [*SMALL, f"run_dir={tmp_path}", "logger.mode=offline"]
    run("train.py", *args, "max_steps=4", env=env, fresh=True)
    run("train.py", *args, env=env, fresh=True)
    runs = wandb_history(tmp_path)
    assert len(runs) == 2 and runs[0][0] == runs[1][0]  # one W&B run id, continued
    first, second = runs[0][1], runs[1][1]
    assert first == [1, 2, 3, 4] and second == [5, 6, 7]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/img_per_s", "train/data_wait_frac"} <= runs[1][2]


def test_wandb_online_without_a_route_out_logs_offline_and_says_so(env, tmp_path):
    """A compute node without outbound internet: logger.mode=online finds the server unreachable in seconds (not
    wandb.init's 120 s timeout, at every requeue), says so in one line with the sync command, and logs offline."""
    closed = {**env, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "a" * 40}
    res = run("train.py", *SMALL, f"run_dir={tmp_path}", "logger.mode=online", "max_steps=2", env=closed,
              fresh=True)
    [line] = [ln for ln in res.stdout.splitlines() if "W&B online" in ln]
    assert line.startswith("warning: W&B online logging is not possible here (127.0.0.1:9 unreachable")
    assert f"wandb sync {tmp_path / 'wandb'}/offline-run-*" in line
    [(_, steps, _)] = wandb_history(tmp_path)
    assert steps == [1, 2]


def test_eval_py_on_an_official_format_checkpoint(env, tmp_path):
    import timm
    import mambavision_train  # noqa: F401
    from mambavision_train.data import DataConfig, build_loader
    from mambavision_train.data import digits
    from mambavision_train.engine.evaluate import evaluate
    torch.manual_seed(3)
    model = timm.create_model("mambavision_demo", img_size=32).eval()  # eval.py's model.img_size=32 below
    path = tmp_path / "mambavision_demo.pth.tar"
    torch.save({"epoch": 1, "arch": "mambavision_demo", "state_dict": model.state_dict(), "version": 2,
                "args": argparse.Namespace(model="mambavision_demo", lr=0.005)}, path)
    root = digits.prepare(Path(env["MAMBAVISION_CACHE"]) / "digits")
    loader, aug = build_loader(DataConfig(kind="ffcv", root=str(root), num_classes=10, num_workers=2), None,
                               train=False, batch_size=128, res=32)
    want = evaluate(model, loader, aug)["top1"]
    res = run("eval.py", "model=mambavision_demo", "data=digits", f"source={path}", "model.img_size=32",
              "progress=false", f"table={tmp_path / 'table.md'}", env=env)
    got = float(re.search(r"top1 ([0-9.]+)", res.stdout).group(1))
    assert abs(got - want) < 1e-3, (got, want)
    assert "| mambavision_demo |" in (tmp_path / "table.md").read_text()
    # Run again, as a requeued multi-model evaluation would: the row is there, so it is neither redone nor repeated.
    again = run_in_process("eval.py", "model=mambavision_demo", "data=digits", f"source={path}",
                           "model.img_size=32", "progress=false", f"table={tmp_path / 'table.md'}", env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"already in {tmp_path / 'table.md'} (top1 {got:.2f}), skipped" in again.stdout
    assert (tmp_path / "table.md").read_text().count("| mambavision_demo |") == 1


@pytest.mark.slow
def test_compiled_training_step_equals_eager(env, tmp_path):
    """compile=true trains (torch.compile with inductor on the CPU): one SGD step lands where the eager step does."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    steps = ["max_steps=2", "batch_size=32", "micro_batch_size=32"]
    run("train.py", *ONE_STEP, *steps, f"run_dir={eager}", env=env)
    run("train.py", *ONE_STEP, *steps, "compile=true", f"run_dir={compiled}", env=env, fresh=True)
    a, b = final_state(eager)["model"], final_state(compiled)["model"]
    for k, v in a.items():
        if v.is_floating_point():
            assert torch.allclose(v, b[k], atol=1e-4, rtol=1e-4), (k, (v - b[k]).abs().max())


# Loaded at start-up (on PYTHONPATH): counts the blocks the model runs through torch.utils.checkpoint, so the test
# sees that model.grad_checkpointing reaches the model, not only that the result is unchanged.
COUNT_CHECKPOINTED = """
import atexit, sys
import mambavision_train.models.mambavision as mv
calls, checkpoint = [], mv.checkpoint
mv.checkpoint = lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs)
atexit.register(lambda: print(f"checkpointed block calls: {len(calls)}", file=sys.stderr))
"""


@pytest.mark.slow
def test_grad_checkpointing_trains_and_equals_the_plain_step(env, tmp_path):
    """model.grad_checkpointing=true: every block's forward runs again in the backward, with the same DropPath masks
    and without a second BatchNorm statistics update, so two SGD steps land where the plain ones do, BatchNorm's
    running statistics and batch counts included."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(COUNT_CHECKPOINTED)
    counted = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH")) if p)}
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    steps = ["max_steps=2", "batch_size=32", "micro_batch_size=32", "model.drop_path_rate=0.2"]
    a = run("train.py", *ONE_STEP, *steps, f"run_dir={plain}", env=counted)
    b = run("train.py", *ONE_STEP, *steps, "model.grad_checkpointing=true", f"run_dir={ckpt}", env=counted)
    assert "checkpointed block calls: 0" in a.stderr
    calls = int(re.search(r"checkpointed block calls: (\d+)", b.stderr).group(1))
    assert calls >= 2 * 4, b.stderr[-2000:]  # two steps of at least the four stages' blocks (validation runs none)
    sa, sb = final_state(plain), final_state(ckpt)
    assert sa["state"]["global_step"] == sb["state"]["global_step"] == 2
    for k, v in sa["model"].items():
        if v.is_floating_point():
            assert torch.allclose(v, sb["model"][k], atol=1e-6, rtol=1e-5), (k, (v - sb["model"][k]).abs().max())
        else:
            assert torch.equal(v, sb["model"][k]), (k, v, sb["model"][k])  # num_batches_tracked


@pytest.mark.slow
def test_deterministic_mode_runs_and_changes_nothing_on_the_cpu(env, tmp_path, shared_run):
    """deterministic=true (torch's deterministic algorithms; on CUDA also cuBLAS's workspace and no cuDNN
    autotuning) trains, says so, and on the CPU, deterministic already, gives the same bits as the default."""
    base = shared_run("one_step_batch_32", *ONE_STEP, "batch_size=32", "micro_batch_size=32")
    res = run("train.py", *ONE_STEP, "batch_size=32", "micro_batch_size=32", "deterministic=true",
              f"run_dir={tmp_path}", env=env)
    assert re.search(r"numerics +selective scan auto -> torch; deterministic on", res.stdout), res.stdout[-2000:]
    a, b = final_state(base), final_state(tmp_path)
    for part in ("model", "ema", "optimizer"):
        assert_same(a[part], b[part], part)


def test_a_training_step_waits_for_the_device_once(env, tmp_path, monkeypatch):
    """What would make the host wait for a GPU, counted over optimizer steps of the paper's recipe (augmentation on
    the device, MESA, gradient accumulation): one read-back per step, which carries the finiteness verdict, the stop
    request, the loss and the gradient norm (tests/helpers/syncs.py says what counts)."""
    from mambavision_train.engine.trainer import Trainer
    from helpers.syncs import host_syncs
    monkeypatch.setenv("MAMBAVISION_CACHE", env["MAMBAVISION_CACHE"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "data.kind=folder", "aug=paper", "batch_size=32",
                                          "micro_batch_size=16", "mesa.weight=1.0", "mesa.start_ratio=0.0",
                                          "logger.mode=disabled", "progress=false", f"run_dir={tmp_path}"])
    trainer = Trainer(cfg)
    trainer.train_loader.set_epoch(0)
    batches = iter(trainer.train_loader)
    trainer.train_step(batches)
    with host_syncs() as syncs:
        for _ in range(3):
            trainer.train_step(batches)
    # Not waits on a GPU either: AdamW reads its step counters, which live on the host (torch keeps them there
    # unless capturable), and the norm clipping "moves" each norm to the device it is on.
    ours = syncs.besides("torch/optim/adamw.py", "torch/optim/adam.py", "torch/optim/optimizer.py",
                         "torch/nn/utils/clip_grad.py")
    assert ours.count == 3 and set(ours.ops) == {"Tensor.tolist"}, ours
