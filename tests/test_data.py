"""Data: conversion of odd real-world files, loaders (FFCV and fallback), order, resume, augmentations."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.imagetree import nasty_tree, photo
from mambavision_train.data import AugConfig, DataConfig, DataError, build_loader, check
from mambavision_train.data.augment import DeviceAugment
from mambavision_train.data.convert import ConversionError, ConvertOptions, convert, main as convert_main
from mambavision_train.data.order import Shard, epoch_permutation, rank_indices

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NO_AUG = AugConfig(rand_augment=None, color_jitter=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0)


def read_beton(path):
    """(label, (h, w), decoded RGB pixels) per sample, read with FFCV's Reader and OpenCV, not with our code."""
    import cv2
    from ffcv.reader import Reader
    r = Reader(str(path))
    meta, table = r.metadata, r.alloc_table
    sizes = {int(p): int(s) for p, s in zip(table["ptr"], table["size"])}
    data = Path(path).read_bytes()
    out = []
    for m in meta:
        img = m["f0"]
        ptr = int(img["data_ptr"])
        raw = np.frombuffer(data[ptr:ptr + sizes[ptr]], np.uint8)
        pixels = cv2.cvtColor(cv2.imdecode(raw, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) if img["mode"] == 0 \
            else raw[: int(img["height"]) * int(img["width"]) * 3].reshape(int(img["height"]), int(img["width"]), 3)
        out.append((int(m["f1"]), (int(img["height"]), int(img["width"])), pixels))
    return out


def psnr(a, b):
    return 10 * np.log10(255.0 ** 2 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("nasty")
    expect = nasty_tree(root / "src")
    results = convert(root / "src", root / "out", opts=ConvertOptions(workers=2))
    return root, expect, results


def test_conversion_round_trip_of_odd_files(converted):
    root, expect, results = converted
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    assert json.loads((root / "out" / "classes.json").read_text())["classes"] == ["n01440764", "n01443537"]
    for split, r in zip(("train", "val"), results):
        good, bad = expect[split]["good"], expect[split]["bad"]
        skipped = [line.split("\t")[0] for line in (root / "out" / f"{split}_skipped.txt").read_text().splitlines()]
        assert {str(Path(p).relative_to(root / "src")) for p in skipped} == bad
        assert r["images"] == len(good) and r["skipped"] == len(bad)
        # The source minus exactly the skipped files, in ImageFolder order: labels and upright sizes.
        _, idx = find_classes(str(root / "src" / split))
        order = [str(Path(p).relative_to(root / "src")) for p, _ in make_dataset(str(root / "src" / split), idx,
                                                                                  IMG_EXTENSIONS)]
        order = [p for p in order if p not in bad]
        stored = read_beton(root / "out" / f"{split}.beton")
        assert [(lab, hw) for lab, hw, _ in stored] == [good[p] for p in order]
        # Pixels of a plain image survive within JPEG tolerance; the grayscale one stays gray.
        plain = order.index(f"{split}/n01440764/plain_0.JPEG")
        src = np.asarray(Image.open(root / "src" / order[plain]).convert("RGB"), dtype=np.float64)
        other = np.asarray(Image.open(root / "src" / order[plain + 1]).convert("RGB"), dtype=np.float64)
        assert psnr(stored[plain][2], src) > 30 and psnr(stored[plain][2], other) < 20
        gray = stored[order.index(f"{split}/n01440764/gray.JPEG")][2].astype(int)
        assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 3


def test_conversion_refuses_to_overwrite_and_never_leaves_a_complete_looking_partial(converted, tmp_path, monkeypatch):
    root, _, _ = converted
    with pytest.raises(ConversionError, match="train.beton already exists; pass --overwrite"):
        convert(root / "src", root / "out", opts=ConvertOptions(workers=2))
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        convert_main([str(root / "src"), str(root / "out"), "--workers", "2"])
    # An interruption in the middle of writing: no train.beton appears, and the next run completes.
    from mambavision_train.data import convert as conv
    real = conv._FileDataset.__getitem__

    def dies_halfway(self, i):
        if i == 5:
            raise KeyboardInterrupt("power cut")
        return real(self, i)

    monkeypatch.setattr(conv._FileDataset, "__getitem__", dies_halfway)
    with pytest.raises(ConversionError, match="an FFCV writer process died"):
        convert(root / "src", tmp_path, ("train",), ConvertOptions(workers=1))
    assert not (tmp_path / "train.beton").exists()
    monkeypatch.setattr(conv._FileDataset, "__getitem__", real)
    convert(root / "src", tmp_path, ("train",), ConvertOptions(workers=1))
    assert len(read_beton(tmp_path / "train.beton")) == 10 and not (tmp_path / "train.beton.partial").exists()


@pytest.fixture(scope="module")
def digits(env):
    """The bundled demo data in the session's fresh cache: built from scratch by the first test that needs it (here
    or in a training run; digits.prepare holds a lock while it builds)."""
    root = Path(env["MAMBAVISION_CACHE"]) / "digits"
    return DataConfig(kind="ffcv", root=str(root), folder_root=str(root / "images"), prepare="digits",
                      num_classes=10, num_workers=2)


def epoch(cfg, aug=NO_AUG, **kw):
    kw.setdefault("batch_size", 32)
    kw.setdefault("res", 32)
    loader, device_aug = build_loader(cfg, aug, **kw)
    return loader, device_aug


def collect(loader, epoch_=0, start_batch=0):
    loader.set_epoch(epoch_, start_batch)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("kind", ["ffcv", "folder"])
def test_digits_build_and_load(digits, kind):
    cfg = DataConfig(**{**digits.__dict__, "kind": kind})
    val, val_aug = epoch(cfg, train=False, batch_size=100)
    batches = collect(val)
    labels = torch.cat([y for _, y in batches])
    assert len(labels) == 359 and torch.bincount(labels).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    x, y = batches[0]
    assert x.dtype == torch.uint8 and x.shape == (100, 3, 32, 32) and 0 <= x.min() and x.max() == 255
    xf, yf = val_aug(x, y)
    assert xf.dtype == torch.float32 and xf.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(yf, y) and -2.2 < xf.min() < -1.5 and 2.0 < xf.max() < 2.7
    train, _ = epoch(cfg, train=True, batch_size=64)
    got = collect(train)
    assert len(got) == len(train) == 1438 // 64 and all(x.shape == (64, 3, 32, 32) for x, _ in got)


@pytest.mark.parametrize("kind", ["ffcv", "folder"])
def test_same_seed_and_epoch_same_pixels_and_resume_mid_epoch(digits, kind):
    cfg = DataConfig(**{**digits.__dict__, "kind": kind})
    loader, _ = epoch(cfg, train=True, seed=7)
    first = collect(loader, epoch_=3)
    again = collect(loader, epoch_=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other = collect(loader, epoch_=4)
    assert not torch.equal(first[0][0], other[0][0])
    resumed = collect(epoch(cfg, train=True, seed=7)[0], epoch_=3, start_batch=5)  # a fresh process would do this
    assert len(resumed) == len(first) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first[5:], resumed))


def test_ffcv_makes_the_ranks_gpu_current_in_its_thread_before_any_batch(digits, monkeypatch):
    """FFCV's loader thread enters a CUDA stream context per batch when CUDA is available, and a new thread's current
    device is GPU 0: the thread makes the rank's own GPU current first (what that prevents shows only on a GPU node:
    a context on GPU 0 for every rank). Here set_device is recorded, not run."""
    import threading
    from mambavision_train.data.ffcv_loader import FFCVLoader
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append((threading.current_thread().name, d)))
    loader = FFCVLoader(check(digits, "val"), train=False, batch_size=100, res=32, num_workers=1, device="cuda:1")
    batches = [y.clone() for _, y in loader]
    assert len(batches) == 4 and calls and {c[1] for c in calls} == {torch.device("cuda:1")}
    assert threading.main_thread().name not in {c[0] for c in calls}


