"""ImageNet from the official archives. A tiny ILSVRC2012 is built here in the archives' real formats (the devkit's
MATLAB meta.mat and validation ground truth, a train tar of per-class tars, a flat validation tar of real JPEGs) and
prepared by ``mambavision_train.data.imagenet_prep`` and by ``slurm/prepare_imagenet.sbatch``, up to FFCV files.

The archives are not the official ones, so their MD5s are not torchvision's: the tests put theirs in torchvision's
table (monkeypatch here, a sitecustomize for the sbatch script's processes)."""

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets import imagenet as tv_imagenet

from mambavision_train.data import DataConfig, DataError, check
from mambavision_train.data import imagenet_prep as prep
from helpers.runs import ROOT

# The devkit's leaf synsets are the classes, numbered by ILSVRC2012_ID, and that numbering is not the sorted wnid
# order that ImageFolder's labels follow (in the real devkit ID 1 is n02119789, kit fox). Internal synsets (IDs past
# 1000, num_children > 0) are in the same struct array and are not classes.
CLASSES = {1: ("n02119789", "kit fox, Vulpes macrotis"), 2: ("n01440764", "tench, Tinca tinca"),
           3: ("n01443537", "goldfish, Carassius auratus")}
INTERNAL = {1001: ("n00001740", "entity", [1002, 2, 3]), 1002: ("n02118333", "fox", [1])}
TRAIN_IMAGES = {"n02119789": 3, "n01440764": 2, "n01443537": 4}
VAL_TRUTH = [3, 1, 1, 2, 3, 2, 1, 3]  # ILSVRC2012_ID of ILSVRC2012_val_00000001.JPEG, ..._00000002.JPEG, ...
FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images")


