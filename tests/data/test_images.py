"""load_image: pixel values after each mode conversion, downscaling, and each failure reason."""
import io

import numpy as np
import pytest
from PIL import Image

from balcap_jax.data import images


def _write(tmp_path, img, fmt, name="x"):
    p = tmp_path / name
    img.save(p, format=fmt)
    return str(p)


def test_rgb_png_kept_byte_exact(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    p = _write(tmp_path, Image.fromarray(arr), "PNG")
    out = images.load_image(p)
    assert out.fixes == () and out.data == open(p, "rb").read()
    np.testing.assert_array_equal(out.to_array(), arr)


def test_rgba_composited_on_white(tmp_path):
    arr = np.zeros((24, 8, 4), np.uint8)
    arr[..., 0] = 200
    arr[0:8, :, 3] = 255    # opaque red band
    arr[8:16, :, 3] = 0     # fully transparent -> white
    arr[16:24, :, 3] = 128  # half: 200*128/255 + 255*127/255
    p = _write(tmp_path, Image.fromarray(arr, "RGBA"), "PNG")
    out = images.load_image(p)
    assert out.fixes == ("converted_RGBA",)
    got = out.to_array().astype(int)  # re-encoded as JPEG: a few levels of error
    tol = 6
    assert np.abs(got[4] - [200, 0, 0]).max() <= tol
    assert np.abs(got[12] - [255, 255, 255]).max() <= tol
    half = [200 * 128 / 255 + 255 * 127 / 255, 255 * 127 / 255, 255 * 127 / 255]
    assert np.abs(got[20] - half).max() <= tol


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "LA"])
def test_modes_convert_to_rgb(tmp_path, mode):
    grey = np.full((6, 8), 100, np.uint8)
    rgb = Image.fromarray(np.stack([grey] * 3, -1))
    if mode == "I;16":
        img, fmt = Image.fromarray(grey.astype(np.uint16) * 257), "PNG"
    else:
        img, fmt = rgb.convert(mode), ("JPEG" if mode == "CMYK" else "PNG")
    p = _write(tmp_path, img, fmt)
    opened = Image.open(p).mode
    out = images.load_image(p)
    assert out.fixes == (f"converted_{opened}",)
    got = out.to_array()
    assert got.shape == (6, 8, 3)
    # Grey 100 survives every conversion (CMYK via PIL's formula, JPEG within a few levels).
    assert np.abs(got.astype(int) - 100).max() <= 4, (mode, got[0, 0])


def test_downscale_keeps_aspect_and_bomb_limit(tmp_path):
    p = _write(tmp_path, Image.new("RGB", (300, 100), (5, 6, 7)), "JPEG")
    out = images.load_image(p, max_side=60)
    assert (out.width, out.height, out.fixes) == (60, 20, ("resized",))
    assert out.to_array().shape == (20, 60, 3)
    # Above PIL's own bomb limit but under ours: loads without a warning or error.
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000
    try:
        assert images.load_image(p, max_side=60).width == 60
        with pytest.raises(images.BadImage) as e:
            images.load_image(p, max_pixels=29_999)
        assert e.value.reason == images.TOO_MANY_PIXELS and "300x100" in e.value.detail
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert Image.MAX_IMAGE_PIXELS == old


def test_failure_reasons(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), np.uint8)).save(
        buf, format="PNG")
    cases = {"missing": (None, images.MISSING), "zero": (b"", images.EMPTY),
             "trunc": (buf.getvalue()[:-200], images.TRUNCATED),
             "text": (b"hello, not an image", images.UNDECODABLE)}
    for name, (data, reason) in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(images.BadImage) as e:
            images.load_image(str(p))
        assert e.value.reason == reason, name
        assert str(p) in str(e.value)


def test_resolve_path():
    assert images.resolve_path("a/b.jpg", "/root") == "/root/a/b.jpg"
    assert images.resolve_path("/abs/b.jpg", "/root") == "/abs/b.jpg"
    assert images.resolve_path("b.jpg", None) == "b.jpg"