def test_shards_are_disjoint_and_cover_the_epoch(digits):
    n, bs = 1438, 32
    perm = epoch_permutation(n, 7, 2)
    shards = [rank_indices(n, bs, 7, 2, Shard(r, 2), drop_last=False) for r in range(2)]
    assert not set(shards[0]) & set(shards[1]) and sorted(np.concatenate(shards)) == list(range(n))
    assert sorted(np.concatenate(shards)) == sorted(perm)
    train_shards = [rank_indices(n, bs, 7, 2, Shard(r, 2)) for r in range(2)]
    assert len(train_shards[0]) == len(train_shards[1]) == (n // 2) // bs * bs  # equal step counts for DDP
    # The loaders deliver exactly their shard: labels match the shard's indices.
    for r in range(2):
        loader, _ = epoch(digits, train=True, seed=7, shard=Shard(r, 2))
        got = torch.cat([y for _, y in collect(loader, epoch_=2)])
        assert torch.equal(got, labels_in_order_for_train(digits)[torch.as_tensor(train_shards[r])])


def labels_in_order_for_train(cfg):
    from torchvision.datasets import ImageFolder
    return torch.tensor(ImageFolder(str(Path(cfg.folder_root) / "train")).targets)


def test_mixup_and_cutmix_targets(digits):
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(16) % 10
    for mix, cut in ((0.8, 0.0), (0.0, 1.0)):
        aug = DeviceAugment(AugConfig(rand_augment=None, color_jitter=0.0, reprob=0.0, mixup=mix, cutmix=cut,
                                      smoothing=0.0), 10, MEAN, STD, "cpu")
        plain = DeviceAugment(NO_AUG, 10, MEAN, STD, "cpu")(x, y)[0]
        torch.manual_seed(0)
        mixed, t = aug(x, y)
        assert torch.allclose(t.sum(1), torch.ones(16))
        lam = t[0, y[0]].item()  # batch mode: one coefficient, partner = the flipped batch (y[0] != y[15])
        if mix:
            assert torch.allclose(mixed, lam * plain + (1 - lam) * plain.flip(0), atol=1e-5)
        else:
            from_partner = (mixed != plain).any(1).float().mean().item()
            assert abs((1 - from_partner) - lam) < 1e-6
    smooth = DeviceAugment(AugConfig(rand_augment=None, color_jitter=0.0, reprob=0.0, smoothing=0.1), 10, MEAN, STD,
                           "cpu")
    assert torch.allclose(smooth(x, y)[1].sum(1), torch.ones(16)) and smooth(x, y)[1].min() >= 0.01 - 1e-6


def test_paper_augmentation_on_the_device(digits):
    loader, aug = epoch(digits, AugConfig(), train=True, batch_size=64)
    x, y = next(iter(collect(loader)))
    torch.manual_seed(0)
    out, t = aug(x, y)
    assert out.shape == (64, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)
    assert t.shape == (64, 10) and torch.allclose(t.sum(1), torch.ones(64)) and torch.isfinite(out).all()


@pytest.mark.parametrize("crop_pct", [0.875, 0.93, 1.0])
def test_fallback_eval_transform_is_timms(tmp_path, crop_pct):
    """The fallback's eval path (ImageFolder + our uint8 transform + device normalisation) equals timm's eval
    transform on real photos of several shapes."""
    from skimage import data
    from timm.data import create_transform
    photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(), "rocket": data.rocket()}
    for name, arr in photos.items():
        (tmp_path / "val" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "val" / name / f"{name}.jpg", quality=92)
    cfg = DataConfig(kind="folder", root=str(tmp_path), num_classes=4, num_workers=0)
    loader, aug = build_loader(cfg, None, train=False, batch_size=4, res=224, crop_pct=crop_pct)
    x, y = next(iter(loader))
    ours = aug(x, y)[0]
    timm_tf = create_transform(224, is_training=False, crop_pct=crop_pct, interpolation="bicubic")
    for i, path in enumerate(sorted((tmp_path / "val").glob("*/*.jpg"))):
        ref = timm_tf(Image.open(path).convert("RGB"))
        assert torch.allclose(ours[i], ref, atol=1e-5), (path.name, crop_pct)


