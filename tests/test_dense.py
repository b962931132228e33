"""MambaVision as a dense backbone: the official MM_mamba_vision's outputs and checkpoints, ImageNet weights with
exactly the expected differences, torchvision's detectors over the FPN backbone, and a detector that learns."""

import time

import pytest
import timm
import torch
import torch.nn.functional as F
from test_models import official_checkpoint, official_stage_maps, randomize_
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from mambavision_train import CheckpointError, dense_backbone, fpn_backbone
from mambavision_train.models.dense import windows_for

# The backbone entry of the official T configs, as MM_mamba_vision hands it to MambaVision.__init__ (its
# drop_path_rate is not among them: the constructor's default, 0.2, ran).
OFFICIAL_T = dict(dim=80, in_dim=32, depths=[1, 3, 8, 4], num_heads=[2, 4, 8, 16], mlp_ratio=4, layer_scale=None)


def close(got, want, tol=1e-4):
    return want.std() > 0.1 and (got - want).abs().max() <= tol * want.abs().max()


@pytest.mark.reference
def test_equals_the_official_dense_model_and_loads_its_mmseg_checkpoint_strictly(official, tmp_path):
    """The official dense T of the ADE20K config (segmentation windows 8, 8, 64, 32), rebuilt from the official
    classifier plus one LayerNorm over channels per output (eps 1e-5), its weights saved as mmseg saves a
    segmentor: our dense_backbone loads the file strictly (backbone.* only), has the official module's state-dict
    keys in the official order, and returns the same four maps at an odd, detection-like size."""
    torch.manual_seed(0)
    ref = randomize_(official.MambaVision(window_size=[8, 8, 64, 32], **OFFICIAL_T))
    g = torch.Generator().manual_seed(3)
    norms = [(1 + 0.2 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)) for c in (80, 160, 320, 640)]
    backbone = {k: v for k, v in ref.state_dict().items() if not k.startswith(("norm.", "head."))}
    for i, (w, b) in enumerate(norms):
        backbone.update({f"outnorm{i}.weight": w, f"outnorm{i}.bias": b})
    ckpt = {"meta": {"mmseg_version": "1.2.2", "dataset_meta": {"classes": ("wall", "building")}, "iter": 160000},
            "state_dict": {**{f"backbone.{k}": v for k, v in backbone.items()},
                           "decode_head.conv_seg.weight": torch.zeros(150, 512, 1, 1),
                           "auxiliary_head.conv_seg.weight": torch.zeros(150, 256, 1, 1)}}
    path = tmp_path / "mamba_vision_160k_ade20k-512x512_tiny.pth"
    torch.save(ckpt, path)
    mine = dense_backbone("mambavision_t", windows="seg", weights=path).eval()
    assert list(mine.state_dict()) == list(backbone)
    assert mine.weights_loaded == (f"loaded {path} (backbone.* of a whole model, plain dense weights): "
                                   "every tensor, strictly")
    assert [lvl.window_size for lvl in mine.levels] == [8, 8, 64, 32]
    assert mine.levels[3].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)  # the official runs' effective rate
    x = torch.randn(1, 3, 218, 346, generator=torch.Generator().manual_seed(4))
    want = [F.layer_norm(m.permute(0, 2, 3, 1), m.shape[1:2], w, b, 1e-5).permute(0, 3, 1, 2)
            for m, (w, b) in zip(official_stage_maps(ref, x)[1], norms)]
    with torch.no_grad():
        got = mine(x)
    assert [tuple(m.shape) for m in got] == [(1, 80, 55, 87), (1, 160, 28, 44), (1, 320, 14, 22), (1, 640, 7, 11)]
    for i, (a, b) in enumerate(zip(got, want)):
        assert close(a, b), i


