"""timm's RandAugment ``rand-m{M}-mstd{S}-inc1`` on batched tensors, per sample, on any device.

timm applies RandAugment to one PIL image at a time on the CPU. Here each image of a batch still draws its own ops,
magnitudes, signs and interpolation exactly as timm's ``RandAugment``/``AugmentOp`` do (2 layers; each op applied
with probability 0.5; magnitude ~ N(M, S) clipped to [0, 10]; the 'increasing' op set), but the images that drew
the same op are transformed together, as float tensors in [0, 255], on the device the model trains on.
Ops follow PIL's definitions (enhance blends, posterize/solarize LUTs, affine maps on pixel centres, fill
(124, 116, 104)); results are rounded to the uint8 lattice after each op as PIL's are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

FILL = (124, 116, 104)  # timm: ImageNet mean * 255, the fill of geometric ops
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
       "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
       "TranslateXRel", "TranslateYRel")


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


def _gray(x):  # PIL's L conversion (ITU-R 601-2 luma)
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(degenerate, x, factor):
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 255)


def _smooth(x):
    """PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13) inside, the border kept, as ImageEnhance.Sharpness."""
    k = x.new_tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]).div_(13).expand(x.shape[1], 1, 3, 3)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = F.conv2d(x, k, groups=x.shape[1])
    return out


def _affine(x, mats, bicubic):
    """Warp with PIL's convention: ``mats`` (n, 2, 3) map output pixel centres to input positions (pixels)."""
    n, _, h, w = x.shape
    a, b, c = mats[:, 0, 0], mats[:, 0, 1], mats[:, 0, 2]
    d, e, f = mats[:, 1, 0], mats[:, 1, 1], mats[:, 1, 2]
    # Pixel coordinates (continuous, centres at +0.5) -> grid_sample's normalised coordinates (align_corners=False).
    theta = torch.stack([torch.stack([a, b * h / w, a + b * h / w + 2 * c / w - 1], -1),
                         torch.stack([d * w / h, e, d * w / h + e + 2 * f / h - 1], -1)], 1)
    grid = F.affine_grid(theta, (n, 3, h, w), align_corners=False)
    fill = x.new_tensor(FILL).view(1, 3, 1, 1)
    out = torch.empty_like(x)
    for mode, sel in (("bicubic", bicubic), ("bilinear", ~bicubic)):
        if sel.any():
            out[sel] = F.grid_sample(x[sel] - fill, grid[sel], mode=mode, padding_mode="zeros",
                                     align_corners=False) + fill
    return out.clamp_(0, 255)


def _apply(name, x, mag, sign, bicubic):
    """One op on the images x (n, 3, H, W) float [0, 255], with per-image magnitude in [0, 10] and sign +-1."""
    level = mag / 10.0
    if name == "AutoContrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
        return torch.where(hi > lo, (x - lo) * scale, x)
    if name == "Equalize":
        return TF.equalize(x.round().to(torch.uint8)).float()
    if name == "Invert":
        return 255.0 - x
    if name == "PosterizeIncreasing":
        shift = (8 - (4 - (level * 4).long())).clamp(0, 8).float().view(-1, 1, 1, 1)  # bits kept: 4 - int(4 level)
        step = torch.pow(2.0, shift)
        return torch.floor(x / step) * step
    if name == "SolarizeIncreasing":
        thresh = (256 - (level * 256).long().clamp(max=256)).float().view(-1, 1, 1, 1)
        return torch.where(x >= thresh, 255.0 - x, x)
    if name == "SolarizeAdd":
        add = (level * 110).long().clamp(max=128).float().view(-1, 1, 1, 1)
        return torch.where(x < 128, (x + add).clamp(max=255), x)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        factor = (1.0 + sign * level * 0.9).clamp(min=0.1)
        if name == "ColorIncreasing":
            return _blend(_gray(x).round(), x, factor)
        if name == "ContrastIncreasing":
            mean = (_gray(x).round().mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()
            return _blend(mean.expand_as(x), x, factor)
        if name == "BrightnessIncreasing":
            return _blend(torch.zeros_like(x), x, factor)
        return _blend(_smooth(x), x, factor)
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    one, zero = torch.ones(n, device=x.device), torch.zeros(n, device=x.device)
    if name == "Rotate":
        theta = -torch.deg2rad(sign * level * 30.0)
        cos, sin = torch.cos(theta), torch.sin(theta)
        cx, cy = w / 2.0, h / 2.0
        mats = torch.stack([torch.stack([cos, sin, cx - cos * cx - sin * cy], -1),
                            torch.stack([-sin, cos, cy + sin * cx - cos * cy], -1)], 1)
    elif name == "ShearX":
        mats = torch.stack([torch.stack([one, sign * level * 0.3, zero], -1), torch.stack([zero, one, zero], -1)], 1)
    elif name == "ShearY":
        mats = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([sign * level * 0.3, one, zero], -1)], 1)
    elif name == "TranslateXRel":
        mats = torch.stack([torch.stack([one, zero, sign * level * 0.45 * w], -1), torch.stack([zero, one, zero], -1)], 1)
    elif name == "TranslateYRel":
        mats = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, one, sign * level * 0.45 * h], -1)], 1)
    else:
        raise ValueError(f"unknown op {name}")
    return _affine(x, mats, bicubic)


def rand_augment(x: torch.Tensor, magnitude: float = 9.0, magnitude_std: float = 0.5, num_layers: int = 2,
                 prob: float = 0.5, generator: torch.Generator | None = None, **_) -> torch.Tensor:
    """RandAugment on a batch (B, 3, H, W) of float images in [0, 255]; returns a new tensor (same layout)."""
    b = x.shape[0]
    out = x.clone()
    draw = dict(device=x.device, generator=generator)
    for _ in range(num_layers):
        op = torch.randint(len(OPS), (b,), **draw)
        applied = torch.rand(b, **draw) < prob
        mag = (magnitude + magnitude_std * torch.randn(b, **draw)).clamp(0, 10) if magnitude_std > 0 \
            else torch.full((b,), float(magnitude), device=x.device)
        sign = torch.where(torch.rand(b, **draw) > 0.5, -1.0, 1.0)
        bicubic = torch.rand(b, **draw) < 0.5  # timm picks bilinear or bicubic at random for geometric ops
        for k, name in enumerate(OPS):
            sel = applied & (op == k)
            if sel.any():
                idx = sel.nonzero().squeeze(1)
                out[idx] = _apply(name, out[idx], mag[idx], sign[idx], bicubic[idx]).round_()
    return out
