"""Reading real-world image files: the odd ones ImageNet is known for included."""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager

from PIL import Image, ImageFile, ImageOps

# Truncated files must raise, not come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """A file that is not a decodable image (empty, truncated, corrupt)."""


def load_rgb(path, max_side: int | None = None) -> Image.Image:
    """Decode ``path`` into an upright RGB image, at most ``max_side`` pixels on its longer side.

    Handles CMYK and grayscale JPEGs, PNG (or other formats) behind a .JPEG name (the decoder goes by content),
    palette and alpha images, and EXIF orientation. With ``max_side``, an image over PIL's pixel limit is decoded
    anyway (a JPEG at a reduced scale) and downscaled. Raises BadImage for anything that does not fully decode.
    """
    try:
        try:
            im = _decode(path, max_side)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            if not max_side:
                raise
            # A large photo rather than an attack: what comes back is max_side at most.
            with _pixel_limit_lifted():
                im = _decode(path, max_side)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"{type(e).__name__}: {e}") from None
    if max_side and max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC,
                       reducing_gap=None)
    return im


def _decode(path, max_side: int | None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if max_side and im.format == "JPEG" and max(im.size) > 2 * max_side:
                im.draft("RGB", (max_side, max_side))  # DCT-domain downscale: faster, still antialiased
            im.load()
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")


_pixel_limit = threading.Lock()


@contextmanager
def _pixel_limit_lifted():
    """PIL's pixel limit is a module global that its plugins read at open and load: lifted for one decode and then
    restored. The lock keeps two threads from restoring each other's lifted value."""
    with _pixel_limit:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved
