"""Image processors in numpy/PIL whose outputs equal transformers' PIL-backend processors.

Qwen2-VL (`QwenImageProcessor` = `Qwen2VLImageProcessor`): convert to RGB (transparency composited
onto white), `smart_resize` to multiples of patch*merge, PIL bicubic resize of the uint8 image,
rescale by 1/255 in float64 then cast to float32, normalise in float32, flatten into patches
ordered (merge-block row, merge-block col, row in block, col in block) x (C, T, P, P).

LLaVA-1.5 (`LlavaImageProcessor` = `LlavaImageProcessor(do_pad=True)`): pad to a centred square
with the mean colour (int(m*255) per channel), resize the shortest edge (bicubic), centre crop,
rescale and normalise with the CLIP statistics; output [N, 3, H, W].

The float steps go through a 256-entry lookup table computing exactly transformers' operations,
so outputs are bit-identical (tests assert atol 1e-6). transformers' torchvision backend (used
when torchvision is installed) resizes differently; the PIL backend is the reference here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ImageLike = Any  # PIL.Image.Image or np.ndarray uint8 [H, W], [H, W, 1|3|4]



# --------------------------------------------------------------------------- image decoding

def to_rgb(image: ImageLike) -> Image.Image:
    """An RGB PIL image, as transformers' `convert_to_rgb` makes it.

    PIL: images with an alpha band or a `transparency` entry (palette/greyscale with a
    transparent colour) are alpha-composited onto white; others use `Image.convert("RGB")`.
    numpy (uint8, channels last): 1 channel repeated, 4 channels blended onto white in float64
    and rounded, as transformers does for arrays.
    """
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image array has dtype {image.dtype}; pass uint8 [H, W, C] pixels "
                            "(e.g. (x * 255).round().astype(np.uint8)) or a PIL image")
        arr = image[..., None] if image.ndim == 2 else image
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image array has shape {image.shape}; expected channels-last "
                             "[H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        elif arr.shape[-1] == 4:
            alpha = arr[..., 3:4] / 255
            arr = np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr))
    raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")


def _normalize_lut(image_mean: Sequence[float], image_std: Sequence[float],
                   rescale_factor: float) -> np.ndarray:
    """[3, 256] float32: the normalised value of each uint8 level per channel.

    Same arithmetic as transformers: uint8 -> float64 * rescale -> float32, then
    (x - float32(mean)) / float32(std) in float32.
    """
    levels = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean = np.asarray(image_mean, np.float32)[:, None]
    std = np.asarray(image_std, np.float32)[:, None]
    return ((levels[None, :] - mean) / std).astype(np.float32)


# --------------------------------------------------------------------------- Qwen2-VL images

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within [min, max] pixels,
    aspect ratio kept as closely as possible (transformers' `smart_resize`, same rounding)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} is empty")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {height}x{width}: aspect ratio must be at most 200, got "
                         f"{max(height, width) / min(height, width):.1f}; crop or pad it first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar



def _read_preprocessor_config(path: str, cls_name: str) -> dict:
    """`<path>/preprocessor_config.json` of a Hugging Face checkpoint directory."""
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} not found: pass the checkpoint directory that holds "
                                f"preprocessor_config.json, or build {cls_name}(...)")
    with open(file) as f:
        return json.load(f)


def _from_kwargs(cls, kw: dict, config: dict):
    """The processor from parsed fields plus the config's mean/std; unset fields default."""
    for k in ("image_mean", "image_std"):
        if config.get(k) is not None:
            kw[k] = tuple(config[k])
    return cls(**{k: v for k, v in kw.items() if v is not None})