def test_rand_augment_ops_follow_timm():
    """Each op at a fixed magnitude against timm's PIL op on a real photo."""
    from timm.data import auto_augment as aa
    from mambavision_train.data import randaugment as ra
    img = photo(0, size=(64, 48))
    x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float()
    hp = dict(img_mean=ra.FILL, interpolation=Image.BILINEAR)
    for name in ra.OPS:
        op = aa.AugmentOp(name, prob=1.0, magnitude=7, hparams=hp)
        aa.random.seed(0)  # fixes the sign timm draws
        sign = -1.0 if aa.random.random() > 0.5 else 1.0
        aa.random.seed(0)
        want = np.asarray(op(img), dtype=np.float64)
        got = ra._apply(name, x.clone(), torch.tensor([7.0]), torch.tensor([sign]), torch.tensor([False])).round()
        diff = np.abs(got[0].permute(1, 2, 0).numpy() - want)
        geometric = name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
        # Pixel ops: the same LUTs and blends up to rounding. Warps: the same map, PIL's and grid_sample's
        # bilinear differ at a few edge pixels.
        assert (np.median(diff) <= 1.0 and diff.mean() < (6.0 if geometric else 1.0)), (name, diff.mean())


def test_bad_data_roots_fail_fast_with_one_line(tmp_path):
    with pytest.raises(DataError, match=r"data.root=/nope does not exist; prepare ImageNet with `python -m "
                                        r"mambavision_train.data.convert"):
        check(DataConfig(kind="ffcv", root="/nope"), "train")
    with pytest.raises(DataError, match="train.beton not found"):
        check(DataConfig(kind="ffcv", root=str(tmp_path)), "train")
    with pytest.raises(DataError, match="data.root is not set"):
        check(DataConfig(kind="folder", root=None), "val")
    with pytest.raises(DataError, match="unknown data.kind 'lmdb'"):
        check(DataConfig(kind="lmdb", root=str(tmp_path)), "val")


