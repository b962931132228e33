"""Several processes on gloo: DDP and FSDP2 equal one process at the global batch; FSDP2 trains, writes sharded
checkpoints, resumes exactly after SIGKILL and exports EMA weights the plain model loads. (2 DDP ranks with the
paper augmentation resuming exactly: tests/test_rank_failures.py and tests/test_slurm.py, after one rank is killed.)"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import timm
import torch

import mambavision_train  # noqa: F401  (registers the models with timm)
from helpers.runs import ONE_STEP, faults, assert_same, assert_same_run, final_state, run, torchrun

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process_at_twice_the_batch(env, tmp_path, shared_run, kind):
    """2 ranks x batch 16 with SyncBN == 1 process x batch 32 after one step: the same 32 images (rank r reads every
    2nd sample of the same permutation), crops hashed per sample, gradients averaged, BN statistics over all 32.
    The EMA (decay 0.5, so the step shows) is compared too: under FSDP2 each rank averages its own shard."""
    one, two = shared_run("one_step_batch_32", *ONE_STEP, "batch_size=32", "micro_batch_size=32"), tmp_path / "two"
    run("train.py", *ONE_STEP, f"dist={kind}", "dist.sync_bn=true", "batch_size=32", "micro_batch_size=16",
        f"run_dir={two}", env={**env, "OMP_NUM_THREADS": "1"}, prefix=torchrun(2))
    torch.manual_seed(31)  # the trainer's seed: the initial weights of both runs
    init = timm.create_model("mambavision_demo", drop_path_rate=0.0, num_classes=10).state_dict()
    a, b = final_state(one), final_state(two)
    moved = max((a["model"][k] - init[k]).abs().max().item() for k in init if init[k].is_floating_point())
    assert moved > 1e-2  # the step was not negligible
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            if v.is_floating_point():
                assert torch.allclose(v, b[part][k], atol=1e-5, rtol=0), (part, k, (v - b[part][k]).abs().max())


FSDP = ["dist=fsdp", "batch_size=64", "micro_batch_size=16", "max_steps=6", "progress=false",
        "log_every=1", "logger.mode=disabled", "eval_batch_size=29",
        # the paper's recipe under FSDP2: Lamb (global norms over sharded DTensors), MESA from the start, bf16
        "optim=lamb", "mesa.weight=1.0", "mesa.start_ratio=0.0", "amp=bf16"]


@pytest.mark.slow
def test_fsdp_trains_saves_resumes_exactly_and_exports(env, tmp_path, few_digits):
    """6 steps (2 micro-batches each, gradient sync on the second only) across the end of epoch 0 (4 steps):
    uninterrupted == killed with SIGKILL after its step-4 checkpoint, that newest sharded checkpoint lost under its
    ``last.dcp`` link (a dangling link, as a crash mid-cleanup or a purge of the shared file system leaves), and run
    again: it falls back to ``previous.dcp`` (step 2) and ends bit-equal. The killed run keeps gathered parameters
    from forward to backward (dist.reshard_after_forward=false), the others reshard: that changes memory and traffic,
    never the numbers, so both modes train, save and resume here. Validation runs with uneven shards (59 images,
    batches of 29: rank 0 has 2 batches, rank 1 one), which FSDP must not hang on."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    env1 = {**env, "OMP_NUM_THREADS": "1"}
    args = [*few_digits, *FSDP]
    run("train.py", *args, f"run_dir={whole}", env=env1, prefix=torchrun(2))
    killed = run("train.py", *args, "dist.reshard_after_forward=false", f"run_dir={broken}",
                 "checkpoint.every_n_steps=2", env=faults(env1, KILL_AT_STEP=4), prefix=torchrun(2), check=False)
    assert killed.returncode != 0
    assert final_state(broken)["state"]["global_step"] == 4
    last, previous = broken / "checkpoints" / "last.dcp", (broken / "checkpoints" / "previous.dcp").resolve()
    shutil.rmtree(last.resolve())
    assert last.is_symlink() and not last.exists()
    resumed = run("train.py", *args, f"run_dir={broken}", "checkpoint.every_n_steps=2", env=env1, prefix=torchrun(2))
    assert re.findall(r"^resumed from (.*): epoch 0, step 2/4, global step 2$", resumed.stdout, re.M) == [
        str(broken / "checkpoints" / "dcp" / previous.name)], resumed.stdout[-3000:]
    assert "val epoch 0" in resumed.stdout
    a, b = final_state(whole), final_state(broken)
    assert a["state"]["global_step"] == b["state"]["global_step"] == 6
    assert_same_run(a, b)
    # The exported EMA weights: a state dict (official key names) that loads strictly into the unwrapped model,
    # with the run's class map and variant beside it.
    export = torch.load(whole / "checkpoints" / "ema_last.pth", weights_only=True)
    assert export["classes"] == [str(c) for c in range(10)] and export["model"] == "mambavision_demo"
    exported = export["state_dict"]
    plain = timm.create_model("mambavision_demo", num_classes=10)
    plain.load_state_dict(exported)
    # Rank 0 exports: its own BatchNorm statistics (ranks differ between validations without SyncBN).
    assert_same(exported, {**a["ema"], **a["bn_stats"][0]["ema"]}, "ema export")
    assert (whole / "checkpoints" / "best.dcp").is_dir() and (whole / "checkpoints" / "ema_best.pth").is_file()
    # eval.py names the sharded directory's way out in one line.
    res = run("eval.py", "model=mambavision_demo", "data=digits", "data.kind=folder",
              f"source={whole / 'checkpoints' / 'last.dcp'}", env=env, check=False)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "dcp_to_torch" in res.stderr


