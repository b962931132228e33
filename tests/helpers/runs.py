"""Running train.py / eval.py as a user would, and comparing what they leave behind."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

# The demo on the digits through the folder loader, for runs that check what does not depend on the loader: a
# process that imports FFCV first spends ~6 s compiling its numba code (tests/test_data.py and the runs that need
# FFCV use it).
DEMO = ["experiment=demo", "data.kind=folder"]

# SGD: its update is proportional to the gradient (Adam's first step is ~lr * sign(g), which turns rounding noise
# in near-zero gradients into full-size differences); no warmup, so the step is large.
ONE_STEP = [*DEMO, "aug=none", "aug.hflip=0.0", "aug.color_jitter=0.0", "model.drop_path_rate=0.0", "max_steps=1",
            "progress=false", "logger.mode=disabled", "optim.name=sgd", "optim.lr=0.2", "optim.weight_decay=0.0",
            "sched.warmup_epochs=0", "ema.decay=0.5"]

# A short demo run: every checkpoint kept in view (one every 2 steps), nothing on the console but log lines.
SHORT = [*DEMO, "batch_size=32", "micro_batch_size=32", "checkpoint.every_n_steps=2", "progress=false",
         "logger.mode=disabled", "log_every=1"]


def faults(env: dict, **faults) -> dict:
    """``env`` with test-side fault injection (tests/helpers/faults/sitecustomize.py): faults(env, KILL_AT_STEP=4) sets
    MV_FAULT_KILL_AT_STEP=4 and puts the injector on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests" / "helpers" / "faults"), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, **{f"MV_FAULT_{k}": str(v) for k, v in faults.items()}}


def run(script, *overrides, env, check=True, timeout=600, prefix=(), stdout=None, fresh=False):
    """``python script overrides`` (or ``prefix... script overrides``, e.g. torchrun) from the repository root.
    ``stdout``: a file that gets the standard output, as under a batch scheduler (``res.stdout`` is then its text).
    A plain ``python script`` runs in this process (``run_in_process``: ~6 s of CPU less, the imports), unless it
    needs an interpreter of its own: a launcher ``prefix``, an output file, code loaded at start-up (``faults()``'s
    injector or another sitecustomize on PYTHONPATH), or ``fresh=True`` (what only a new process shows: W&B's
    service and console capture, torch.compile's caches). ``timeout`` bounds the subprocess only."""
    if not (prefix or stdout or fresh or env.get("PYTHONPATH") != os.environ.get("PYTHONPATH")):
        res = run_in_process(script, *overrides, env=env)
    else:
        cmd = [*(prefix or [sys.executable]), str(ROOT / script), *overrides]
        if stdout is None:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        else:
            with open(stdout, "w") as f:
                res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.PIPE, text=True,
                                     timeout=timeout)
            res.stdout = Path(stdout).read_text()
    if check and res.returncode != 0:
        raise AssertionError(f"{script} {overrides} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def run_in_process(script, *overrides, env: dict) -> subprocess.CompletedProcess:
    """``run(script, *overrides, env=env, check=False)`` without starting another Python: a new interpreter adds the
    ~6 s of CPU that importing torch and timm takes. The script runs as ``__main__`` with the run's argv, environment
    and working directory; what a run changes in the process is put back afterwards (the signal handlers it installs,
    torch's thread count and deterministic mode, the random generators, the root logger's handlers). The result holds
    what a user would see: the exit code, stdout, and stderr with any warning shown (as under Python's default
    filters), any logging record (as Python's last-resort handler writes it) or traceback. DataLoader workers fork
    from this process. What only a fresh interpreter can show (output while importing) is left to the cases that
    still start one."""
    import contextlib
    import gc
    import io
    import logging
    import random
    import runpy
    import signal
    import traceback
    import warnings

    import numpy as np
    from hydra.core.global_hydra import GlobalHydra
    argv = [str(ROOT / script), *overrides]
    out, err = io.StringIO(), io.StringIO()
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)
    # the thread count too: importing FFCV sets it
    environ, old_argv, cwd, threads = dict(os.environ), sys.argv, os.getcwd(), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in signals}
    rngs = random.getstate(), np.random.get_state(), torch.get_rng_state()
    deterministic, root_handlers = torch.are_deterministic_algorithms_enabled(), logging.root.handlers[:]
    code = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        sys.argv = argv
        os.chdir(ROOT)
        GlobalHydra.instance().clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            last_resort = logging.StreamHandler(err)  # Python's own, for a process that configured no logging
            last_resort.setLevel(logging.WARNING)
            logging.root.handlers = [last_resort]
            warnings.resetwarnings()
            for action, category, module in PYTHON_DEFAULT_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module, append=True)
            try:
                runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as e:  # what the interpreter does with it on the way out
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:  # uncaught: the interpreter would print the traceback and exit with 1
                traceback.print_exc()
                code = 1
        for w in caught:
            err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    finally:
        GlobalHydra.instance().clear()
        os.environ.clear()
        os.environ.update(environ)
        sys.argv = old_argv
        os.chdir(cwd)
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            if h is not None:
                signal.signal(s, h)
        random.setstate(rngs[0])
        np.random.set_state(rngs[1])
        torch.set_rng_state(rngs[2])
        torch.use_deterministic_algorithms(deterministic)
        logging.root.handlers = root_handlers
        gc.collect()  # the run's model, loaders and their worker processes
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


# What Python applies without -W or PYTHONWARNINGS (the warnings module's documentation, "Default Warning Filter").
PYTHON_DEFAULT_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                                  ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                                  ("ignore", ResourceWarning, "")]


def torchrun(nproc: int):
    """torchrun on this machine; --standalone: its rendezvous takes a free port, so runs at the same time (xdist
    workers, another checkout's tests) never meet on one."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


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
