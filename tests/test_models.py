"""The MambaVision family against the official code: parameters, names, init, logits and gradients."""

import argparse
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import mambavision_train  # noqa: F401  (registers the models with timm)
from mambavision_train import PAPER, CheckpointError, count_flops, load_pretrained

SIZES = ["t", "t2", "s", "b", "l", "l2"]
OFFICIAL = {s: f"mamba_vision_{s.upper()}" for s in SIZES}


def ours(name, **kw):
    return timm.create_model(name, **kw)


def meta_model(name, **kw):
    with torch.device("meta"):
        return ours(name, **kw)


@pytest.mark.parametrize("size", SIZES)
def test_parameter_counts_equal_the_official_code(size):
    model = meta_model(f"mambavision_{size}")
    assert sum(p.numel() for p in model.parameters()) == PAPER[f"mambavision_{size}"]["params"]


@pytest.mark.parametrize("name", ["mambavision_l3_256", "mambavision_l3_512"])
def test_l3_parameter_count(name):
    assert abs(sum(p.numel() for p in meta_model(name).parameters()) - 739.57e6) < 0.01e6


def test_variants_carry_their_eval_config():
    expect = {"mambavision_t": (224, 1.0, "center"), "mambavision_t2": (224, 0.98, "center"),
              "mambavision_s": (224, 0.93, "center"), "mambavision_b": (224, 1.0, "center"),
              "mambavision_l": (224, 1.0, "center"), "mambavision_l2": (224, 1.0, "center"),
              "mambavision_l2_512": (512, 0.93, "squash"), "mambavision_l3_256": (256, 1.0, "center"),
              "mambavision_l3_512": (512, 0.93, "squash")}
    for name, (res, crop_pct, mode) in expect.items():
        cfg = meta_model(name).pretrained_cfg
        assert cfg["input_size"] == (3, res, res) and cfg["crop_pct"] == crop_pct and cfg["crop_mode"] == mode, name
        assert cfg["interpolation"] == "bicubic" and cfg["mean"] == (0.485, 0.456, 0.406)
        assert cfg["hf_hub_id"].startswith("nvidia/MambaVision-") and cfg["hf_hub_filename"].endswith(".pth.tar")
    assert meta_model("mambavision_b", pretrained_cfg="in21k_ft_in1k").pretrained_cfg["hf_hub_id"] == "nvidia/MambaVision-B-21K"
    assert {"mambavision_t", "mambavision_l3_512", "mambavision_demo"} <= set(timm.list_models("mambavision_*"))


def test_window_sizes_of_the_high_resolution_variants():
    ws = lambda name: [lvl.window_size for lvl in meta_model(name).levels]
    assert ws("mambavision_l2") == [8, 8, 14, 7]
    assert ws("mambavision_l2_512") == [8, 8, 32, 16]
    assert ws("mambavision_l3_256") == [8, 8, 16, 8]
    assert ws("mambavision_l3_512") == [8, 8, 32, 16]


def test_resolution_sets_the_windows_and_eval_crop_as_the_official_variants_do():
    """img_size reaches the model: the stage-3/4 windows cover the whole feature map (the rule of the official 256
    and 512 px variants), the weights keep their names and shapes, and the eval transform is the official one of
    that architecture at that resolution when there is one."""
    ws = lambda name, **kw: [lvl.window_size for lvl in meta_model(name, **kw).levels]
    assert ws("mambavision_l2", img_size=512) == ws("mambavision_l2_512") == [8, 8, 32, 16]
    assert ws("mambavision_l3_512", img_size=256) == ws("mambavision_l3_256") == [8, 8, 16, 8]
    assert ws("mambavision_l3_256", img_size=512) == ws("mambavision_l3_512")
    assert ws("mambavision_t", img_size=224) == ws("mambavision_t") == [8, 8, 14, 7]
    assert ws("mambavision_t", img_size=200) == [8, 8, 13, 7]  # 200 -> 100 -> 50 -> 25 -> 13 -> 7
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    l2_at_512 = meta_model("mambavision_l2", img_size=512)
    assert shapes(l2_at_512) == shapes(meta_model("mambavision_l2_512")) == shapes(meta_model("mambavision_l2"))
    view = lambda m: (m.pretrained_cfg["input_size"], m.pretrained_cfg["crop_pct"], m.pretrained_cfg["crop_mode"])
    assert view(l2_at_512) == view(meta_model("mambavision_l2_512")) == ((3, 512, 512), 0.93, "squash")
    assert view(meta_model("mambavision_t", img_size=512)) == ((3, 512, 512), 1.0, "center")
    # Weights move between resolutions unchanged (a strict load) and run there with the new windows.
    torch.manual_seed(0)
    small = ours("mambavision_demo", img_size=96).eval()
    big = ours("mambavision_demo", img_size=128).eval()
    big.load_state_dict(small.state_dict())
    x = torch.randn(1, 3, 128, 128)
    assert [lvl.window_size for lvl in big.levels] == [8, 8, 8, 4]
    assert torch.isfinite(big(x)).all() and not torch.equal(small(x), big(x))  # the windows differ, the weights not


