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
from mambavision_train.models import CheckpointError, load_pretrained
from mambavision_train.models.pretrained import init_from
from helpers.runs import final_state, run, run_in_process

QUIET = ["progress=false", "logger.mode=disabled"]


@pytest.fixture
def source_run(five_steps):
    """The demo model after a few steps on the 10 digits: a run directory with exported EMA weights (shared with
    other tests: read only)."""
    return five_steps


@pytest.fixture(scope="module")
def parity_tree(env, tmp_path_factory):
    """Another data set from real images: the digits' pictures sorted into two classes (even, odd)."""
    from mambavision_train.data import digits
    images = digits.prepare(Path(env["MAMBAVISION_CACHE"]) / "digits", beton=False) / "images"
    root = tmp_path_factory.mktemp("parity")
    for split in ("train", "val"):
        for digit in range(10):
            dst = root / split / ("even" if digit % 2 == 0 else "odd")
            dst.mkdir(parents=True, exist_ok=True)
            for f in (images / split / str(digit)).glob("*.png"):
                shutil.copy(f, dst / f"{digit}_{f.name}")
    return root


def test_every_tensor_but_a_new_classifier_comes_from_the_source(source_run):
    source = torch.load(source_run / "checkpoints" / "ema_last.pth", weights_only=True)["state_dict"]
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
              "data.folder_root=null", "data.num_classes=2", "max_steps=2", "batch_size=32", "micro_batch_size=32",
              f"init_from={path}", "model.freeze=stage2", "optim.layer_decay=0.75", *QUIET,
              f"run_dir={tmp_path / 'ft'}", env=env)
    assert f"initialised from {path} (plain weights, new classifier)" in res.stdout  # official: state_dict
    after = final_state(tmp_path / "ft")["model"]
    assert all(torch.equal(after[k], plain[k]) for k in plain if k.startswith(("patch_embed.", "levels.0.", "levels.1."))
               and not k.endswith("num_batches_tracked"))  # frozen
    assert not torch.equal(after["levels.3.blocks.0.mlp.fc1.weight"], plain["levels.3.blocks.0.mlp.fc1.weight"])
    # The same command again (a requeued job): the run's own checkpoint takes precedence over init_from.
    again = run("train.py", "experiment=demo", "data.kind=folder", "data.prepare=null", f"data.root={parity_tree}",
                "data.folder_root=null", "data.num_classes=2", "max_steps=3", "batch_size=32", "micro_batch_size=32",
                f"init_from={path}", "model.freeze=stage2", "optim.layer_decay=0.75", *QUIET,
                f"run_dir={tmp_path / 'ft'}", env=env)
    assert "resumed from" in again.stdout and "global step 2" in again.stdout
    assert final_state(tmp_path / "ft")["state"]["global_step"] == 3
    missing = run_in_process("train.py", "experiment=demo", "init_from=/no/such/run", *QUIET,
                             f"run_dir={tmp_path / 'x'}", env=env)
    assert missing.returncode == 2 and missing.stderr.startswith("error: init_from=/no/such/run does not exist")
    assert not (tmp_path / "x").exists()


def test_layer_decay_goes_through_timms_factory_with_the_models_groups():
    from omegaconf import OmegaConf
    from timm.optim._param_groups import param_groups_layer_decay
    from mambavision_train.optim import build_optimizer
    model = timm.create_model("mambavision_demo")
    cfg = OmegaConf.create(dict(name="adamw", lr=1e-3, weight_decay=0.05, betas=[0.9, 0.999], eps=1e-8,
                                layer_decay=0.75))
    ours = {id(p): g["lr_scale"] for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    want = {id(p): g["lr_scale"] for g in param_groups_layer_decay(model, 0.05, model.no_weight_decay(),
                                                                   layer_decay=0.75) for p in g["params"]}
    assert ours == want and len(ours) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[i]: s for i, s in ours.items()}
    # Forward order: the stem decays most, then each level's blocks and its downsampler; the final norm shares the
    # last block's layer (timm's rule for the 99999 group), the head gets 1.
    assert scale["patch_embed.conv_down.0.weight"] < scale["levels.0.blocks.0.conv1.weight"] \
        < scale["levels.0.downsample.reduction.0.weight"] < scale["levels.1.blocks.0.conv1.weight"] \
        < scale["levels.3.blocks.0.mlp.fc1.weight"] < scale["levels.3.blocks.1.mlp.fc1.weight"] \
        == scale["norm.weight"] < scale["head.weight"] == 1.0


@pytest.mark.parametrize("part,trainable", [("stage2", ("levels.2.", "levels.3.", "norm.", "head.")),
                                            ("stage4", ("head.",))])
def test_freeze_leaves_the_early_parts_untouched(part, trainable):
    """model.freeze=stage2 trains stages 3-4 and the head; stage4 is linear probing. Frozen BatchNorm keeps its
    statistics, and an exported state dict still loads strictly into a plain model."""
    from mambavision_train.optim import freeze
    torch.manual_seed(0)
    model = timm.create_model("mambavision_demo")
    freeze(model, part)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if not k.startswith(trainable):
            assert torch.equal(v, after[k]), k  # weights and BatchNorm statistics alike
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head."))
    plain = timm.create_model("mambavision_demo")
    load_pretrained(plain, after)  # strict: FrozenBatchNorm2d's missing num_batches_tracked is fine


@pytest.mark.parametrize("size", ["l2_512", "l3_256", "l3_512"])
def test_fine_tune_experiments_follow_the_cited_recipe(size):
    from hydra import compose, initialize_config_dir
    from helpers.runs import ROOT
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment=finetune_mambavision_{size}", "init_from=nvidia/x"])
    assert cfg.model.name == f"mambavision_{size}" and cfg.run_name == f"finetune_mambavision_{size}"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.layer_decay) == ("adamw", 5e-5, 1e-8, 0.8)
    assert (cfg.epochs, cfg.batch_size, cfg.sched.warmup_epochs, cfg.sched.cooldown_epochs) == (30, 512, 0, 0)
    assert (cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.rand_augment, cfg.ema.enabled) == (0, 0, "rand-m9-mstd0.5-inc1", False)
