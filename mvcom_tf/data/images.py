"""Photographs as RGB uint8 arrays: any format TensorFlow or Pillow opens, upright, with a pixel limit.

TensorFlow decodes JPEG, PNG, BMP, GIF and WebP. What it cannot, Pillow does: the PGM/PPM/PBM of
the classic face databases (ORL, FERET, Yale), TIFF, CMYK JPEGs, and JPEGs whose EXIF orientation
says they are stored turned. Every problem is an `ImageProblem` with a reason the converters
count (`undecodable_image`, `image_too_large`, `image_too_small`), never a crash.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

# Extensions a folder source reads (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".pbm", ".pnm", ".tif",
                    ".tiff")
MAX_PIXELS = 50_000_000  # refused before decoding: a decompression bomb, or a scan no face converter wants
MIN_SIDE = 16
_TF_FORMATS = {"JPEG", "PNG", "BMP", "GIF", "WEBP"}
_EXIF_ORIENTATION = 0x0112


class ImageProblem(Exception):
    """An image that cannot be used; `reason` is a converter skip reason, `detail` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def truncation_problem(data: bytes) -> str | None:
    """Why JPEG or PNG bytes cannot be whole (None if they look complete): decoders may pad a cut file with grey."""
    if data[:2] == b"\xff\xd8":
        return None if b"\xff\xd9" in data[-16:] else "JPEG without its end marker (truncated?)"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return None if data.endswith(b"IEND\xaeB`\x82") else "PNG without its IEND chunk (truncated?)"
    return None


def read_rgb(path: str) -> np.ndarray:
    """The image file at `path` (any tf.io.gfile path) as `decode_rgb` returns it; raises ImageProblem, or what
    tf.io.gfile raises for a file it cannot open."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as f:
        return decode_rgb(f.read())


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 [H, W, 3] RGB of encoded image bytes, turned upright by its EXIF orientation; raises ImageProblem."""
    from PIL import Image, ImageOps

    problem = truncation_problem(data)
    if problem:
        raise ImageProblem("undecodable_image", problem)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's own header check (over 2x its MAX_IMAGE_PIXELS it raises instead of warning).
        raise ImageProblem("image_too_large", f"refused before decoding: {error}") from None
    except Image.UnidentifiedImageError:
        raise ImageProblem("undecodable_image", "not an image Pillow or TensorFlow reads (unknown format)") from None
    except Exception as error:  # Pillow raises many types for a broken header
        raise ImageProblem("undecodable_image", f"not an image Pillow or TensorFlow reads ({error})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageProblem("image_too_large", f"{width}x{height} pixels, over the limit of {max_pixels}")
    if min(width, height) < MIN_SIDE:
        raise ImageProblem("image_too_small", f"{width}x{height} pixels, under {MIN_SIDE} on a side")
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1) if image.format == "JPEG" else 1
    if image.format in _TF_FORMATS and image.mode in ("RGB", "L") and orientation == 1:
        return _decode_with_tensorflow(data)
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
        return np.asarray(_to_rgb(upright), np.uint8)
    except Exception as error:
        raise ImageProblem("undecodable_image", f"{image.format} image Pillow cannot decode ({error})") from None


def _decode_with_tensorflow(data: bytes) -> np.ndarray:
    import tensorflow as tf

    try:
        return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
        raise ImageProblem("undecodable_image", error.message.splitlines()[0]) from None


def _to_rgb(image):
    """RGB from any mode; transparency composited on white (a face cut-out keeps its edges)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK (Pillow inverts Adobe's CMYK), I;16, 1, YCbCr ...