@pytest.mark.parametrize("kind", ["ffcv", "folder"])
def test_labels_beyond_num_classes_stop_check_and_build_loader(digits, kind, monkeypatch):
    """Both stop at once (eval.py calls only build_loader); build_loader reads a .beton's tables once, for its label
    check and the loader together."""
    from mambavision_train.data import ffcv_loader
    cfg = DataConfig(**{**digits.__dict__, "kind": kind, "num_classes": 5})
    want = "labels up to 9 but data.num_classes=5" if kind == "ffcv" else "10 class folders but data.num_classes=5"
    with pytest.raises(DataError, match=want):
        check(cfg, "val")
    with pytest.raises(DataError, match=want):
        epoch(cfg, train=False)
    reads = []
    monkeypatch.setattr(ffcv_loader, "beton_reader", lambda path, read=ffcv_loader.beton_reader: reads.append(path)
                        or read(path))
    epoch(DataConfig(**{**digits.__dict__, "kind": kind}), train=False)
    assert len(reads) == (kind == "ffcv")


def test_synthetic_loader():
    loader, aug = build_loader(DataConfig(kind="synthetic", num_samples=256, num_classes=1000), None, train=True,
                               batch_size=32, res=64, shard=Shard(1, 2))
    batches = list(loader)
    assert len(batches) == len(loader) == 4 and batches[0][0].shape == (32, 3, 64, 64)
    assert aug(*batches[0])[1].shape == (32, 1000)


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_ffcv_eval_crops_agree_with_timms_eval_transform(digits, crop_pct):
    """The FFCV val decoder (resize floor(res / crop_pct), center crop, while decoding) against the paper-exact
    fallback path (timm's PIL transform) on the same 359 images: the same crops up to resampling and JPEG storage."""
    outs = {}
    for kind in ("ffcv", "folder"):
        loader, _ = epoch(DataConfig(**{**digits.__dict__, "kind": kind}), train=False, batch_size=400,
                          crop_pct=crop_pct)
        outs[kind] = next(iter(loader))[0].float()
    mse = ((outs["ffcv"] - outs["folder"]) ** 2).mean(dim=(1, 2, 3))
    db = 10 * torch.log10(255.0 ** 2 / mse)
    assert db.mean() > 32 and db.min() > 28
    shifted = ((outs["ffcv"] - outs["folder"].roll(1, 0)) ** 2).mean(dim=(1, 2, 3))  # other images: far apart
    assert (10 * torch.log10(255.0 ** 2 / shifted)).mean() < 20


def test_evaluation_that_sees_no_image_is_an_error_not_a_zero():
    from mambavision_train.data.synthetic import SyntheticLoader
    from mambavision_train.engine.evaluate import evaluate

    loader = SyntheticLoader(batch_size=8, res=16, num_classes=10, num_samples=5, train=False)
    assert len(loader) == 0  # fewer images than one batch, and the synthetic loader keeps only whole ones
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    device_aug = DeviceAugment(NO_AUG, 10, MEAN, STD, "cpu", train=False)
    with pytest.raises(DataError, match="evaluation saw no image"):
        evaluate(model, loader, device_aug)


def test_evaluation_reports_the_top_k_it_is_asked_for_as_counted_by_hand():
    """eval.topk: the share of images whose label is among the k highest logits, beside top-1 and top-5 (for k=1, 3,
    5 and 7 on a random model over 10 classes, 160 images: each k a different share, so a wrong k would show)."""
    from mambavision_train.data.synthetic import SyntheticLoader
    from mambavision_train.engine.evaluate import evaluate

    torch.manual_seed(0)
    loader = SyntheticLoader(batch_size=16, res=16, num_classes=10, num_samples=160, train=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    model.num_classes = 10
    device_aug = DeviceAugment(NO_AUG, 10, MEAN, STD, "cpu", train=False)
    ranks = []
    with torch.no_grad():
        for images, labels in loader:
            x, y = device_aug(images, labels)
            logits = model(x)
            ranks += (logits > logits.gather(1, y[:, None])).sum(1).tolist()  # classes scored above the label
    hits = {k: sum(r < k for r in ranks) for k in (1, 3, 5, 7)}  # images whose label is among the k highest
    assert len(ranks) == 160 and len(set(hits.values())) == 4 and hits[7] < 160, hits  # each k its own answer
    for k in hits:
        out = evaluate(model, loader, device_aug, topk=k, confusion=True)
        assert out["count"] == 160 and int(out["confusion"].sum()) == 160, (k, out)
        for j in {1, 5, k}:
            assert out[f"top{j}"] == pytest.approx(100.0 * hits[j] / 160), (k, j, out)