def jpeg(seed: int) -> bytes:
    """A real, distinct JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def tar_of(path: Path, files: dict, mode="w"):
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def meta_mat() -> bytes:
    """data/meta.mat as in the devkit: a (N, 1) MATLAB struct array 'synsets', torchvision reads fields 0-2 and 4."""
    import scipy.io
    rows = [(i, wnid, words, f"gloss of {words}", 0, np.zeros((1, 0)), 0, TRAIN_IMAGES[wnid])
            for i, (wnid, words) in CLASSES.items()]
    rows += [(i, wnid, words, "", len(children), np.array([children], np.uint16), 2, 0)
             for i, (wnid, words, children) in INTERNAL.items()]
    synsets = np.empty((len(rows), 1), dtype=[(f, "O") for f in FIELDS])
    for r, row in enumerate(rows):
        for f, v in zip(FIELDS, row):
            synsets[r, 0][f] = np.uint16(v) if isinstance(v, int) else v
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """{"dir": the three archives, "train": {wnid: {name: bytes}}, "val": [(name, wnid, bytes)], "md5": {part: md5}}."""
    d = tmp_path_factory.mktemp("archives")
    names = prep.archive_names()
    tar_of(d / names["devkit"], {
        "ILSVRC2012_devkit_t12/data/meta.mat": meta_mat(),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
            "".join(f"{i}\n" for i in VAL_TRUTH).encode(),
        "ILSVRC2012_devkit_t12/COPYING": b"devkit"}, mode="w:gz")
    train = {wnid: {f"{wnid}_{k}.JPEG": jpeg(100 * c + k) for k in range(n)}
             for c, (wnid, n) in enumerate(TRAIN_IMAGES.items())}
    inner = {}
    for wnid, files in train.items():
        tar_of(d / f"{wnid}.tar", files)
        inner[f"{wnid}.tar"] = (d / f"{wnid}.tar").read_bytes()
        (d / f"{wnid}.tar").unlink()
    tar_of(d / names["train"], inner)
    val = [(f"ILSVRC2012_val_{i:08d}.JPEG", CLASSES[gt][0], jpeg(1000 + i)) for i, gt in enumerate(VAL_TRUTH, 1)]
    tar_of(d / names["val"], {name: data for name, _, data in reversed(val)})  # tar order is not file order
    md5 = {part: hashlib.md5((d / name).read_bytes()).hexdigest() for part, name in names.items()}
    return {"dir": d, "train": train, "val": val, "md5": md5}


@pytest.fixture
def as_official(archives, monkeypatch):
    """torchvision takes the fake archives for the official ones."""
    for part, md5 in archives["md5"].items():
        monkeypatch.setitem(tv_imagenet.ARCHIVE_META, part, (tv_imagenet.ARCHIVE_META[part][0], md5))


def assert_prepared(out: Path, archives, splits=("train", "val")):
    wnids = sorted(wnid for wnid, _ in CLASSES.values())
    assert sorted(p.name for p in out.iterdir()) == sorted([*splits, "meta.bin"])  # no .partial left behind
    if "train" in splits:
        for wnid, files in archives["train"].items():
            assert {p.name: p.read_bytes() for p in (out / "train" / wnid).iterdir()} == files
        assert sorted(p.name for p in (out / "train").iterdir()) == wnids
    if "val" in splits:
        assert sorted(p.name for p in (out / "val").iterdir()) == wnids
        # Image i lands in the class its ground-truth line names, and so gets that class's label in the loaders.
        folder = ImageFolder(str(out / "val"))
        assert folder.classes == wnids
        got = {Path(path).name: label for path, label in folder.samples}
        assert got == {name: wnids.index(wnid) for name, wnid, _ in archives["val"]}
        for name, wnid, data in archives["val"]:
            assert (out / "val" / wnid / name).read_bytes() == data


def test_archives_become_the_class_folders_the_loaders_read(archives, as_official, tmp_path, capsys):
    out = tmp_path / "imagenet"
    prep.main(["--archives", str(archives["dir"]), "--out", str(out)])
    assert_prepared(out, archives)
    table = capsys.readouterr().out
    assert "| train | 3 | 9 |" in table and "| val | 3 | 8 |" in table, table
    for split in ("train", "val"):
        check(DataConfig(kind="folder", root=str(out), num_classes=3), split)  # what train.py / eval.py check first
    # torchvision's own ImageNet dataset opens the result, class names from the devkit included.
    net = tv_imagenet.ImageNet(str(out), split="val")
    assert net.classes[net.wnid_to_idx["n02119789"]] == ("kit fox", "Vulpes macrotis") and len(net) == 8

    # A second run finds everything done and touches nothing.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    prep.main(["--archives", str(archives["dir"]), "--out", str(out)])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    assert f"train: {out / 'train'} exists, skipped" in capsys.readouterr().err


def test_an_interrupted_split_is_redone_and_val_alone_needs_no_train_archive(archives, as_official, tmp_path):
    src = tmp_path / "downloads"  # devkit and val only, as for evaluation
    src.mkdir()
    for part in ("devkit", "val"):
        os.symlink(archives["dir"] / prep.archive_names()[part], src / prep.archive_names()[part])
    out = tmp_path / "imagenet"
    (out / "val.partial" / "n01440764").mkdir(parents=True)  # what a killed run leaves
    (out / "val.partial" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"half")
    prep.main(["--archives", str(src), "--out", str(out), "--splits", "val"])
    assert_prepared(out, archives, splits=("val",))


@pytest.mark.parametrize("case", ["missing", "two missing", "no space"])
def test_missing_archives_or_space_are_one_line_before_anything_is_written(archives, tmp_path, monkeypatch, capsys,
                                                                          case):
    src, names = tmp_path / "downloads", prep.archive_names()
    src.mkdir()
    gone = {"missing": ["train"], "two missing": ["devkit", "val"], "no space": []}[case]
    for part, name in names.items():
        if part not in gone:
            os.symlink(archives["dir"] / name, src / name)
    if case == "no space":
        monkeypatch.setattr(prep.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, free=1000))
    out = tmp_path / "imagenet"
    with pytest.raises(SystemExit) as stop:
        prep.main(["--archives", str(src), "--out", str(out)])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    if case == "no space":
        need = sum((src / names[p]).stat().st_size for p in ("train", "val")) / 1024
        want = f"error: {out} has 1000 B free; extracting train, val needs about {need:.1f} KiB"
    else:
        paths = ", ".join(str(src / names[p]) for p in gone)
        want = f"error: {paths} not found: download them from https://image-net.org"
    assert len(lines) == 1 and lines[0].startswith(want), lines
    assert not out.exists()


def test_an_archive_that_fails_its_md5_is_one_line(archives, tmp_path, capsys):
    """Without the tests' MD5s the devkit is the first archive torchvision checks, and it is refused."""
    with pytest.raises(SystemExit) as stop:
        prep.main(["--archives", str(archives["dir"]), "--out", str(tmp_path / "imagenet")])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    devkit = archives["dir"] / prep.archive_names()["devkit"]
    assert lines == [f"error: {devkit} is not the official archive (its MD5 differs): an incomplete or damaged "
                     "download? download them from https://image-net.org (account required; docs/data.md)"], lines
    assert list((tmp_path / "imagenet").iterdir()) == []