@dataclasses.dataclass(frozen=True)
class QwenImageProcessor:
    """numpy/PIL twin of transformers' `Qwen2VLImageProcessor` (defaults equal to its defaults;
    the Qwen2.5-VL checkpoints' preprocessor_config.json uses max_pixels=12845056)."""
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    def __post_init__(self):
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")
        object.__setattr__(self, "_lut", _normalize_lut(self.image_mean, self.image_std,
                                                        self.rescale_factor))

    @classmethod
    def from_config(cls, config: dict) -> "QwenImageProcessor":
        """From a preprocessor_config.json dict (v4 `min_pixels`/`max_pixels` or v5 `size`)."""
        size = config.get("size") or {}
        kw = dict(min_pixels=config.get("min_pixels", size.get("shortest_edge")),
                  max_pixels=config.get("max_pixels", size.get("longest_edge")),
                  **{k: config.get(k) for k in ("patch_size", "temporal_patch_size", "merge_size",
                                                "rescale_factor", "resample")})
        return _from_kwargs(cls, kw, config)

    @classmethod
    def from_pretrained(cls, path: str) -> "QwenImageProcessor":
        """From `<path>/preprocessor_config.json` of a Hugging Face checkpoint directory."""
        return cls.from_config(_read_preprocessor_config(path, cls.__name__))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def with_max_tokens(self, max_tokens: int) -> "QwenImageProcessor":
        """This processor with max_pixels lowered so no image gets more than `max_tokens`
        image tokens (min_pixels follows if it was above); 0 leaves it as it is."""
        if max_tokens <= 0:
            return self
        cap = min(self.max_pixels, int(max_tokens) * self.factor ** 2)
        return dataclasses.replace(self, max_pixels=cap, min_pixels=min(self.min_pixels, cap))

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The size an image is resized to: transformers' `smart_resize`, then, only where that
        still exceeds max_pixels (a side clamped up to one factor for a long thin image), the
        longer side cut by whole factors until the area fits. transformers would keep the excess;
        we never do, so an image never outgrows the fixed slot its max_pixels sizes."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        f = self.factor
        while h * w > self.max_pixels and max(h, w) > f:
            if h >= w:
                h -= f
            else:
                w -= f
        return h, w

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of an image of this size."""
        h, w = self.resized(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """Number of `<|image_pad|>` tokens (merged patches) for an image of this size."""
        t, h, w = self.grid_thw(height, width)
        return t * h * w // self.merge_size ** 2

    def preprocess(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (patches float32 [t*h*w, C*T*P*P], grid (t, h, w))."""
        rgb = to_rgb(image)
        width, height = rgb.size
        rh, rw = self.resized(height, width)
        pixels = np.asarray(rgb.resize((rw, rh), resample=self.resample))  # [H, W, 3] uint8
        chw = self._lut[np.arange(3)[:, None, None], pixels.transpose(2, 0, 1)]  # [3, H, W] f32
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = rh // p, rw // p
        x = chw.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        # An image is one frame repeated over the temporal patch: (.., C, T, P, P).
        x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (tp, p, p))
        return np.ascontiguousarray(x.reshape(gh * gw, 3 * tp * p * p)), (1, gh, gw)

    def __call__(self, images: Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """A flat list of images -> {pixel_values [sum N_i, C*T*P*P], image_grid_thw [n, 3]}."""
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        if len(images) == 0:
            raise ValueError("QwenImageProcessor got an empty image list")
        out = [self.preprocess(im) for im in images]
        return {"pixel_values": np.concatenate([o[0] for o in out], axis=0),
                "image_grid_thw": np.asarray([o[1] for o in out], np.int32)}


def preprocess_image(image: ImageLike, **kwargs) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Functional form of `QwenImageProcessor(**kwargs).preprocess(image)`."""
    return QwenImageProcessor(**kwargs).preprocess(image)




# --------------------------------------------------------------------------- LLaVA-1.5 images

def pad_to_square(pixels: np.ndarray, color: Sequence[int]) -> np.ndarray:
    """uint8 [H, W, 3] -> [S, S, 3], S = max(H, W), image centred (offset (S - side) // 2)."""
    h, w = pixels.shape[:2]
    if h == w:
        return pixels
    s = max(h, w)
    out = np.empty((s, s, pixels.shape[2]), pixels.dtype)
    out[...] = np.asarray(color, pixels.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = pixels
    return out


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side = `size`, the longer truncated: int(size * long / short)."""
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def center_crop(pixels: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """Centre crop [H, W, C] to crop=(h, w); sides shorter than the crop are zero-padded
    (centred, extra row/column first), as transformers' `center_crop` does."""
    ch, cw = crop
    h, w = pixels.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    canvas = np.zeros((nh, nw) + pixels.shape[2:], pixels.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas[tp:tp + h, lp:lp + w] = pixels
    top, left = top + tp, left + lp
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


@dataclasses.dataclass(frozen=True)
class LlavaImageProcessor:
    """numpy/PIL twin of transformers' `LlavaImageProcessor(do_pad=True)` with LLaVA-1.5's
    sizes (shortest edge 336, crop 336x336, CLIP mean/std, bicubic). `do_pad` pads to a square
    with the mean colour first (LLaVA-1.5's "pad" aspect mode); after it the crop is a no-op."""
    size: int = 336
    crop_size: tuple[int, int] = (336, 336)
    do_pad: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    def __post_init__(self):
        if self.size < 1 or min(self.crop_size) < 1:
            raise ValueError(f"size={self.size} and crop_size={self.crop_size} must be positive")
        object.__setattr__(self, "_lut", _normalize_lut(self.image_mean, self.image_std,
                                                        self.rescale_factor))

    @property
    def pad_color(self) -> tuple[int, ...]:
        """The padding colour in uint8, `int(m * 255)` per channel (truncated, as transformers)."""
        return tuple(int(m * 255) for m in self.image_mean)

    @classmethod
    def from_config(cls, config: dict) -> "LlavaImageProcessor":
        """From a preprocessor_config.json dict (CLIPImageProcessor / LlavaImageProcessor).
        `do_pad` defaults to True: llava-hf configs omit it, but LLaVA-1.5 was trained padded."""
        size, crop = config.get("size", 336), config.get("crop_size", 336)
        kw = dict(size=size["shortest_edge"] if isinstance(size, dict) else size,
                  crop_size=(crop["height"], crop["width"]) if isinstance(crop, dict)
                  else (crop, crop),
                  do_pad=config.get("do_pad", True),
                  **{k: config.get(k) for k in ("rescale_factor", "resample")})
        return _from_kwargs(cls, kw, config)

    @classmethod
    def from_pretrained(cls, path: str) -> "LlavaImageProcessor":
        """From `<path>/preprocessor_config.json` of a Hugging Face checkpoint directory."""
        return cls.from_config(_read_preprocessor_config(path, cls.__name__))

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """One image -> float32 [3, crop_h, crop_w]."""
        rgb = to_rgb(image)
        if self.do_pad:
            rgb = Image.fromarray(pad_to_square(np.asarray(rgb), self.pad_color))
        h, w = shortest_edge_size(rgb.size[1], rgb.size[0], self.size)
        pixels = center_crop(np.asarray(rgb.resize((w, h), resample=self.resample)),
                             self.crop_size)
        return self._lut[np.arange(3)[:, None, None], pixels.transpose(2, 0, 1)]

    def __call__(self, images: Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """A flat list of images -> {pixel_values float32 [N, 3, crop_h, crop_w]}."""
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        if len(images) == 0:
            raise ValueError("LlavaImageProcessor got an empty image list")
        return {"pixel_values": np.stack([self.preprocess(im) for im in images])}
