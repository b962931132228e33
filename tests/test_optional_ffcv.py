"""FFCV is an optional extra: where it is not installed the package imports, the demo trains on the image folders,
and asking for FFCV files (or converting to them) stops at once with one line that names the extra. The export extra
(onnx, onnxscript, onnxruntime) is hidden alongside: the package, its entry points and training do without it too.
The demo runs in the README's cluster install (a plain venv, pip only, no root), layered on the project's venv so
that torch is not installed again."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from runs import ROOT, final_state, run

# The optional packages hidden: the ffcv extra's, and the export extra's (with onnxscript's onnx_ir).
HIDDEN = ("ffcv", "numba", "onnx", "onnxscript", "onnx_ir", "onnxruntime")

# Loaded by Python at start-up when its folder is on PYTHONPATH: the HIDDEN packages then behave as if not installed,
# `import` raising ModuleNotFoundError and importlib.util.find_spec answering None (torch._dynamo asks it for onnx).
NOT_INSTALLED = '''
import sys

for name in HIDDEN:
    sys.modules[name] = None
'''.replace("HIDDEN", repr(HIDDEN))

ONE_LINE = "needs the ffcv extra: pip install 'mambavision-train[ffcv]' (docs/data.md)"


@pytest.fixture(scope="module")
def hide_extras(tmp_path_factory) -> Path:
    """A folder that makes the HIDDEN packages unimportable in any Python that has it on PYTHONPATH."""
    hook = tmp_path_factory.mktemp("no_extras")
    (hook / "sitecustomize.py").write_text(NOT_INSTALLED)
    return hook


@pytest.fixture(scope="module")
def no_extras(env, hide_extras, tmp_path_factory):
    """``env`` where the HIDDEN packages cannot be imported, with its own empty data cache."""
    path = os.pathsep.join(p for p in (str(hide_extras), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "MAMBAVISION_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def pip_only(no_extras, hide_extras, tmp_path_factory):
    """(python, env) of the README's install without root: a plain venv, this package installed by pip alone. Offline
    and without installing torch again: the venv reaches the project venv's packages (torch, timm, hydra, ...) through
    a path file, in place of the `pip install torch torchvision` step, and pip gets no index (--no-index --no-deps
    --no-build-isolation). The optional extras are hidden; the tests' own PYTHONPATH (a source checkout) is left out,
    so the package can only come from the install."""
    d = tmp_path_factory.mktemp("pip_only")
    venv = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True, timeout=60).stdout.strip()
    # Plain path lines, not site.addsitedir: the project venv's own .pth files, its editable install of this
    # package among them, stay unread.
    Path(purelib, "project_venv.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    # A copy of the sources: the build writes its egg-info and build folder next to them, not into the checkout.
    src = d / "mambavision-train"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = {**no_extras, "PYTHONPATH": str(hide_extras)}
    res = subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                          "--ignore-installed", "--disable-pip-version-check", "-e", str(src)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return python, env


WHERE = """
import importlib.metadata, sys, mambavision_train, torch
for path in (sys.prefix, importlib.metadata.distribution("mambavision-train").locate_file(""),
             mambavision_train.__file__, torch.__file__):
    print(path)
"""


IMPORTS = """
import importlib, sys
for name in HIDDEN:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{name} imports here: the test would prove nothing")
import mambavision_train, mambavision_train.cli, mambavision_train.data.convert
import mambavision_train.engine.trainer, mambavision_train.engine.eval_run, mambavision_train.export.__main__
print(sorted(m for m, module in sys.modules.items() if module is not None and m.partition(".")[0] in HIDDEN))
""".replace("HIDDEN", repr(HIDDEN))


def test_the_package_and_the_entry_points_import_without_the_optional_extras(no_extras):
    res = subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, env=no_extras, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]"


def test_the_readme_pip_only_install_trains_the_demo_on_the_digit_folders_without_the_extras(pip_only, tmp_path):
    python, env = pip_only
    res = subprocess.run([python, "-c", WHERE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    prefix, dist, package, torch_file = res.stdout.splitlines()
    venv = str(Path(python).parents[1])
    assert prefix == venv and dist.startswith(venv), res.stdout  # installed into the new venv, by pip
    assert not package.startswith(str(ROOT)), package  # from the copy pip installed, not this checkout
    assert not torch_file.startswith(venv), torch_file  # torch was not installed again
    run("train.py", "experiment=demo", "data.kind=folder", "max_steps=3", "progress=false", "logger.mode=disabled",
        f"run_dir={tmp_path / 'run'}", env=env, timeout=300, prefix=[python])
    assert final_state(tmp_path / "run")["state"]["global_step"] == 3
    digits = Path(env["MAMBAVISION_CACHE"]) / "digits"
    assert (digits / "images" / ".complete").exists() and not list(digits.glob("*.beton"))  # folders only


@pytest.mark.parametrize("data, instead", [(["experiment=demo", "data.kind=ffcv"], "data.kind=folder"),
                                           (["data=imagenet_ffcv", "data.root=/data/imagenet_ffcv"],
                                            "data=imagenet_folder")], ids=["digits", "imagenet"])
def test_ffcv_data_without_ffcv_is_one_line_before_anything_is_built(no_extras, tmp_path, data, instead):
    env = {**no_extras, "MAMBAVISION_CACHE": str(tmp_path / "cache")}
    res = run("train.py", *data, "max_steps=3", "progress=false", "logger.mode=disabled", f"run_dir={tmp_path / 'run'}",
              env=env, check=False, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: data.kind=ffcv {ONE_LINE}, or use {instead}"], res.stderr[-3000:]
    assert not (tmp_path / "cache").exists()  # the demo stopped before building the digits


def test_the_converter_without_ffcv_is_one_line_before_the_decode_pass(no_extras, tmp_path):
    for split in ("train", "val"):
        (tmp_path / "src" / split / "a").mkdir(parents=True)
    res = subprocess.run([sys.executable, "-m", "mambavision_train.data.convert", str(tmp_path / "src"),
                          str(tmp_path / "out")], cwd=ROOT, env=no_extras, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and res.stdout == "", res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the converter writes FFCV files and {ONE_LINE}"), lines
    assert not (tmp_path / "out").exists()