def test_imagenet_weights_load_with_exactly_the_expected_differences(tmp_path):
    """An official-format ImageNet checkpoint (timm's CheckpointSaver dict): everything but the classifier's
    norm/head loads, the new output norms keep their identity init, and one line says so; the maps are the
    classifier's pre-downsample maps, layer-normalised. One of our training checkpoints gives its EMA weights. Any
    other difference is an error."""
    torch.manual_seed(0)
    clf = randomize_(timm.create_model("mambavision_demo")).eval()
    path = tmp_path / "demo_in1k.pth.tar"
    torch.save(official_checkpoint(clf), path)
    dense = dense_backbone("mambavision_demo", windows="cls", weights=path).eval()
    assert dense.weights_loaded == (
        f"loaded {path} (plain ImageNet weights): all but, as expected, the new output norms outnorm0, outnorm1, "
        "outnorm2, outnorm3 (8 tensors, identity init) and the classifier's norm, head (7 tensors, left out)")
    x = torch.randn(2, 3, 45, 71)
    with torch.no_grad():
        want = clf.forward_intermediates(x, intermediates_only=True)
        got = dense(x)
    for a, b in zip(got, want):
        assert torch.allclose(a, F.layer_norm(b.permute(0, 2, 3, 1), b.shape[1:2], eps=1e-5).permute(0, 3, 1, 2),
                              atol=1e-5)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in clf.state_dict().items()}
    training_checkpoint = {"model": clf.state_dict(), "ema": ema, "state": {"step": 5}}
    ours = dense_backbone("mambavision_demo", windows="cls", weights=training_checkpoint)
    assert ours.weights_loaded.startswith("loaded the state dict given (EMA ImageNet weights): all but, as expected")
    assert torch.equal(ours.state_dict()["levels.2.blocks.0.mixer.A_log"], ema["levels.2.blocks.0.mixer.A_log"])
    sd = clf.state_dict()
    sd.pop("levels.1.downsample.reduction.0.weight")
    sd["extra.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError, match=r"does not fit MambaVisionDense: missing 1: levels\.1\.downsample\."
                                              r"reduction\.0\.weight; unexpected 1: extra\.weight$"):
        dense_backbone("mambavision_demo", weights=sd)


@pytest.mark.parametrize("layout", ["mmdet", "torchvision", "plain"])
def test_dense_checkpoints_load_strictly(layout):
    """A trained dense backbone's weights, inside an mmdet detector (backbone.*, beside neck/rpn_head/roi_head),
    inside a torchvision detector over fpn_backbone (backbone.body.*), or alone: exact, or an error."""
    torch.manual_seed(0)
    src = fpn_backbone("mambavision_demo", windows="cls", out_channels=32)
    randomize_(src.body)
    body = src.body.state_dict()
    sd = {"mmdet": {"state_dict": {**{f"backbone.{k}": v for k, v in body.items()},
                                   "neck.lateral_convs.0.conv.weight": torch.zeros(256, 32, 1, 1),
                                   "rpn_head.rpn_conv.weight": torch.zeros(256, 256, 3, 3),
                                   "roi_head.bbox_head.0.fc_cls.weight": torch.zeros(81, 1024)}},
          "torchvision": {**{f"backbone.{k}": v for k, v in src.state_dict().items()},
                          "rpn.head.conv.0.0.weight": torch.zeros(32, 32, 3, 3)},
          "plain": body}[layout]
    dense = dense_backbone("mambavision_demo", windows="cls", weights=sd)
    assert all(torch.equal(v, body[k]) for k, v in dense.state_dict().items())
    assert dense.weights_loaded.endswith("dense weights): every tensor, strictly")
    short = {k: v for k, v in body.items() if k != "outnorm2.bias"}
    with pytest.raises(CheckpointError, match=r"missing 1: outnorm2\.bias$"):
        dense_backbone("mambavision_demo", weights=short)