@pytest.mark.parametrize("res", [(32, 32), (64, 64), (45, 71)])
def test_demo_model_runs_every_block_type(res):
    model = ours("mambavision_demo").eval()
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"ConvBlock", "MambaVisionMixer", "Attention"} <= kinds
    assert model(torch.randn(2, 3, *res)).shape == (2, 10)


def test_grad_checkpointing_changes_neither_gradients_nor_batchnorm_statistics():
    """The recomputed forward draws the same DropPath masks and leaves BatchNorm's running statistics and batch count
    as the one forward left them (torch.utils.checkpoint alone would update them twice per step)."""
    torch.manual_seed(0)
    plain = timm.create_model("mambavision_demo", img_size=32, drop_path_rate=0.3).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 32, 32)
    for model in (plain, ckpt):
        torch.manual_seed(1)
        F.cross_entropy(model(x), torch.arange(4)).backward()
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-7, rtol=1e-6), name


@pytest.mark.reference
@pytest.mark.parametrize("size", SIZES)
def test_same_seed_same_weights_as_official(official, size):
    """Module tree, names, order, shapes and the random draws of the init all equal the official code."""
    torch.manual_seed(0)
    ref = getattr(official, OFFICIAL[size])().state_dict()
    torch.manual_seed(0)
    mine = ours(f"mambavision_{size}").state_dict()
    assert list(mine) == list(ref)
    assert all(mine[k].shape == ref[k].shape and torch.equal(mine[k], ref[k]) for k in ref)
    # The quirk we keep: the model-wide init overwrote Mamba's dt init.
    assert torch.all(mine["levels.2.blocks.0.mixer.dt_proj.bias"] == 0)


def randomize_(model, seed=0):
    """Give every weight and statistic a value of order one, so that no branch is negligible in the comparison
    (layer scale 1e-5 and zero dt bias would hide mistakes in the mixers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or "dt_proj.bias" in name:
                t.copy_(0.3 * torch.randn(t.shape, generator=g))
            elif "gamma" in name:
                t.copy_(0.5 + 0.5 * torch.rand(t.shape, generator=g))
            elif name.startswith("head.weight"):
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5)
            elif t.dim() == 1 and ("norm" in name or name.endswith(".D")):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif t.dim() == 1:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return model


def official_checkpoint(model):
    """A checkpoint as timm's CheckpointSaver writes it, as the official training script does."""
    sd = model.state_dict()
    return {"epoch": 309, "arch": "mamba_vision_T", "state_dict": sd, "state_dict_ema": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-6, "params": [0, 1]}]},
            "version": 2, "args": argparse.Namespace(model="mamba_vision_T", lr=0.005, mesa=0.5), "metric": 82.2}


