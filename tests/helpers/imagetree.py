"""Builders for small real-image folders used by the data tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo(seed: int, size=(96, 72)) -> Image.Image:
    """A real photo (scikit-image ships a few), cropped and resized differently per seed."""
    from skimage import data
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    arr = photos[seed % len(photos)]
    rng = np.random.default_rng(seed)
    h, w = arr.shape[:2]
    y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
    return Image.fromarray(arr[y:y + 3 * h // 4, x:x + 3 * w // 4]).resize(size, Image.BICUBIC)


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def nasty_tree(root: Path) -> dict:
    """train/ and val/ with two classes and every kind of odd file ImageNet has. Returns what a correct converter
    must produce: {split: {"good": {relative path: (label, (h, w))}, "bad": {relative path}}}."""
    expect = {}
    for split, n in (("train", 3), ("val", 2)):
        good, bad = {}, set()
        for label, cls in enumerate(["n01440764", "n01443537"]):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                im = photo(10 * label + i + (100 if split == "val" else 0))
                (d / f"plain_{i}.JPEG").write_bytes(jpeg_bytes(im))
                good[f"{split}/{cls}/plain_{i}.JPEG"] = (label, (72, 96))
        d = root / split / "n01440764"
        (d / "cmyk.JPEG").write_bytes(jpeg_bytes(photo(1).convert("CMYK")))
        (d / "gray.JPEG").write_bytes(jpeg_bytes(photo(2).convert("L")))
        buf = io.BytesIO()
        photo(3).save(buf, "PNG")
        (d / "png_inside.JPEG").write_bytes(buf.getvalue())
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        (d / "rotated.JPEG").write_bytes(jpeg_bytes(photo(4, size=(96, 48)), exif=exif.tobytes()))
        good.update({f"{split}/n01440764/{n}": (0, (72, 96)) for n in ("cmyk.JPEG", "gray.JPEG", "png_inside.JPEG")})
        good[f"{split}/n01440764/rotated.JPEG"] = (0, (96, 48))  # upright: taller than wide
        whole = jpeg_bytes(photo(5))
        (d / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])
        (d / "empty.JPEG").write_bytes(b"")
        bad |= {f"{split}/n01440764/truncated.JPEG", f"{split}/n01440764/empty.JPEG"}
        expect[split] = {"good": good, "bad": bad}
    return expect
