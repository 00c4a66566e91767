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
- PIL's decompression-bomb limit is replaced by our own `max_pixels`, checked from the header
  before decoding: the header is parsed by PIL's format plugins directly, so PIL's process-wide
  `Image.MAX_IMAGE_PIXELS` is never read or changed (builds decode on several threads, and the
  caller's own PIL settings stay theirs). Anything above it is skipped, anything below it loads
  (JPEGs decode straight at reduced size).
- Only regular files are read (a named pipe or a device would block the build), at most
  `max_bytes` of them.
- Images that needed no change keep their original JPEG/PNG bytes; changed ones are re-encoded
  as JPEG (quality 95, no chroma subsampling).
"""
from __future__ import annotations

import dataclasses
import io
import os
import stat
import struct

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_SIDE = 2048
DEFAULT_MAX_PIXELS = 1 << 28  # 268M pixels (16384 x 16384); PIL's own default warns at 89M
DEFAULT_MAX_BYTES = 1 << 28   # 256 MiB per image file
_JPEG_QUALITY = 95
_WHITE = (255, 255, 255)

# Reasons an image is skipped (names used as counter keys in the build summary).
MISSING = "missing_image"
EMPTY = "empty_image"
TRUNCATED = "truncated_image"
UNDECODABLE = "undecodable_image"
TOO_MANY_PIXELS = "too_many_pixels"
NOT_A_FILE = "not_a_regular_file"
BAD_PATH = "bad_image_path"
OUTSIDE_ROOT = "image_outside_root"
FILE_TOO_LARGE = "file_too_large"

Image.init()   # register every format plugin once, before builder threads open headers


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
    """Parses the header with the first format plugin that accepts the bytes, as Image.open
    does but without its decompression-bomb check (which reads a process-wide limit); our own
    max_pixels check follows. Nothing is decoded yet."""
    prefix, fp = data[:16], io.BytesIO(data)
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        ok = not accept or accept(prefix)
        if not ok or isinstance(ok, str):
            continue
        fp.seek(0)
        try:
            return factory(fp, path)
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue              # not this format after all: try the next plugin
        except Exception as e:  # noqa: BLE001 - any parser failure means the header is unusable
            reason = TRUNCATED if "truncat" in str(e).lower() else UNDECODABLE
            raise BadImage(reason, f"{path}: {type(e).__name__}: {e}") from None
    raise BadImage(UNDECODABLE, f"{path}: not a recognised image format")


def _read(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes. Opened non-blocking and checked on
    the open descriptor, so a named pipe (or a file swapped for one) cannot block the build."""
    if "\0" in path:
        raise BadImage(BAD_PATH, f"{path!r}: the path holds a NUL byte")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BadImage(MISSING, f"{path}: file not found (check image_root)") from None
    except IsADirectoryError:
        raise BadImage(MISSING, f"{path}: is a directory, not an image file") from None
    except OSError as e:
        raise BadImage(MISSING, f"{path}: cannot read ({e})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BadImage(MISSING, f"{path}: is a directory, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise BadImage(NOT_A_FILE, f"{path}: not a regular file (a pipe, socket or device)")
        if st.st_size > max_bytes:
            raise BadImage(FILE_TOO_LARGE, f"{path}: {st.st_size} bytes is over "
                           f"max_image_bytes={max_bytes}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadImage(FILE_TOO_LARGE, f"{path}: grew past max_image_bytes={max_bytes}")
    return data


def _decode(img: Image.Image, path: str) -> None:
    try:
        img.load()
    except Image.DecompressionBombError as e:   # a frame (GIF, ICO) larger than its header
        raise BadImage(TOO_MANY_PIXELS, f"{path}: {e}") from None
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
               max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> LoadedImage:
    """Reads `path` into RGB JPEG/PNG bytes with longer side <= max_side; raises BadImage."""
    if max_side < 1 or max_pixels < 1 or max_bytes < 1:
        raise ValueError(f"max_side={max_side}, max_pixels={max_pixels} and "
                         f"max_bytes={max_bytes} must be positive")
    data = _read(path, max_bytes)
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


def inside_root(path: str, image_root: str) -> bool:
    """Whether `path` (as resolve_path returns it) lies under image_root, lexically: `..` and
    absolute paths elsewhere do not; a symlinked folder inside the root does (the layout of the
    user's own disk is theirs to choose)."""
    root = os.path.normpath(os.path.abspath(os.path.expanduser(image_root)))
    full = os.path.normpath(os.path.abspath(path))
    return full == root or full.startswith(root.rstrip(os.sep) + os.sep)