def twin_models(official, size, **kw):
    ref = randomize_(getattr(official, OFFICIAL[size])(**kw))
    mine = ours(f"mambavision_{size}", **kw)
    load_pretrained(mine, official_checkpoint(ref))  # strict
    return ref, mine


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_logits_equal_official_at_224(official, size):
    ref, mine = twin_models(official, size)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref.eval()(x), mine.eval()(x)
    assert want.std() > 0.1  # the comparison is not between near-zero numbers
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.reference
@pytest.mark.slow
def test_l2_at_512_px_from_its_224_weights_equals_the_official_l2_512(official):
    """model=mambavision_l2 model.img_size=512 takes L2's 224 px checkpoint strictly and computes what the official
    L2-512 does with those weights (compared on a 128 px input, where both pad the same 32/16 windows)."""
    ref224 = randomize_(official.mamba_vision_L2())
    ckpt = official_checkpoint(ref224)
    ref512 = official.mamba_vision_L2_512_21k()
    ref512.load_state_dict(ckpt["state_dict"])
    mine = load_pretrained(ours("mambavision_l2", img_size=512), ckpt)  # strict
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = ref512.eval()(x), mine.eval()(x)
    assert want.std() > 0.1 and (got - want).abs().max() <= 1e-4


def official_stage_maps(model, x):
    """(logits, stage maps, each level's output shape) of an official classifier in eval mode: the stage maps are
    what its downsamplers receive (forward-pre hooks) and the last stage's output. A level's own output is the
    downsampled map, with twice the channels at half the size: the trap of the official tracker's #104."""
    maps, shapes, hooks = {}, {}, []
    for i, level in enumerate(model.levels):
        if level.downsample is not None:
            hooks.append(level.downsample.register_forward_pre_hook(lambda m, a, i=i: maps.__setitem__(i, a[0])))
        else:
            hooks.append(level.register_forward_hook(lambda m, a, out, i=i: maps.__setitem__(i, out)))
        hooks.append(level.register_forward_hook(lambda m, a, out, i=i: shapes.__setitem__(i, tuple(out.shape[1:]))))
    with torch.no_grad():
        logits = model.eval()(x)
    for h in hooks:
        h.remove()
    return logits, [maps[i] for i in range(len(model.levels))], [shapes[i] for i in range(len(model.levels))]


@pytest.mark.reference
def test_logits_and_stage_maps_equal_official_at_odd_non_square_resolution(official):
    """Logits, and the stage maps of forward_intermediates against the official model's (official_stage_maps)."""
    ref, mine = twin_models(official, "t")
    x = torch.randn(2, 3, 200, 264, generator=torch.Generator().manual_seed(2))
    want, seen, level_outputs = official_stage_maps(ref, x)
    with torch.no_grad():
        final, maps = mine.eval().forward_intermediates(x)
        got = mine.forward_head(final)  # = mine(x): final equals forward_features (test_forward_intermediates_contract)
    assert want.std() > 0.1 and (got - want).abs().max() <= 1e-4
    assert [tuple(m.shape[1:]) for m in maps] == [(80, 50, 66), (160, 25, 33), (320, 13, 17), (640, 7, 9)]
    assert level_outputs == [(160, 25, 33), (320, 13, 17), (640, 7, 9), (640, 7, 9)]
    for i, m in enumerate(maps):
        assert seen[i].std() > 0.1 and (m - seen[i]).abs().max() <= 1e-4 * seen[i].abs().max(), i


@pytest.mark.reference
@pytest.mark.slow
def test_train_mode_gradients_equal_official(official):
    ref, mine = twin_models(official, "t", drop_path_rate=0.0)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 5, 7, 999])
    for m in (ref, mine):
        m.train()
        F.cross_entropy(m(x), y).backward()
    ref_grads = dict(ref.named_parameters())
    # Biases whose output reaches a train-mode BatchNorm only linearly have an exactly-zero gradient (BN removes
    # any per-channel constant): the conv biases of the conv blocks, and the last MLP bias before the head's norm.
    # Both sides hold rounding noise there; every other gradient must agree.
    zero = {f"levels.{i}.blocks.{j}.conv{k}.bias" for i in (0, 1) for j in range(len(mine.levels[i].blocks)) for k in (1, 2)}
    zero.add(f"levels.3.blocks.{len(mine.levels[3].blocks) - 1}.mlp.fc2.bias")
    scale = max(p.grad.abs().max() for p in ref_grads.values())
    for name, p in mine.named_parameters():
        want = ref_grads[name].grad
        assert want is not None and p.grad is not None, name
        if name in zero:
            assert p.grad.abs().max() < 1e-4 * scale, name
            continue
        err = (p.grad - want).abs().max() / want.abs().max()
        assert err <= 1e-4, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("size", SIZES)
