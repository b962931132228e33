"""Running train.py / eval.py as a user would, and comparing what they leave behind."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# SGD: its update is proportional to the gradient (Adam's first step is ~lr * sign(g), which turns rounding noise
# in near-zero gradients into full-size differences); no warmup, so the step is large.
ONE_STEP = ["experiment=demo", "aug=none", "aug.hflip=0.0", "aug.color_jitter=0.0", "model.drop_path_rate=0.0",
            "max_steps=1", "progress=false", "logger.mode=disabled", "optim.name=sgd", "optim.lr=0.2",
            "optim.weight_decay=0.0", "sched.warmup_epochs=0", "ema.decay=0.5"]


def faults(env: dict, **faults) -> dict:
    """``env`` with test-side fault injection (tests/faults/sitecustomize.py): faults(env, KILL_AT_STEP=4) sets
    MV_FAULT_KILL_AT_STEP=4 and puts the injector on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests" / "faults"), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, **{f"MV_FAULT_{k}": str(v) for k, v in faults.items()}}


def run(script, *overrides, env, check=True, timeout=600, prefix=(), stdout=None):
    """``python script overrides`` (or ``prefix... script overrides``, e.g. torchrun) from the repository root.
    ``stdout``: a file that gets the standard output, as under a batch scheduler (``res.stdout`` is then its text)."""
    cmd = [*(prefix or [sys.executable]), str(ROOT / script), *overrides]
    if stdout is None:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        with open(stdout, "w") as f:
            res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.PIPE, text=True, timeout=timeout)
        res.stdout = Path(stdout).read_text()
    if check and res.returncode != 0:
        raise AssertionError(f"{script} {overrides} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def torchrun(nproc: int, port: int):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]


def final_state(run_dir):
    """The run's last checkpoint as one dict; a sharded one (FSDP2) is first gathered with torch's converter."""
    d = Path(run_dir) / "checkpoints"
    if not (d / "last.dcp").exists():
        return torch.load(d / "last.pth.tar", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    full = d.parent / "last_gathered.pt"
    dcp_to_torch_save(d / "last.dcp", full)
    return {**torch.load(full, weights_only=True), **torch.load(d / "last.dcp" / "meta.pth", weights_only=True)}


def assert_same(a, b, where=""):
    """Everything equal: tensors bit for bit (dtype and shape too), mappings with the same keys, sequences of the
    same length, and numbers, strings, None and the rest by ==."""
    if isinstance(a, dict):  # an OrderedDict state dict equals a plain dict with the same items
        assert isinstance(b, dict), f"{where}: {type(b).__name__} is not a mapping"
    else:
        assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(set(a) ^ set(b))} differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(a: dict, b: dict):
    """Two final checkpoints of the same run, one of them interrupted and resumed: everything but what names the
    run (its directory, inside the config, and the W&B id) is equal."""
    drop = lambda c: {**c, "config": None, "state": {**c["state"], "wandb_id": None}}
    assert_same(drop(a), drop(b), "checkpoint")