def test_window_presets_and_why_they_matter():
    """The official configs' windows, and features that depend on them: padded tokens take part in attention and
    the scan, so the conv stages agree and the hybrid stages do not."""
    for size in ("t", "t2", "s", "b", "l", "l2"):
        name = f"mambavision_{size}"
        assert windows_for(name, "det") == [8, 8, 112, 56]
        assert windows_for(name, "seg") == ([8, 8, 160, 56] if size == "s" else [8, 8, 64, 32])
        assert windows_for(name, "cls") == [8, 8, 14, 7]
    assert windows_for("mambavision_l3_512", "seg") == [8, 8, 64, 32]
    with pytest.raises(ValueError, match="windows='coco': use 'det', 'seg', 'cls' or four window sizes"):
        windows_for("mambavision_t", "coco")
    torch.manual_seed(0)
    small = dense_backbone("mambavision_demo", windows=(8, 8, 4, 2)).eval()
    big = dense_backbone("mambavision_demo", windows=(8, 8, 16, 8)).eval()
    big.load_state_dict(small.state_dict())
    x = torch.randn(1, 3, 45, 71)
    with torch.no_grad():
        a, b = small(x), big(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[2] - b[2]).abs().max() > 1e-3 and (a[3] - b[3]).abs().max() > 1e-3


def test_frozen_stages_and_norm_eval_are_explicit_and_off_by_default():
    """Off, everything trains (the official runs). frozen_stages=2: the stem and stages 1-2 (with their output
    norms) get no gradient and keep their BatchNorm statistics; norm_eval: every BatchNorm keeps its statistics,
    every weight still trains."""
    x = torch.randn(2, 3, 40, 56)
    default, frozen, norm_eval = (dense_backbone("mambavision_demo", windows="cls", **kw).train()
                                  for kw in ({}, dict(frozen_stages=2), dict(norm_eval=True)))
    for model, kept in ((default, False), (frozen, True), (norm_eval, True)):
        stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        sum(m.sum() for m in model(x)).backward()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items()) == kept
    assert all(p.grad is not None for p in default.parameters()) and all(m.training for m in default.modules())
    for name, p in frozen.named_parameters():
        stem_or_first_two = name.startswith(("patch_embed.", "levels.0.", "levels.1.", "outnorm0.", "outnorm1."))
        assert p.requires_grad != stem_or_first_two and (p.grad is None) == stem_or_first_two, name
    assert not frozen.levels[1].training and frozen.levels[2].training
    assert all(p.grad is not None for p in norm_eval.parameters())
    assert not norm_eval.patch_embed.conv_down[1].training and norm_eval.patch_embed.conv_down[0].training
    with pytest.raises(ValueError, match="trainable_stages=6"):
        fpn_backbone("mambavision_demo", trainable_stages=6)
    with pytest.raises(ValueError, match="norm_layer='ln' normalises NCHW maps over their width"):
        dense_backbone("mambavision_demo", norm_layer="ln")


def small_mask_rcnn(backbone, size: int, num_classes: int = 11) -> MaskRCNN:
    """torchvision's Mask R-CNN, sized for CPU tests: images kept at ``size``, fewer proposals and RoIs, slim box
    and mask heads (the detector's defaults are sized for COCO at 800 px)."""
    c = backbone.out_channels
    return MaskRCNN(backbone, num_classes=None, min_size=size, max_size=size, rpn_pre_nms_top_n_train=300,
                    rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=50,
                    rpn_batch_size_per_image=64, box_batch_size_per_image=32, box_detections_per_img=10,
                    box_head=TwoMLPHead(c * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, num_classes),
                    mask_head=MaskRCNNHeads(c, [32], 1), mask_predictor=MaskRCNNPredictor(32, 32, num_classes))


def test_torchvision_detectors_take_the_fpn_backbone():
    """One Mask R-CNN training step on two images of different sizes (finite losses, a gradient for every backbone
    parameter) and one eval forward; Faster R-CNN and RetinaNet take the same backbone."""
    from helpers.digit_canvases import canvases
    torch.manual_seed(0)
    backbone = fpn_backbone("mambavision_demo", windows="cls", out_channels=32)
    assert backbone.out_channels == 32
    (a, *_), (ta, *_) = canvases(1, size=(72, 72), seed=3)
    (b, *_), (tb, *_) = canvases(1, size=(60, 80), seed=4)
    images, targets = [a, b], [ta, tb]
    model = small_mask_rcnn(backbone, 64).train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert not missing
    with torch.no_grad():
        out = model.eval()(images)
    assert [o["masks"].shape[2:] for o in out] == [(72, 72), (60, 80)]
    assert all(o["boxes"].shape[0] == o["labels"].shape[0] == o["scores"].shape[0] for o in out)
    with torch.no_grad():
        for detector in (FasterRCNN(backbone, num_classes=11, min_size=64, max_size=64),
                         RetinaNet(backbone, num_classes=11, min_size=64, max_size=64)):
            assert {"boxes", "labels", "scores"} <= set(detector.eval()(images[:1])[0])


