import fcntl
import os
import shutil
from pathlib import Path

# Without a GPU, the Triton scan's kernels run in Triton's interpreter on CPU tensors. Read when the kernels are
# defined (on import of the module that holds them), so it is set before any test imports it.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mambavision_train.config import register

register()  # the config schemas and model options, for the tests that compose configs themselves

# Threads per test process (and per training run it starts): the cores shared out among pytest-xdist's workers.
# More threads than cores is ruinous here: an op waits for a descheduled OpenMP thread (a 0.4 s test took 40 s).
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _threads():
    """Back to THREADS before each test: building an FFCV loader in this process sets torch's thread count."""
    torch.set_num_threads(THREADS)


def pytest_collection_modifyitems(config, items):
    """Longest first: the Slurm tests (one group, minutes on one worker), the other slow tests, then the rest, each
    in file order. pytest-xdist hands tests out in this order, and a long one started last would leave the other
    worker idle until it ends."""
    items.sort(key=lambda item: (item.get_closest_marker("slurm") is None, item.get_closest_marker("slow") is None))


# Tests that must share one pytest-xdist worker: the Slurm tests, around the one cluster their module starts; the
# report tests, around the runs their module fixture trains (two minutes, which two workers would each spend).
ONE_WORKER = ("tests/test_slurm.py::", "tests/test_report.py::")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With -n (and xdist's default --dist load): tests handed out one at a time in the order above, the ONE_WORKER
    ones together as one unit. (xdist's loadgroup does not group under pytest 9: the node-id suffix it relies on is
    no longer read.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneAtATime(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return next((p for p in ONE_WORKER if nodeid.startswith(p)), nodeid)
    return OneAtATime(config, log)


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder of this test session that every pytest-xdist worker sees (each worker's own temporary folder is a
    child of the session's); without xdist, one in the session's folder."""
    base = tmp_path_factory.getbasetemp()
    d = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """The environment of train.py / eval.py runs: a data cache shared by the session's workers (the digits are
    built once, under digits.prepare's own lock), W&B offline and quiet."""
    cache = shared_dir(tmp_path_factory, "cache")
    return dict(os.environ, MAMBAVISION_CACHE=str(cache), WANDB_MODE="offline", WANDB_SILENT="true",
                OMP_NUM_THREADS=str(THREADS))


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory, env):
    """``shared_run(name, *overrides, nproc=1)``: the run directory of ``train.py *overrides`` (on ``nproc`` gloo
    ranks under torchrun, one thread each), trained once for the whole session (across xdist workers, under a lock)
    and read by every test that names it. A test that changes a run copies it first."""
    from helpers.runs import run, torchrun
    root = shared_dir(tmp_path_factory, "runs")

    def get(name: str, *overrides, nproc: int = 1) -> Path:
        d = root / name
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = root / f"{name}.done"
            if done.is_file() and done.read_text() != repr(overrides):
                raise AssertionError(f"shared run {name} asked for with other overrides: {overrides}")
            if not done.is_file():
                shutil.rmtree(d, ignore_errors=True)  # what a failed attempt left would be resumed from
                if nproc == 1:
                    run("train.py", *overrides, f"run_dir={d}", env=env)
                else:
                    run("train.py", *overrides, f"run_dir={d}", env={**env, "OMP_NUM_THREADS": "1"},
                        prefix=torchrun(nproc))
                done.write_text(repr(overrides))
        return d
    return get


@pytest.fixture(scope="session")
def five_steps(shared_run):
    """A demo run stopped after 5 steps: last.pth.tar at step 5, previous.pth.tar at step 4, EMA weights exported.
    The base of the resume-fault tests (which go on with SHORT + max_steps=7) and the fine-tuning tests' source."""
    from helpers.runs import SHORT
    return shared_run("five_steps", *SHORT, "max_steps=5")


@pytest.fixture(scope="session")
def few_digits(tmp_path_factory, env) -> list[str]:
    """The overrides of a demo on a fifth of the digits: 26 train images per class (epochs of 4 steps at batch 64,
    on 1 or 2 ranks) and 6 validation images per class but one (59: uneven shards on 2 ranks), as image folders and
    .beton files like the full set. For the tests that must cross an epoch's end and its validation, on 2 ranks."""
    root = shared_dir(tmp_path_factory, "few_digits")
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "val.beton").is_file():
            from mambavision_train.data import digits
            full = digits.prepare(Path(env["MAMBAVISION_CACHE"]) / "digits", beton=False) / "images"
            for split, per_class in (("train", 26), ("val", 6)):
                for c in range(10):
                    files = sorted((full / split / str(c)).iterdir())[:per_class - (split == "val" and c == 0)]
                    (root / "images" / split / str(c)).mkdir(parents=True, exist_ok=True)
                    for f in files:
                        shutil.copy(f, root / "images" / split / str(c) / f.name)
            digits.write_betons(root, workers=1)
    return ["experiment=demo", f"data.root={root}", "data.prepare=null"]


# 2 gloo ranks with real randomness in every part a resume must restore: the paper augmentation, drop path, MESA
# from the start; 8 steps over few_digits' epochs of 4, so across a validation.
PAPER_2RANKS = ["aug=paper", "aug.hflip=0.0", "model.drop_path_rate=0.3", "mesa.weight=1.0", "mesa.start_ratio=0.0",
                "batch_size=64", "micro_batch_size=32", "eval_batch_size=30", "max_steps=8",
                "checkpoint.every_n_steps=3", "progress=false", "log_every=1", "logger.mode=disabled"]


@pytest.fixture(scope="session")
def paper_2ranks(shared_run, few_digits):
    """(the overrides, the run directory) of PAPER_2RANKS on few_digits, run uninterrupted once by torchrun: the
    reference that interrupted runs of the same overrides (killed, restarted, requeued) must end equal to."""
    args = [*few_digits, *PAPER_2RANKS]
    return args, shared_run("paper_2ranks", *args, nproc=2)


@pytest.fixture(scope="session")
def official():
    """The official mambavision package (test-only reference), its scan routed to mamba_ssm's reference loop."""
    from mambavision_train.ops.selective_scan.mamba_ssm_compat import reference_selective_scan_fn

    ref = reference_selective_scan_fn()  # also lets `import mamba_ssm` succeed without the CUDA extension
    assert ref is not None, "mamba-ssm must be installed for the reference tests (make test installs it)"
    import mambavision.models.mamba_vision as mv

    mv.selective_scan_fn = ref
    return mv
