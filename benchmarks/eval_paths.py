"""How far the FFCV eval path lands from the paper-exact one (timm's PIL bicubic transform on the original files).

Two measurements on real images that ship with our packages (no ImageNet here):
1. pixels: scikit-image's photos saved as JPEG (q95, their own sizes, like ImageNet originals), converted to FFCV with
   the converter's defaults (longer side 512, JPEG q90), eval crops at 224 for crop_pct 1.0 / 0.875 / 0.93 from
   both paths: PSNR and mean absolute difference in grey levels;
2. predictions: a trained checkpoint (default: the demo's, ``make demo``) evaluated on the digits' validation
   split through both paths: top-1 of each and the fraction of images whose prediction changes.

    cd benchmarks && ../.venv/bin/python eval_paths.py [--checkpoint ../runs/demo/checkpoints/best.pth.tar]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch

import mambavision_train  # noqa: F401
from mambavision_train.data import DataConfig, build_loader, digits
from mambavision_train.data.convert import ConvertOptions, convert
from mambavision_train.models import load_pretrained


def photo_tree(root: Path) -> Path:
    from PIL import Image
    from skimage import data
    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
             "colorwheel", "camera", "coins"]
    for i, name in enumerate(names):
        d = root / "val" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img = getattr(data, name)()
        img = img[..., :3] if img.ndim == 3 else np.stack([img] * 3, -1)
        Image.fromarray(img).save(d / f"{name}.JPEG", quality=95)
    return root


def crops(cfg: DataConfig, res: int, crop_pct: float) -> torch.Tensor:
    loader, _ = build_loader(cfg, None, train=False, batch_size=1, res=res, crop_pct=crop_pct)
    return torch.cat([x.float() for x, _ in loader])  # copied at once: FFCV reuses its output buffers


def pixel_agreement(tmp: Path):
    tree = photo_tree(tmp / "photos")
    convert(tree, tmp / "ffcv", splits=("val",), opts=ConvertOptions(workers=2))
    folder = DataConfig(kind="folder", root=str(tree), num_classes=2, num_workers=0)
    ffcv = DataConfig(kind="ffcv", root=str(tmp / "ffcv"), num_classes=2, num_workers=1)
    print("| crop_pct | PSNR FFCV vs timm (dB) | mean abs diff (grey levels) |\n|---|---|---|")
    for crop_pct in (1.0, 0.875, 0.93):
        a, b = crops(folder, 224, crop_pct), crops(ffcv, 224, crop_pct)
        mse = ((a - b) ** 2).mean().item()
        print(f"| {crop_pct} | {10 * np.log10(255 ** 2 / mse):.2f} | {(a - b).abs().mean().item():.2f} |")


@torch.no_grad()
def predictions(checkpoint: Path, kind: str):
    root = digits.prepare(digits.default_root())
    cfg = DataConfig(kind=kind, root=str(root), folder_root=str(root / "images"), num_classes=10, num_workers=2)
    model = timm.create_model("mambavision_demo", img_size=32).eval()  # the demo trains at 32 px
    load_pretrained(model, checkpoint, ema=True)
    loader, aug = build_loader(cfg, None, train=False, batch_size=200, res=32)
    preds, labels = zip(*[(model(aug(x, y)[0]).argmax(1), y) for x, y in loader])
    return torch.cat(preds), torch.cat(labels)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path, default=Path(__file__).parents[1] / "runs/demo/checkpoints/best.pth.tar")
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        pixel_agreement(Path(tmp))
    (pf, y), (pv, _) = predictions(args.checkpoint, "folder"), predictions(args.checkpoint, "ffcv")
    top1 = lambda p: 100 * (p == y).float().mean().item()
    print(f"\n{args.checkpoint} (EMA) on digits val ({len(y)} images): top-1 timm/PIL {top1(pf):.2f}, "
          f"FFCV {top1(pv):.2f}, predictions that differ {100 * (pf != pv).float().mean().item():.2f}%")


if __name__ == "__main__":
    main()