@pytest.mark.slow
def test_a_mask_rcnn_learns_digits_from_what_the_classification_backbone_carries(tmp_path):
    """A small end-to-end check of the parts: digits pasted onto 64 px canvases as a COCO-style set (boxes and
    instance masks), Mask R-CNN over the demo backbone, 100 steps on the CPU, box and mask AP by pycocotools on
    canvases of held-out digits. The body is frozen (trainable_stages=0), so the detector has only what the
    backbone gives: once the demo trained as a digit classifier (loaded as classification weights, the dense
    backbone's ImageNet-style start), once the same model untrained; the detector's own layers start from the same
    draws. Measured (one core, two draws of the training canvases): box AP 0.28-0.33 from the classifier,
    0.17-0.18 from the random body, 0.000 untrained; ~55 s CPU in all."""
    from helpers.digit_canvases import canvases, coco_ap, is_val
    started = time.process_time()
    torch.manual_seed(0)
    ckpt = tmp_path / "demo_digits.pth"
    torch.save(_digit_classifier(is_val, steps=100).state_dict(), ckpt)
    size, steps, batch = 64, 100, 4
    val_images, val_targets = canvases(40, size=size, split="val", seed=2)
    train_images, train_targets = canvases(steps * batch, size=size, seed=1)

    def ap(model):
        with torch.no_grad():
            return coco_ap(val_targets, [model.eval()([x])[0] for x in val_images])

    def detector(weights, untrained=None):
        torch.manual_seed(1)
        backbone = fpn_backbone("mambavision_demo", weights=weights, windows=(8, 8, size // 16, size // 32),
                                out_channels=32, trainable_stages=0)
        model = small_mask_rcnn(backbone, size)
        if untrained is not None:
            untrained.update(ap(model))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
        model.train()
        for s in range(steps):
            losses = model(train_images[s * batch:(s + 1) * batch], train_targets[s * batch:(s + 1) * batch])
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            sched.step()
        assert all(p.grad is None for p in backbone.body.parameters())
        return ap(model), backbone.body

    untrained = {}
    carried, body = detector(ckpt, untrained)
    assert "ImageNet weights" in body.weights_loaded
    random_body, _ = detector(None)
    print(f"box/mask AP: from the classifier {carried['bbox']:.3f}/{carried['segm']:.3f}, random body "
          f"{random_body['bbox']:.3f}/{random_body['segm']:.3f}, untrained {untrained['bbox']:.3f}/"
          f"{untrained['segm']:.3f}; {time.process_time() - started:.0f} s CPU")
    assert untrained["bbox"] < 0.01
    assert carried["bbox"] > 0.2 and carried["segm"] > 0.1
    assert carried["bbox"] > random_body["bbox"] + 0.05 and carried["segm"] > random_body["segm"]


def _digit_classifier(is_val, steps: int):
    """The demo model trained as a classifier on the training digits at 32 px (its demo resolution), AdamW,
    batch 64: ~99% training accuracy in 100 steps."""
    from sklearn.datasets import load_digits
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    digits = load_digits()
    keep = torch.tensor([i for i in range(len(digits.target)) if not is_val(i)])
    x = F.interpolate(torch.tensor(digits.images, dtype=torch.float32)[keep, None] / 16, size=32, mode="bilinear")
    x = (x.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    y = torch.tensor(digits.target)[keep]
    model = timm.create_model("mambavision_demo", img_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        b = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