def test_macs_match_the_paper(size):
    name = f"mambavision_{size}"
    flops = count_flops(meta_model(name), 224)
    assert abs(flops.gmacs / PAPER[name]["gmacs"] - 1) <= 0.02
    assert flops.attention_macs > 0 and flops.scan_macs > 0


def test_count_flops_on_a_real_model_leaves_it_untouched():
    model = ours("mambavision_demo").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops = count_flops(model, (64, 64), batch_size=2)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    single = count_flops(model, 64)
    assert flops.macs == 2 * single.macs and flops.scan_macs == 2 * single.scan_macs
    # The demo's stage-4 Mamba block at 64 px: one 2x2 window of 4 tokens, d = 128, 8 states.
    assert single.scan_macs == (3 * 64 * 16 * 8 + 64 * 16) + (3 * 128 * 4 * 8 + 128 * 4)


def test_family_table_as_markdown():
    """`python -m mambavision_train.models --markdown`: the header, its separator and one row per variant, with the
    measured counts in their columns."""
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "mambavision_train.models", "--markdown"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    head, rule, *body = res.stdout.strip().splitlines()
    head, *body = [line.strip("| ").split(" | ") for line in (head, *body)]
    assert head[:3] == ["model", "res", "eval crop"] and rule == "|" + "---|" * len(head)
    rows = {cells[0]: cells for cells in body}
    assert list(rows) == list(PAPER)
    assert rows["mambavision_t"][3] == rows["mambavision_t"][4] == "31,794,248"
    assert rows["mambavision_l2_512"][1:4] == ["512", "0.93 squash", "241,554,824"]
    assert rows["mambavision_l3_256"][3] == "739,570,472"
    assert head[-1].startswith("feature channels") and rows["mambavision_t"][-1] == "80 / 160 / 320 / 640"
    assert rows["mambavision_l3_512"][-1] == "256 / 512 / 1024 / 2048"


