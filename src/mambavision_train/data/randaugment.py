"""timm's RandAugment ``rand-m{M}-mstd{S}-inc1`` on batched tensors, per sample, on any device.

timm applies RandAugment to one PIL image at a time on the CPU. Here each image of a batch still draws its own ops,
magnitudes, signs and interpolation exactly as timm's ``RandAugment``/``AugmentOp`` do (2 layers; each op applied
with probability 0.5; magnitude ~ N(M, S) clipped to [0, 10]; the 'increasing' op set), and the batch is transformed
at once, as float tensors holding whole grey levels in [0, 255], on the device the model trains on.
Ops follow PIL's definitions (enhance blends, posterize/solarize LUTs, affine maps on pixel centres, fill
(124, 116, 104)); results are rounded to the uint8 lattice after each op as PIL's are.

``_apply`` is one op on a stack of images (the definition, tested op by op against timm's PIL ops).
``rand_augment`` gives every image the result ``_apply`` would give it alone, without ever asking the device which
images drew which op: picking the images of an op (``mask.any()``, ``nonzero``, ``x[mask]``) makes the host wait for
the GPU, some 150 times per batch. So each layer computes the three kinds of op for the whole batch, each in the
cheapest form that serves all its ops at once, and picks per image with ``torch.where``:
- point ops (a pixel's new value depends on its old value and the image's statistics only: 8 of the 15) become one
  lookup table per image and channel, built on the 256 grey levels (tiny) and applied by one gather;
- the two blends (Color, Sharpness) are one blend with a per-image base image and factor;
- the five geometric ops are one affine warp per image (identity where none was drawn), warped bilinearly and
  bicubically (grid_sample takes one interpolation per call) and picked per image.
That is about 25 passes over the batch per layer where picking touched only the images of each op: on a CPU it
costs more than the form it replaced (docs/benchmarks.md); on a GPU, where each of those syncs drained the queue,
the passes are cheap (an estimate: ~8 GB of memory traffic per batch of 128 at 224 px, 2-3 ms on an H200).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

FILL = (124, 116, 104)  # timm: ImageNet mean * 255, the fill of geometric ops
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
       "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
       "TranslateXRel", "TranslateYRel")
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
BLENDS = ("ColorIncreasing", "SharpnessIncreasing")  # mix in other pixels (neighbours, other channels)
POINT = tuple(name for name in OPS if name not in GEOMETRIC + BLENDS)


def parse(config: str) -> dict:
    """'rand-m9-mstd0.5-inc1' -> dict(magnitude=9, magnitude_std=0.5, num_layers=2, increasing=True)."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"only RandAugment ('rand-...') configs are supported on tensors, got {config!r}")
    out = dict(magnitude=10.0, magnitude_std=0.0, num_layers=2, increasing=False, prob=0.5)
    for p in parts[1:]:
        if p.startswith("mstd"):
            out["magnitude_std"] = float(p[4:])
        elif p.startswith("inc"):
            out["increasing"] = bool(int(p[3:]))
        elif p.startswith("m"):
            out["magnitude"] = float(p[1:])
        elif p.startswith("n"):
            out["num_layers"] = int(p[1:])
        elif p.startswith("p"):
            out["prob"] = float(p[1:])
        else:
            raise ValueError(f"unsupported RandAugment option {p!r} in {config!r}")
    if not out["increasing"]:
        raise ValueError(f"only the 'inc1' op set (the paper's) is implemented on tensors, got {config!r}")
    return out


def _const(values, like):
    """A small constant on ``like``'s device, written there by fill kernels: ``new_tensor`` would be a blocking
    copy from host memory, after which PyTorch waits for the device."""
    out = like.new_empty(len(values))
    for i, v in enumerate(values):
        out[i] = v
    return out