def test_a_folder_root_without_the_split_names_this_command(tmp_path):
    with pytest.raises(DataError, match=r"val not found: data.root must hold val/<class>/<image> folders; extract "
                                        r"ImageNet's archives with `python -m mambavision_train.data.imagenet_prep"):
        check(DataConfig(kind="folder", root=str(tmp_path)), "val")


def test_progress_counts_class_archives_then_the_folders_made_from_them(tmp_path):
    count = prep._count_train(tmp_path)
    for wnid in ("n01", "n02", "n03"):
        (tmp_path / f"{wnid}.tar").write_bytes(b"")
    assert count() == ("train: class archives unpacked (then each is extracted)", 3)
    (tmp_path / "n01").mkdir()  # torchvision is extracting n01.tar
    assert count() == ("train: class archives extracted", 0)
    (tmp_path / "n01.tar").unlink()
    assert count() == ("train: class archives extracted", 1)


# Loaded at start-up by the sbatch script's Python processes: torchvision takes the fake archives for the official ones.
OFFICIAL_MD5 = """
from torchvision.datasets import imagenet
for part, md5 in {md5!r}.items():
    imagenet.ARCHIVE_META[part] = (imagenet.ARCHIVE_META[part][0], md5)
"""


@pytest.mark.slow
def test_the_sbatch_script_extracts_and_converts_with_the_allocations_cpus(archives, env, tmp_path):
    pytest.importorskip("ffcv")
    from test_data import read_beton
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OFFICIAL_MD5.format(md5=archives["md5"]))
    run_env = {**env, "PYTHON": sys.executable, "SLURM_CPUS_PER_TASK": "2", "MV_ROOT": str(ROOT),
               "PYTHONPATH": os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH")) if p)}
    imagenet, ffcv = tmp_path / "imagenet", tmp_path / "ffcv"
    cmd = ["bash", str(ROOT / "slurm" / "prepare_imagenet.sbatch"), str(archives["dir"]), str(imagenet), str(ffcv)]
    res = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert_prepared(imagenet, archives)
    wnids = sorted(wnid for wnid, _ in CLASSES.values())
    val_labels = sorted(wnids.index(wnid) for _, wnid, _ in archives["val"])
    assert sorted(label for label, _, _ in read_beton(ffcv / "val.beton")) == val_labels
    assert len(read_beton(ffcv / "train.beton")) == sum(TRAIN_IMAGES.values())
    assert "2 CPUs" in res.stdout
    # The same command again (a rerun after a failure): both steps find their work done.
    again = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to convert" in again.stdout, again.stderr[-3000:]
