"""FFCV is an optional extra: where it is not installed the package imports, the demo trains on the image folders,
and asking for FFCV files (or converting to them) stops at once with one line that names the extra."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs import ROOT, final_state, run

# Loaded by Python at start-up when its folder is on PYTHONPATH: ffcv and numba then import as if not installed.
NOT_INSTALLED = '''
import sys


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("ffcv", "numba"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
'''

ONE_LINE = "needs the ffcv extra: pip install 'mambavision-train[ffcv]' (docs/data.md)"


@pytest.fixture(scope="module")
def no_ffcv(env, tmp_path_factory):
    """``env`` where ffcv and numba cannot be imported, with its own empty data cache."""
    hook = tmp_path_factory.mktemp("no_ffcv")
    (hook / "sitecustomize.py").write_text(NOT_INSTALLED)
    path = os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "MAMBAVISION_CACHE": str(tmp_path_factory.mktemp("cache"))}


IMPORTS = """
import importlib, sys
for name in ("ffcv", "numba"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{name} imports here: the test would prove nothing")
import mambavision_train, mambavision_train.cli, mambavision_train.data.convert
import mambavision_train.engine.trainer, mambavision_train.engine.eval_run
print(sorted(m for m in sys.modules if m.partition(".")[0] in ("ffcv", "numba")))
"""


def test_the_package_and_the_entry_points_import_without_ffcv(no_ffcv):
    res = subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, env=no_ffcv, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]"


def test_the_demo_trains_on_the_digit_folders_without_ffcv(no_ffcv, tmp_path):
    run("train.py", "experiment=demo", "data.kind=folder", "max_steps=3", "progress=false", "logger.mode=disabled",
        f"run_dir={tmp_path / 'run'}", env=no_ffcv, timeout=300)
    assert final_state(tmp_path / "run")["state"]["global_step"] == 3
    digits = Path(no_ffcv["MAMBAVISION_CACHE"]) / "digits"
    assert (digits / "images" / ".complete").exists() and not list(digits.glob("*.beton"))  # folders only


@pytest.mark.parametrize("data, instead", [(["experiment=demo", "data.kind=ffcv"], "data.kind=folder"),
                                           (["data=imagenet_ffcv", "data.root=/data/imagenet_ffcv"],
                                            "data=imagenet_folder")], ids=["digits", "imagenet"])
def test_ffcv_data_without_ffcv_is_one_line_before_anything_is_built(no_ffcv, tmp_path, data, instead):
    env = {**no_ffcv, "MAMBAVISION_CACHE": str(tmp_path / "cache")}
    res = run("train.py", *data, "max_steps=3", "progress=false", "logger.mode=disabled", f"run_dir={tmp_path / 'run'}",
              env=env, check=False, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: data.kind=ffcv {ONE_LINE}, or use {instead}"], res.stderr[-3000:]
    assert not (tmp_path / "cache").exists()  # the demo stopped before building the digits


def test_the_converter_without_ffcv_is_one_line_before_the_decode_pass(no_ffcv, tmp_path):
    for split in ("train", "val"):
        (tmp_path / "src" / split / "a").mkdir(parents=True)
    res = subprocess.run([sys.executable, "-m", "mambavision_train.data.convert", str(tmp_path / "src"),
                          str(tmp_path / "out")], cwd=ROOT, env=no_ffcv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and res.stdout == "", res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the converter writes FFCV files and {ONE_LINE}"), lines
    assert not (tmp_path / "out").exists()