def _gray(x):  # PIL's L conversion (ITU-R 601-2 luma)
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _mean_gray(gray):  # ImageEnhance.Contrast's degenerate: the rounded mean of the L image
    return (gray.mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()


def _blend(degenerate, x, factor):  # degenerate + factor * (x - degenerate), in one new tensor
    return (x - degenerate).mul_(factor.view(-1, 1, 1, 1)).add_(degenerate).clamp_(0, 255)


def _enhance_factor(level, sign):
    return (1.0 + sign * level * 0.9).clamp(min=0.1)


def _smooth(x):
    """PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13) inside, the border kept, as ImageEnhance.Sharpness."""
    k = x.new_ones(3, 3)  # made on the device: x.new_tensor(...) would be a blocking copy
    k[1, 1] = 5
    out = F.conv2d(x, k.div_(13).expand(x.shape[1], 1, 3, 3), padding=1, groups=x.shape[1])
    rows, cols = slice(None, None, max(x.shape[2] - 1, 1)), slice(None, None, max(x.shape[3] - 1, 1))  # first, last
    out[:, :, rows] = x[:, :, rows]
    out[:, :, :, cols] = x[:, :, :, cols]
    return out


def _point(name, v, level, sign, lo, hi, mean):
    """A point op on the values v (n, 3, ...), given each image's per-channel range (lo, hi) and mean grey level."""
    if name == "AutoContrast":
        scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
        return torch.where(hi > lo, (v - lo) * scale, v)
    if name == "Invert":
        return 255.0 - v
    if name == "PosterizeIncreasing":
        shift = (8 - (4 - (level * 4).long())).clamp(0, 8).float().view(-1, 1, 1, 1)  # bits kept: 4 - int(4 level)
        step = torch.pow(2.0, shift)
        return torch.floor(v / step) * step
    if name == "SolarizeIncreasing":
        thresh = (256 - (level * 256).long().clamp(max=256)).float().view(-1, 1, 1, 1)
        return torch.where(v >= thresh, 255.0 - v, v)
    if name == "SolarizeAdd":
        add = (level * 110).long().clamp(max=128).float().view(-1, 1, 1, 1)
        return torch.where(v < 128, (v + add).clamp(max=255), v)
    if name == "ContrastIncreasing":
        return _blend(mean.expand_as(v), v, _enhance_factor(level, sign))
    if name == "BrightnessIncreasing":
        return _blend(torch.zeros_like(v), v, _enhance_factor(level, sign))
    raise ValueError(f"unknown point op {name}")


def _matrix(name, level, sign, h, w):
    """The op's affine map (n, 2, 3), PIL's convention: output pixel centres -> input positions (pixels);
    the identity for name None."""
    if name == "Rotate":
        theta = -torch.deg2rad(sign * level * 30.0)
        cos, sin = torch.cos(theta), torch.sin(theta)
        cx, cy = w / 2.0, h / 2.0
        return torch.stack([torch.stack([cos, sin, cx - cos * cx - sin * cy], -1),
                            torch.stack([-sin, cos, cy + sin * cx - cos * cy], -1)], 1)
    mats = level.new_zeros(level.shape[0], 2, 3)
    mats[:, 0, 0] = mats[:, 1, 1] = 1
    if name is not None:  # shears and translations move one entry of the identity
        row, col, scale, size = {"ShearX": (0, 1, 0.3, 1), "ShearY": (1, 0, 0.3, 1), "TranslateXRel": (0, 2, 0.45, w),
                                 "TranslateYRel": (1, 2, 0.45, h)}[name]
        mats[:, row, col] = sign * level * scale * size
    return mats


def _affine(x, mats, bicubic):
    """Warp with PIL's convention: ``mats`` (n, 2, 3) map output pixel centres to input positions (pixels);
    image i is interpolated bicubically where ``bicubic[i]``, else bilinearly."""
    n, _, h, w = x.shape
    a, b, c = mats[:, 0, 0], mats[:, 0, 1], mats[:, 0, 2]
    d, e, f = mats[:, 1, 0], mats[:, 1, 1], mats[:, 1, 2]
    # Pixel coordinates (continuous, centres at +0.5) -> grid_sample's normalised coordinates (align_corners=False).
    theta = torch.stack([torch.stack([a, b * h / w, a + b * h / w + 2 * c / w - 1], -1),
                         torch.stack([d * w / h, e, d * w / h + e + 2 * f / h - 1], -1)], 1)
    grid = F.affine_grid(theta, (n, 3, h, w), align_corners=False)
    fill = _const(FILL, x).view(1, 3, 1, 1)
    shifted = x - fill
    # Both interpolations of every image, picked per image: warping only the images of one kind needs their
    # number on the host.
    sample = lambda mode: F.grid_sample(shifted, grid, mode=mode, padding_mode="zeros", align_corners=False)
    bilinear = sample("bilinear")
    return torch.where(bicubic.view(-1, 1, 1, 1), sample("bicubic"), bilinear, out=bilinear).add_(fill).clamp_(0, 255)


def _apply(name, x, mag, sign, bicubic):
    """One op on the images x (n, 3, H, W) float [0, 255], with per-image magnitude in [0, 10] and sign +-1."""
    level = mag / 10.0
    if name == "Equalize":
        return TF.equalize(x.round().to(torch.uint8)).float()
    if name == "ColorIncreasing":
        return _blend(_gray(x).round(), x, _enhance_factor(level, sign))
    if name == "SharpnessIncreasing":
        return _blend(_smooth(x), x, _enhance_factor(level, sign))
    if name in GEOMETRIC:
        return _affine(x, _matrix(name, level, sign, x.shape[2], x.shape[3]), bicubic)
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    return _point(name, x, level, sign, lo, hi, _mean_gray(_gray(x).round()))


def _equalize_lut(hist, top):
    """PIL's ImageOps.equalize table from per-channel histograms (..., 256) and the brightest level present in each:
    the pixels below each level over a step of (pixels - those at the top level) / 255, rounded; the identity
    where that step is 0."""
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, top)) // 255
    lut = ((hist.cumsum(-1) - hist + step // 2) // step.clamp(min=1)).clamp(max=255)
    return torch.where(step > 0, lut, torch.arange(256, device=hist.device))


def _layer(x, kind, mag, sign, bicubic):
    """One RandAugment layer: image i gets OPS[kind[i]] (none where kind[i] == len(OPS)), as ``_apply`` gives it."""
    n, _, h, w = x.shape
    level = mag / 10.0
    drew = lambda names: functools.reduce(torch.logical_or, [kind == OPS.index(k) for k in names]).view(-1, 1, 1, 1)
    # Point ops: per image and channel, a table over the 256 grey levels, picked by kind, looked up by one gather.
    levels = x.long().view(n, 3, h * w)  # a view, for contiguous and channels_last images alike
    hist = torch.zeros(n, 3, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(2, levels, torch.ones(1, dtype=torch.long, device=x.device).expand_as(levels))
    present = (hist > 0).int()
    top = 255 - present.flip(2).argmax(2, keepdim=True)
    lo, hi = present.argmax(2).view(n, 3, 1, 1).to(x.dtype), top.view(n, 3, 1, 1).to(x.dtype)  # = amin, amax
    gray = _gray(x).round_()
    mean = _mean_gray(gray)
    ramp = torch.arange(256, dtype=x.dtype, device=x.device).expand(n, 3, 1, 256)
    tables = {k: _point(k, ramp, level, sign, lo, hi, mean).round() for k in POINT if k != "Equalize"}
    tables["Equalize"] = _equalize_lut(hist, top).to(x.dtype).view(n, 3, 1, 256)
    table = torch.stack([tables.get(k, ramp) for k in OPS] + [ramp], 1)  # (n, kinds, 3, 1, 256)
    table = table.gather(1, kind.view(n, 1, 1, 1, 1).expand(n, 1, 3, 1, 256)).view(n, 3, 256)
    looked_up = torch.empty_like(x)
    torch.gather(table, 2, levels, out=looked_up.view(n, 3, h * w))
    # Color and Sharpness: one blend, with the grey image or the smoothed one as base.
    smooth = _smooth(x)
    blended = _blend(torch.where(drew(["ColorIncreasing"]), gray, smooth, out=smooth), x, _enhance_factor(level, sign))
    # Geometric ops: one warp, each image by its own op's map (the identity where it drew no geometric op).
    identity = _matrix(None, level, sign, h, w)
    mats = torch.stack([_matrix(k, level, sign, h, w) if k in GEOMETRIC else identity for k in OPS + (None,)], 1)
    warped = _affine(x, mats.gather(1, kind.view(n, 1, 1, 1).expand(n, 1, 2, 3)).squeeze(1), bicubic)
    # Written into blended (x's layout, as the next layer's x then is): on a CPU, a new batch-sized tensor costs
    # page faults as well as its pass.
    out = torch.where(drew(BLENDS), blended, looked_up, out=blended)
    return torch.where(drew(GEOMETRIC), warped, out, out=out).round_()


def rand_augment(x: torch.Tensor, magnitude: float = 9.0, magnitude_std: float = 0.5, num_layers: int = 2,
                 prob: float = 0.5, generator: torch.Generator | None = None, **_) -> torch.Tensor:
    """RandAugment on a batch (B, 3, H, W) of float images holding whole grey levels in [0, 255] (a uint8 batch
    made float); returns the augmented batch. Sync-free: nothing is read back from the device."""
    b = x.shape[0]
    out = x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()  # _layer's views need either
    draw = dict(device=x.device, generator=generator)
    for _ in range(num_layers):
        op = torch.randint(len(OPS), (b,), **draw)
        applied = torch.rand(b, **draw) < prob
        mag = (magnitude + magnitude_std * torch.randn(b, **draw)).clamp(0, 10) if magnitude_std > 0 \
            else torch.full((b,), float(magnitude), device=x.device)
        sign = torch.where(torch.rand(b, **draw) > 0.5, -1.0, 1.0)
        bicubic = torch.rand(b, **draw) < 0.5  # timm picks bilinear or bicubic at random for geometric ops
        out = _layer(out, torch.where(applied, op, len(OPS)), mag, sign, bicubic)
    return out
