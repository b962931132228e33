"""FFCV is an optional extra: where it is not installed the package imports, the demo trains on the image folders,
and asking for FFCV files (or converting to them) stops at once with one line that names the extra. The export extra
(onnx, onnxscript, onnxruntime) is hidden alongside: the package, its entry points and training do without it too.
The demo runs in the README's cluster install (a fresh venv, pip only, no root, every dependency but torch installed
from the package index as pyproject.toml declares it)."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.runs import ROOT, final_state, run

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


def torch_closure() -> list:
    """The distributions of torch and torchvision and everything they require, as installed in this venv."""
    from importlib.metadata import PackageNotFoundError, distribution
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    seen, todo = {}, [("torch", ()), ("torchvision", ())]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # a requirement for another platform
            continue
        if key in seen and set(extras) <= seen[key][1]:
            continue
        seen[key] = (dist, set(extras) | (seen[key][1] if key in seen else set()))
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((req.name, tuple(req.extras)))
    return [d for d, _ in seen.values()]


def link_distributions(dists, into: Path):
    """``into`` holds a symlink to each distribution's metadata folder and top-level files: on a path, they are
    installed there (pip sees them as such), without copying gigabytes."""
    into.mkdir()
    for dist in dists:
        meta = Path(dist._path)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops | {meta.name}:
            src = meta.parent / top
            if src.exists() and not (into / top).exists():
                (into / top).symlink_to(src)


@pytest.fixture(scope="module")
def pip_only(no_extras, hide_extras, tmp_path_factory):
    """(python, env) of the README's install without root: a fresh venv, torch and torchvision as `pip install torch
    torchvision` leaves them (here: this venv's, linked in, not copied), then `pip install -e .`, which installs
    every other dependency from the package index as pyproject.toml declares it: a dependency missing from it, or a
    floor that admits a release that does not work, fails here. The optional extras are hidden; the tests' own PYTHONPATH (a source
    checkout) is left out, so the package can only come from the install."""
    d = tmp_path_factory.mktemp("pip_only")
    venv = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True, timeout=60).stdout.strip()
    link_distributions(torch_closure(), d / "torch")
    Path(purelib, "torch_from_the_project_venv.pth").write_text(f"{d / 'torch'}\n")
    # A copy of the sources: the build writes its egg-info and build folder next to them, not into the checkout.
    src = d / "mambavision-train"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = {**no_extras, "PYTHONPATH": str(hide_extras)}
    res = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", str(src)],
                         env=env, capture_output=True, text=True, timeout=900)
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
    for name in ("timm", "hydra", "omegaconf", "wandb", "sklearn", "matplotlib"):  # pip installed the rest
        where = subprocess.run([python, "-c", f"import {name}; print({name}.__file__)"], env=env, capture_output=True,
                               text=True, timeout=120).stdout.strip()
        assert where.startswith(venv), (name, where)
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