@pytest.mark.slow
def test_each_rank_draws_its_own_augmentation_and_drop_path_from_identical_weights(env, tmp_path):
    """2 gloo ranks, the paper augmentation: the same initial weights on both, then (seed + rank, as the official
    code) a Mixup/CutMix lambda and DropPath masks of their own in the same step."""
    import json
    from helpers.runs import ROOT
    out = tmp_path / "draws"
    run(str(ROOT / "tests" / "helpers" / "rank_draws.py"), str(out), "experiment=demo", "aug=paper", "aug.hflip=0.0",
        "model.drop_path_rate=0.5", "batch_size=64", "micro_batch_size=32", "logger.mode=disabled",
        f"run_dir={tmp_path / 'run'}", env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")},
        prefix=torchrun(2))
    r0, r1 = (json.loads(out.with_suffix(f".{r}.json").read_text()) for r in (0, 1))
    assert r0["init"] == r1["init"]
    assert len(r0["lams"]) == len(r1["lams"]) == 1 and r0["lams"] != r1["lams"]
    assert len(r0["masks"]) == len(r1["masks"]) > 0 and r0["masks"] != r1["masks"]
    assert any(any(m) for m in r0["masks"]) and any(any(m) for m in r1["masks"])  # something was dropped


def test_the_launch_is_read_from_the_environment_not_written_to_it(monkeypatch):
    from mambavision_train.distributed import Launch, env_world_size, launch_env, slurm_rendezvous
    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1234",
             "MASTER_ADDR": "10.0.0.7"}
    assert launch_env(slurm) == Launch(rank=3, local_rank=1, world_size=4, by_slurm=True)
    assert slurm_rendezvous(slurm) == "tcp://10.0.0.7:13234"  # the port from the job id: the same on every rank
    assert slurm_rendezvous({**slurm, "MASTER_PORT": "4000"}) == "tcp://10.0.0.7:4000"
    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    assert launch_env({**slurm, **torchrun}) == Launch(1, 1, 2)  # torchrun inside an sbatch job
    assert launch_env({**slurm, "SLURM_NTASKS": "1"}) == Launch()  # one task: a plain process
    assert launch_env({}) == Launch()
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    before = dict(os.environ)
    assert env_world_size() == 4 and dict(os.environ) == before


def test_two_srun_style_processes_form_a_group_from_slurm_variables_alone(env):
    """What srun gives each task (SLURM_PROCID / SLURM_NTASKS, no RANK or WORLD_SIZE): the group forms on gloo and
    the processes' environments are left as they were."""
    import socket
    with socket.socket() as s:  # a free port for rank 0's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import os, torch, torch.distributed as dist\n"
            "from mambavision_train.distributed import init_distributed, cleanup\n"
            "before = dict(os.environ)\n"
            "info = init_distributed('cpu')\n"
            "t = torch.tensor([info.rank + 1.0]); dist.all_reduce(t)\n"
            "print(info.rank, info.world_size, int(t.item()), dict(os.environ) == before)\n"
            "cleanup()\n")
    base = {k: v for k, v in env.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env={
        **base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.split() for out, _ in outs] == [["0", "2", "3", "True"], ["1", "2", "3", "True"]]


@pytest.fixture(scope="module")
def fsdp_checks(tmp_path_factory):
    """What 2 FSDP2 ranks see, from one start of 2 processes (tests/helpers/spawned.py). One image in a val set for the
    check of a rank without a validation batch."""
    from PIL import Image
    from helpers.spawned import fsdp_checks, spawn
    out = tmp_path_factory.mktemp("fsdp_checks")
    (out / "one" / "val" / "3").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(out / "one" / "val" / "3" / "a.png")
    return spawn(fsdp_checks, 2, out, str(out / "one"))


def test_fsdp2_keeps_the_ssm_parameters_in_fp32_inside_the_mixer(fsdp_checks):
    """With bf16 parameters (amp=bf16 under dist=fsdp) the Mamba mixers' units gather fp32, as DDP with autocast
    has them: A_log, D and the dt bias enter the scan unrounded; the rest of the block is gathered in bf16."""
    for rank in fsdp_checks:
        assert rank["mixed_precision"] == {
            "A_log": ["torch.float32"], "D": ["torch.float32"], "dt_bias": ["torch.float32"],
            "in_proj": ["torch.float32"], "block norm": ["torch.bfloat16"], "mlp": ["torch.bfloat16"]}


def test_fsdp2_fp16_skips_a_step_on_every_rank_when_one_shard_overflows(fsdp_checks):
    """amp=fp16 under FSDP2: each rank checks only its gradient shards for infs, and GradScaler's check on DTensors
    reduces the verdict over the ranks (torch >= 2.5), so an overflow in one rank's shard skips the step everywhere
    and every rank lowers its scale: the ranks stay in step."""
    assert [rank["fp16_skip"] for rank in fsdp_checks] == [{"stepped": False, "scale": 32768.0}] * 2


def test_fsdp2_validation_on_a_rank_without_a_batch_joins_the_others(fsdp_checks):
    """One validation image over two sharded ranks: rank 1 has no batch, joins rank 0's forward with a stand-in
    image, and both count the one image."""
    assert [rank["empty_shard"] for rank in fsdp_checks] == [{"batches": 1, "count": 1}, {"batches": 0, "count": 1}]
