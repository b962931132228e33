"""Recipe fidelity: timm's EMA arithmetic, the official augmentation order, the recipe block and its comparison with
the paper, and the paper row a checkpoint is compared with."""

import random
import re

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir

import mambavision_train  # noqa: F401  (registers the models with timm)
from mambavision_train import recipe
from mambavision_train.data import AugConfig, DeviceAugment
from mambavision_train.engine.ema import EMA
from mambavision_train.models import is_in21k, paper_row
from helpers.runs import ROOT, run

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_ema_is_timms_model_ema_v2_batchnorm_statistics_included():
    """Several SGD steps of a model with BatchNorm (train mode, so running statistics and num_batches_tracked move):
    every state-dict entry of our EMA equals timm.utils.ModelEmaV2's, bit for bit."""
    from timm.utils import ModelEmaV2
    torch.manual_seed(0)
    model = timm.create_model("mambavision_demo", drop_path_rate=0.0)
    ours, theirs = EMA(model, decay=0.9), ModelEmaV2(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(12):
        loss = model(torch.randn(4, 3, 32, 32) * 3 + 1).logsumexp(1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ours.update(model)
        theirs.update(model)
    a, b, now = ours.state_dict(), theirs.module.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    averaged = [k for k in a if "running_" in k and not torch.equal(a[k], now[k])]
    assert averaged, "running statistics must be averaged, not copied"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (k, (a[k].double() - b[k].double()).abs().max())
    assert int(now["patch_embed.conv_down.1.num_batches_tracked"]) == 12


def test_erasing_runs_on_the_mixed_batch():
    """Erasing at probability 1 (constant fill) and Mixup at lambda 0.5: each output is the normalised 50/50 mix of
    the image and its partner with one box of exact zeros. (Erased before mixing, the box would hold half of the
    partner, and the partner's box would show as half of this image.)"""
    torch.manual_seed(0)
    random.seed(0)  # timm's erasing draws its boxes from Python's generator
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(16) % 10
    aug = DeviceAugment(AugConfig(rand_augment=None, color_jitter=0.0, reprob=1.0, remode="const", mixup=0.8,
                                  cutmix=0.0, smoothing=0.0), 10, MEAN, STD, "cpu")
    aug.mixup._params_per_batch = lambda: (0.5, False)
    out, _ = aug(x, y)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1) * 255, torch.tensor(STD).view(1, 3, 1, 1) * 255
    want = ((0.5 * x.float() + 0.5 * x.flip(0).float()) - mean) / std  # never exactly 0: 255 * mean is no half-integer
    for i in range(16):
        erased = (out[i] == 0).all(0)
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        assert erased.sum() >= 0.5 * 0.02 * 32 * 32, i  # timm's smallest box: 2% of the image, sides rounded
        assert erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all(), i  # one rectangle
        assert torch.allclose(out[i][:, ~erased], want[i][:, ~erased], atol=1e-5), i


def compose_train(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
        rows = dict(recipe.describe(cfg, world_size=8, accumulation=4, amp="bf16", device="cuda:0",
                                    paper=recipe.paper_config(cfg)))
    return cfg, rows


def test_recipe_block_says_how_a_run_differs_from_the_paper():
    _, rows = compose_train("model=mambavision_b")
    assert rows["vs paper"].startswith("differs from experiment=paper_mambavision_b: ")
    assert "optim.name adamw (paper lamb)" in rows["vs paper"] and "optim.lr 0.001 (paper 0.005)" in rows["vs paper"]
    assert "mesa.weight 0.0 (paper 1.0)" in rows["vs paper"]
    assert rows["batch"] == "4096 per step = 128 per device x 8 device(s) x 4 accumulation"
    _, rows = compose_train("experiment=paper_mambavision_b")
    assert rows["vs paper"] == "= paper recipe (experiment=paper_mambavision_b)"
    assert rows["optimizer"].startswith("lamb, lr 0.005 (absolute), weight decay 0.075")
    _, rows = compose_train("experiment=paper_mambavision_s", "aug.reprob=0.0", "data=imagenet_folder")
    assert rows["vs paper"] == "differs from experiment=paper_mambavision_s: aug.reprob 0.0 (paper 0.25)"
    _, rows = compose_train("experiment=demo")
    assert rows["vs paper"] == "no paper training recipe for mambavision_demo"


@pytest.mark.parametrize("size,crop", [("t", 1.0), ("t2", 1.0), ("s", 0.875), ("b", 1.0), ("l", 1.0), ("l2", 1.0)])
def test_in_training_validation_uses_the_official_configs_crop(size, crop):
    cfg, rows = compose_train(f"experiment=paper_mambavision_{size}")
    assert cfg.model.crop_pct == crop and cfg.model.drop_path_rate is None  # drop path: the variant's own (ARCHS)
    assert f"validation crop_pct {crop}" in rows["model"]


def test_paper_row_for_1k_and_21k_weights():
    assert paper_row("mambavision_b", is_in21k("mambavision_b", "nvidia/MambaVision-B-1K"))["top1"] == 84.2
    assert paper_row("mambavision_b", is_in21k("mambavision_b", "nvidia/MambaVision-B-21K"))["top1"] == 84.9
    assert paper_row("mambavision_l", is_in21k("mambavision_l", "/ckpt/mambavision_large_21k.pth.tar"))["top1"] == 86.1
    assert paper_row("mambavision_l2_512", is_in21k("mambavision_l2_512", "my_run/ema_best.pth"))["top1"] == 87.3
    assert paper_row("mambavision_l3_256", True)["top1"] == 87.3 and paper_row("mambavision_l3_512", True)["top1"] == 88.1
    assert paper_row("mambavision_t", True) is None  # no 21K row: nothing to compare with, rather than the 1K one
    assert paper_row("mambavision_l2_512", is_in21k("mambavision_l2_512", "x", pretrain="1k")) is None


def test_eval_defaults_to_the_paper_exact_path():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval")
    assert cfg.data.kind == "folder" and cfg.amp == "fp32"


def test_eval_py_compares_a_21k_checkpoint_with_the_21k_row(env, tmp_path):
    torch.manual_seed(0)
    state = {"state_dict": timm.create_model("mambavision_b").state_dict()}
    common = ["model=mambavision_b", "data=synthetic", "data.num_samples=16", "model.img_size=32", "progress=false",
              "batch_size=16"]
    for name, paper in (("mambavision_base_21k.pth.tar", 84.9), ("mambavision_base_1k.pth.tar", 84.2)):
        torch.save(state, tmp_path / name)
        res = run("eval.py", *common, f"source={tmp_path / name}", env=env)
        assert re.search(rf"paper {paper:.2f} difference ", res.stdout), res.stdout
