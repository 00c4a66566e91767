"""Reading one image file into clean RGB bytes, or a named reason why not.

Every dataset build and the re-captioning tool go through `load_image`, so a bad file is handled
the same way everywhere: the caller counts `BadImage.reason` and moves on; the fixes applied to a
good image (mode conversion, EXIF rotation, downscaling) come back as names to count too.

Choices (documented because they change pixels):
- Transparency (RGBA, LA, PA, P with a transparent colour) is composited on WHITE: captions are
  about visible content, and white is what most viewers show behind a transparent image; black
  would hide dark line art and text, which are common in transparent images.
- 16-bit grey (I;16*) is scaled by 1/257 to 8 bits; 32-bit int / float grey ("I", "F") is
  min-max stretched to 0..255 (their range has no fixed meaning).
- CMYK is converted with PIL's formula (ICC profiles are ignored).
- Images whose longer side exceeds `max_side` are downscaled to it, keeping the aspect ratio.
- PIL's decompression-bomb limit is replaced by our own `max_pixels` (checked from the header,
  before decoding); anything above it is skipped, anything below it loads (JPEGs decode straight
  at reduced size).
- Images that needed no change keep their original JPEG/PNG bytes; changed ones are re-encoded
  as JPEG (quality 95, no chroma subsampling).
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_SIDE = 2048
DEFAULT_MAX_PIXELS = 1 << 28  # 268M pixels (16384 x 16384); PIL's own default warns at 89M
_JPEG_QUALITY = 95
_WHITE = (255, 255, 255)

# Reasons an image is skipped (names used as counter keys in the build summary).
MISSING = "missing_image"
EMPTY = "empty_image"
TRUNCATED = "truncated_image"
UNDECODABLE = "undecodable_image"
TOO_MANY_PIXELS = "too_many_pixels"


class BadImage(Exception):
    """An image that cannot be used; `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    data: bytes            # JPEG or PNG bytes of an RGB image
    width: int
    height: int
    fixes: tuple[str, ...]  # e.g. ("converted_RGBA", "resized"); empty if the file was used as is

    def to_array(self) -> np.ndarray:
        with Image.open(io.BytesIO(self.data)) as img:
            return np.asarray(img.convert("RGB"))


def _open(data: bytes, path: str) -> Image.Image:
    # Our max_pixels check replaces PIL's bomb check, which would warn or raise before we can
    # look at the size; header parsing does not decode pixels, so this is cheap.
    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage(UNDECODABLE, f"{path}: not a recognised image format") from None
    except Exception as e:  # noqa: BLE001 - any parser failure means the header is unusable
        reason = TRUNCATED if "truncat" in str(e).lower() else UNDECODABLE
        raise BadImage(reason, f"{path}: {type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _decode(img: Image.Image, path: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        msg = str(e).lower()
        reason = TRUNCATED if ("truncat" in msg or "broken data stream" in msg
                               or "end of file" in msg) else UNDECODABLE
        raise BadImage(reason, f"{path}: {type(e).__name__}: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path: str, *, max_side: int = DEFAULT_MAX_SIDE,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Reads `path` into RGB JPEG/PNG bytes with longer side <= max_side; raises BadImage."""
    if max_side < 1 or max_pixels < 1:
        raise ValueError(f"max_side={max_side} and max_pixels={max_pixels} must be positive")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadImage(MISSING, f"{path}: file not found (check image_root)") from None
    except IsADirectoryError:
        raise BadImage(MISSING, f"{path}: is a directory, not an image file") from None
    except OSError as e:
        raise BadImage(MISSING, f"{path}: cannot read ({e})") from None
    if not data:
        raise BadImage(EMPTY, f"{path}: zero-byte file")

    img = _open(data, path)
    width, height = img.size
    if width < 1 or height < 1:
        raise BadImage(UNDECODABLE, f"{path}: image has size {width}x{height}")
    if width * height > max_pixels:
        raise BadImage(TOO_MANY_PIXELS, f"{path}: {width}x{height} = {width * height} pixels is "
                       f"over max_pixels={max_pixels} (raise it if the image is genuine)")
    fmt = img.format
    fixes = []
    if max(width, height) > max_side and fmt == "JPEG":
        # Decode JPEGs at a reduced DCT scale (never below the target size): far less memory.
        img.draft(img.mode, (max_side, max_side))
    _decode(img, path)

    if img.getexif().get(0x0112, 1) not in (1, None):
        img = ImageOps.exif_transpose(img)
        fixes.append("exif_rotated")
    if img.mode != "RGB":
        fixes.append(f"converted_{img.mode}")
        img = _to_rgb(img)
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        fixes.append("resized")

    if not fixes and fmt in ("JPEG", "PNG"):
        return LoadedImage(data, img.width, img.height, ())
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)  # 4:4:4: no colour bleed
    return LoadedImage(buf.getvalue(), img.width, img.height, tuple(fixes))


def resolve_path(path: str, image_root: str | None) -> str:
    """Absolute/`~` paths are kept; relative ones are joined to image_root."""
    path = os.path.expanduser(path)
    if os.path.isabs(path) or not image_root:
        return path
    return os.path.join(os.path.expanduser(image_root), path)
