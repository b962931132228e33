"""Fine-tuning from weights: init_from= with our run directories and checkpoints, official-format files, another
class count (a new classifier) and another resolution; the bad inputs, one line each."""

import argparse
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch

import mambavision_train  # noqa: F401  (registers the models with timm)
from mambavision_train.models import CheckpointError
from mambavision_train.models.pretrained import init_from
from runs import final_state, run

QUIET = ["progress=false", "logger.mode=disabled"]


@pytest.fixture(scope="module")
def source_run(env, tmp_path_factory):
    """The demo model after a few steps on the 10 digits: a run directory with exported EMA weights."""
    d = tmp_path_factory.mktemp("source")
    run("train.py", "experiment=demo", "max_steps=6", *QUIET, f"run_dir={d}", env=env)
    return d


@pytest.fixture(scope="module")
def parity_tree(env, source_run):
    """Another data set from real images: the digits' pictures sorted into two classes (even, odd)."""
    images = Path(env["MAMBAVISION_CACHE"]) / "digits" / "images"
    root = source_run.parent / "parity"
    for split in ("train", "val"):
        for digit in range(10):
            dst = root / split / ("even" if digit % 2 == 0 else "odd")
            dst.mkdir(parents=True, exist_ok=True)
            for f in (images / split / str(digit)).glob("*.png"):
                shutil.copy(f, dst / f"{digit}_{f.name}")
    return root


def test_every_tensor_but_a_new_classifier_comes_from_the_source(source_run):
    source = torch.load(source_run / "checkpoints" / "ema_last.pth", weights_only=True)
    model = timm.create_model("mambavision_demo", num_classes=2)
    fresh_head = model.head.weight.detach().clone()
    assert init_from(model, source_run) == f"initialised from {source_run} (EMA weights, new classifier)"
    got = model.state_dict()
    for k, v in source.items():
        if not k.startswith("head."):
            assert torch.equal(got[k], v), k  # BatchNorm statistics included
    assert got["head.weight"].shape == (2, source["head.weight"].shape[1])
    assert torch.equal(got["head.weight"], fresh_head)
    same = timm.create_model("mambavision_demo", num_classes=10)
    init_from(same, source_run / "checkpoints" / "last.pth.tar", init_head="keep")  # ours: its EMA weights
    assert all(torch.equal(same.state_dict()[k], v) for k, v in source.items())


def test_bad_initialisations_are_one_line(source_run, tmp_path):
    with pytest.raises(CheckpointError, match=r"init_head=keep, but .* has 10 classes and this run has 2"):
        init_from(timm.create_model("mambavision_demo", num_classes=2), source_run, init_head="keep")
    other = tmp_path / "t.pth"
    torch.save(timm.create_model("mambavision_t").state_dict(), other)
    with pytest.raises(CheckpointError, match=r"does not fit MambaVision: missing .*unexpected .*wrong shape"):
        init_from(timm.create_model("mambavision_demo"), other)


@pytest.mark.slow
def test_fine_tune_on_another_dataset_class_count_and_resolution(env, source_run, parity_tree, tmp_path):
    """train.py init_from=<run dir> on the two-class data at 48 px: loads, trains, and the EMA-free base model's val
    top-1 improves over its first evaluation; a checkpoint in its own run_dir would take precedence."""
    args = ["experiment=demo", "data.kind=folder", "data.prepare=null", f"data.root={parity_tree}",
            "data.folder_root=null", "data.num_classes=2", "model.img_size=48", "epochs=2", "batch_size=32",
            "micro_batch_size=32", "log_every=10", f"init_from={source_run}", "ema.enabled=false", *QUIET,
            f"run_dir={tmp_path / 'ft'}"]
    res = run("train.py", *args, env=env)
    assert f"initialised from {source_run} (EMA weights, new classifier)" in res.stdout
    top1 = [float(x) for x in re.findall(r"^val epoch \d+ val/loss \S+ val/top1 (\S+)", res.stdout, re.M)]
    assert len(top1) == 2 and top1[1] > top1[0], res.stdout[-2000:]
    assert final_state(tmp_path / "ft")["model"]["head.weight"].shape[0] == 2


@pytest.mark.slow
def test_an_official_checkpoint_fine_tunes_through_the_same_path(env, parity_tree, tmp_path):
    torch.manual_seed(5)
    plain, ema = (timm.create_model("mambavision_demo").state_dict() for _ in range(2))
    path = tmp_path / "mambavision_demo_official.pth.tar"
    torch.save({"epoch": 3, "arch": "mambavision_demo", "state_dict": plain, "state_dict_ema": ema,
                "args": argparse.Namespace(lr=0.005)}, path)
    res = run("train.py", "experiment=demo", "data.kind=folder", "data.prepare=null", f"data.root={parity_tree}",
              "data.folder_root=null", "data.num_classes=2", "max_steps=1", "batch_size=32", "micro_batch_size=32",
              f"init_from={path}", *QUIET, f"run_dir={tmp_path / 'ft'}", env=env)
    assert f"initialised from {path} (plain weights, new classifier)" in res.stdout  # official: state_dict
    missing = run("train.py", "experiment=demo", "init_from=/no/such/run", *QUIET, f"run_dir={tmp_path / 'x'}",
                  env=env, check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("error: init_from=/no/such/run does not exist")
    assert not (tmp_path / "x").exists()