# --------------------------------------------------------------------------- timm's feature API (docs/dense.md)
def stage_sides(side: int) -> list[int]:
    """A stage map's side for an input side: the stem's two stride-2 convolutions, then a stride-2 downsample
    before each later stage (each rounds up)."""
    sides = [-(-(-(-side // 2)) // 2)]
    for _ in range(3):
        sides.append(-(-sides[-1] // 2))
    return sides


def test_feature_info_and_features_only_on_every_variant():
    """Every registered variant: feature_info (dim * 2^i channels at stride 4 * 2^i, module names that exist),
    features_only through timm's getter wrapper, pruned to what the requested stages need, with the state-dict
    names unchanged; img_size and window overrides reach the wrapped model."""
    from mambavision_train.models.mambavision import ARCHS
    names = timm.list_models("mambavision_*")
    assert set(names) == set(ARCHS)
    for name in names:
        dim = ARCHS[name]["dim"]
        feats = meta_model(name, features_only=True, out_indices=(1, 2))
        inner = feats.model
        assert type(feats).__name__ == "FeatureGetterNet", name
        assert [(f["num_chs"], f["reduction"]) for f in inner.feature_info] == [(dim * 2 ** i, 4 * 2 ** i) for i in range(4)]
        assert feats.feature_info.channels() == [2 * dim, 4 * dim] and feats.feature_info.reduction() == [8, 16]
        assert all(inner.get_submodule(m) is inner.levels[i] for i, m in zip((1, 2), feats.feature_info.module_name()))
        # Stage 4 is gone, and so is stage 3's downsample (it fed stage 4 only); stage 2's stays.
        assert len(inner.levels) == 3 and inner.levels[2].downsample is None and inner.levels[1].downsample is not None
        full = set(meta_model(name).state_dict()) if name == "mambavision_t" else None
        keys = set(inner.state_dict())
        assert not any(k.startswith(("norm.", "head.", "levels.3.", "levels.2.downsample")) for k in keys), name
        if full is not None:
            assert keys < full
    windows = lambda m: [lvl.window_size for lvl in m.model.levels]
    assert windows(meta_model("mambavision_l2", features_only=True, img_size=512)) == [8, 8, 32, 16]
    assert windows(meta_model("mambavision_t", features_only=True, window_size=[8, 8, 112, 56])) == [8, 8, 112, 56]


@pytest.mark.parametrize("name,res", [("mambavision_demo", (45, 71)), ("mambavision_t", (97, 131))])
def test_forward_intermediates_contract(name, res):
    """timm's contract at an odd, non-square input: one map per stage, taken before the stage's downsample, with
    dim * 2^i channels and the stage's spatial size; the final features equal forward_features; the getter
    wrapper (timm.create_model(features_only=True), the same seed: the same weights) returns the same maps."""
    torch.manual_seed(0)
    model = ours(name).eval()
    torch.manual_seed(0)
    getter = ours(name, features_only=True, out_indices=(0, 2, 3)).eval()
    x = torch.randn(1, 3, *res, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        got = getter(x)
    dim = model.feature_info[0]["num_chs"]
    assert [tuple(m.shape) for m in maps] == [
        (1, dim * 2 ** i, h, w) for i, (h, w) in enumerate(zip(stage_sides(res[0]), stage_sides(res[1])))]
    assert len(got) == 3 and getter.feature_info.channels() == [dim, 4 * dim, 8 * dim]
    assert all(torch.equal(a, maps[i]) for a, i in zip(got, (0, 2, 3)))


def test_forward_intermediates_options_and_strict_pretrained_features(tmp_path):
    """indices as the last n, stop_early (the deepest map taken is the final one), norm (the final BatchNorm, on
    the last stage's map); features_only with pretrained=True from a local file: the weights load strictly into
    the whole model, before the wrapper prunes it (a file with a key too few is refused)."""
    torch.manual_seed(0)
    model = randomize_(ours("mambavision_demo")).eval()
    x = torch.randn(2, 3, 45, 71, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "weights.pth.tar"
    torch.save(official_checkpoint(model), path)
    getter = ours("mambavision_demo", features_only=True, out_indices=(1, 3), pretrained=True,
                  pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert all(torch.equal(a, b) for a, b in zip(model.forward_intermediates(x, 2, intermediates_only=True), maps[2:]))
        early, first = model.forward_intermediates(x, [0, 1], stop_early=True)
        assert torch.equal(early, maps[1]) and all(torch.equal(a, b) for a, b in zip(first, maps[:2]))
        assert torch.equal(model.forward_intermediates(x, [3], norm=True, intermediates_only=True)[0], final)
        assert all(torch.equal(a, maps[i]) for a, i in zip(getter(x), (1, 3)))
    sd = model.state_dict()
    sd.pop("levels.3.blocks.1.mlp.fc2.bias")
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing 1: levels\.3\.blocks\.1\.mlp\.fc2\.bias"):
        ours("mambavision_demo", features_only=True, out_indices=(0, 1), pretrained=True,
             pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(CheckpointError, match="mambavision_demo has no released weights"):
        ours("mambavision_demo", features_only=True, pretrained=True)


def test_prune_intermediate_layers_keeps_the_names_and_drops_the_unused_downsample():
    torch.manual_seed(0)
    model = ours("mambavision_demo").eval()
    before = model.state_dict()
    x = torch.randn(1, 3, 45, 71)
    with torch.no_grad():
        _, maps = model.forward_intermediates(x)
        assert model.prune_intermediate_layers((0, 1)) == [0, 1]
        assert len(model.levels) == 2 and model.levels[1].downsample is None and model.levels[0].downsample is not None
        assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.head, torch.nn.Identity)
        assert model.num_features == 64
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # same names, same tensors
        assert set(before) - set(model.state_dict()) >= {"levels.1.downsample.reduction.0.weight", "norm.weight"}
        final, kept = model.forward_intermediates(x)
        assert torch.equal(model.forward_features(x), maps[1]) and torch.equal(final, maps[1])
        assert all(torch.equal(a, b) for a, b in zip(kept, maps[:2]))
