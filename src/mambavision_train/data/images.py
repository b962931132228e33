"""Reading real-world image files: the odd ones ImageNet is known for included."""

from __future__ import annotations

import warnings

from PIL import Image, ImageFile, ImageOps

# Truncated files must raise, not come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """A file that is not a decodable image (empty, truncated, corrupt)."""


def load_rgb(path, max_side: int | None = None) -> Image.Image:
    """Decode ``path`` into an upright RGB image, at most ``max_side`` pixels on its longer side.

    Handles CMYK and grayscale JPEGs, PNG (or other formats) behind a .JPEG name (the decoder goes by content),
    palette and alpha images, and EXIF orientation. Raises BadImage for anything that does not fully decode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if max_side and im.format == "JPEG" and max(im.size) > 2 * max_side:
                    im.draft("RGB", (max_side, max_side))  # DCT-domain downscale: faster, still antialiased
                im.load()
                im = ImageOps.exif_transpose(im)
                im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"{type(e).__name__}: {e}") from None
    if max_side and max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC,
                       reducing_gap=None)
    return im
