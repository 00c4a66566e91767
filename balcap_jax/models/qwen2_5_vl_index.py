"""Host-side (numpy) index arrays for Qwen2.5-VL: everything that depends on image sizes.

The jitted vision tower and language model only see fixed-size padded arrays; the ragged,
size-dependent bookkeeping lives here and runs on the host before each call:

* `vision_position_ids`, `window_index`: the same values as transformers'
  `vision_utils.get_vision_position_ids` / `get_vision_window_index`.
* `prepare_vision_inputs`: pads the patch count to a bucket and turns HF's window permutation and
  `cu_seqlens` / `cu_window_seqlens` into gather indices and per-patch segment ids (block-diagonal
  attention; padding patches get segment -1 and never meet real patches). Attention runs on
  *rows*: consecutive windows (or image frames) are packed, whole, into rows of fixed length,
  so each layer costs O(rows * row_len^2) instead of O(N^2) for N patches of all images.
* `rope_index`: M-RoPE positions [3, B, T] equal to HF `Qwen2_5_VLModel.get_rope_index`, plus
  per-row deltas for decoding (position of the token at cache index i >= prompt end = i + delta).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from balcap_jax.padding import next_pow2

PAD_SEGMENT = -1  # segment id of bucket-padding patches: never equal to a real window/frame id


class VisionInputs(NamedTuple):
    """Padded, bucketed inputs of `encode_images` (a pytree; every leaf has a bucket-sized shape).

    Np = padded patch count (a multiple of merge_unit = spatial_merge_size**2),
    Mp = Np // merge_unit.
    """
    pixel_values: np.ndarray      # [Np, C*kt*p*p] float32, rows in the processor's order,
                                  # zero padded
    patch_order: np.ndarray       # [Np] int32: row of pixel_values at each window-permuted slot
    rotary_pos: np.ndarray        # [Np, 2] int32 (h, w) patch coordinates, window-permuted order
    window_segments: np.ndarray   # [Np] int32 window id per permuted slot (PAD_SEGMENT for padding)
    full_segments: np.ndarray     # [Np] int32 image-frame id per permuted slot
                                  # (PAD_SEGMENT for padding)
    merge_inverse: np.ndarray     # [Mp] int32: merged row (permuted order) of each output token
    token_valid: np.ndarray       # [Mp] bool: output token is a real image token
    window_rows: np.ndarray       # [Gw, Rw] int32 permuted slots packed per row (Np = empty)
    window_slots: np.ndarray      # [Np] int32 flat row position of each slot (Gw*Rw = none)
    full_rows: np.ndarray         # [Gf, Rf] the same for full-attention blocks (whole frames)
    full_slots: np.ndarray        # [Np]


def _grid_list(image_grid_thw) -> list[tuple[int, int, int]]:
    grid = np.asarray(image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must have shape [num_images, 3] (t, h, w), "
                         f"got {grid.shape}")
    return [tuple(int(v) for v in row) for row in grid]


def vision_position_ids(image_grid_thw, spatial_merge_size: int) -> np.ndarray:
    """[N, 2] (h, w) per patch, in the processor's merge-block-major patch order."""
    out = []
    m = spatial_merge_size
    for t, h, w in _grid_list(image_grid_thw):
        if h % m or w % m:
            raise ValueError(f"grid {(t, h, w)} is not divisible by spatial_merge_size={m}; "
                             "resize images with the processor's smart_resize")
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // m, m, w // m, m)
        hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hh, ww], -1), (t, 1)))
    return np.concatenate(out, 0).astype(np.int32) if out else np.zeros((0, 2), np.int32)


def window_index(image_grid_thw, *, spatial_merge_size: int, window_size: int,
                 patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(window_index [M], cu_window_seqlens [W+1]) exactly as HF builds them.

    window_index lists merged units (groups of merge_size**2 patches) window by window; windows
    are vws x vws merged units (vws = window_size // merge // patch), ragged at the right and
    bottom edges. cu_window_seqlens counts patches and has no repeated entries.
    """
    vws = window_size // spatial_merge_size // patch_size
    if vws < 1:
        raise ValueError(f"window_size={window_size} is smaller than one merged unit "
                         f"({spatial_merge_size * patch_size} px)")
    unit = spatial_merge_size ** 2
    index, cu, offset = [], [0], 0
    for t, h, w in _grid_list(image_grid_thw):
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        nh, nw = -(-gh // vws), -(-gw // vws)
        padded = np.full((t, nh * vws, nw * vws), -1, np.int64)
        padded[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        windows = (padded.reshape(t, nh, vws, nw, vws).transpose(0, 1, 3, 2, 4)
                   .reshape(t * nh * nw, -1))
        lengths = (windows >= 0).sum(-1)
        flat = windows.reshape(-1)
        index.append(flat[flat >= 0] + offset)
        cu.extend((np.cumsum(lengths[lengths > 0]) * unit + cu[-1]).tolist())
        offset += t * gh * gw
    idx = np.concatenate(index) if index else np.zeros((0,), np.int64)
    return idx.astype(np.int32), np.asarray(cu, np.int32)


def bucket_size(n: int, bucket, multiple: int) -> int:
    """Padded length for n items: None -> n rounded up to `multiple`; an int -> next multiple of
    it; "pow2" -> next power of two (at least `multiple`)."""
    if bucket is None:
        size = n
    elif bucket == "pow2":
        size = next_pow2(n) if n > 0 else multiple
    elif isinstance(bucket, (int, np.integer)) and bucket > 0:
        size = -(-n // int(bucket)) * int(bucket)
    else:
        raise ValueError(f"bucket must be None, a positive int or 'pow2', got {bucket!r}")
    size = max(size, multiple)
    return -(-size // multiple) * multiple


def pack_rows(segments, row_len: int, num_rows: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedily pack attention segments, in order, into `num_rows` rows of `row_len` without
    splitting one. `segments`: lengths of consecutive segments covering slots 0..sum-1, or
    (start, length) pairs (slots between them, e.g. an image's slot padding, stay unpacked).
    Returns rows [G, R] (slot index, `total` where empty) and slots [total] (flat row
    position, G*R for unpacked slots)."""
    rows = np.full((num_rows, row_len), total, np.int32)
    slots = np.full((total,), num_rows * row_len, np.int32)
    r, fill, start = 0, 0, 0
    for seg in segments:
        if isinstance(seg, tuple):
            start, n = (int(v) for v in seg)
        else:
            n = int(seg)
        if n > row_len:
            raise ValueError(f"an attention segment of {n} patches does not fit a row of "
                             f"{row_len}; "
                             "raise window_row/full_row (or pass full_row=None for one dense row)")
        if fill + n > row_len:
            r, fill = r + 1, 0
        if r >= num_rows:
            raise ValueError(f"packing needs more than {num_rows} rows of {row_len}")
        idx = np.arange(start, start + n)
        rows[r, fill:fill + n] = idx
        slots[idx] = r * row_len + fill + np.arange(n)
        fill, start = fill + n, start + n
    return rows, slots


_pow2 = next_pow2


def prepare_vision_inputs(pixel_values, image_grid_thw, *, spatial_merge_size: int = 2,
                          window_size: int = 112, patch_size: int = 14, bucket=None,
                          window_row: int = 256, full_row="auto", slot: int | None = None
                          ) -> VisionInputs:
    """Pad `pixel_values` [N, C*kt*p*p] (the processor's output, all images concatenated) and
    build the index arrays the jitted vision tower needs (see `VisionInputs`).

    Layout: with `slot` (patches per image), image i owns permuted slots [i*slot, i*slot + n_i)
    and the rest of its slot is padding, so Np = images * slot whatever the image sizes: the
    shapes depend only on the image count (training's fixed-shape mode; an image larger than
    its slot is an error). Without it the images' patches are contiguous and Np is their total
    padded to `bucket`.
    Row layout (static shapes depend only on these choices and Np): window blocks use rows of
    min(window_row, Np) patches, their count bounded from Np, so they add no compile keys; full
    blocks use one row of `slot` patches per image in slot mode, else rows of `full_row`
    patches ("auto": the next power of two of the largest frame; None: one dense row of Np)
    and a power-of-two row count."""
    pixel_values = np.asarray(pixel_values, np.float32)
    grids = _grid_list(image_grid_thw)
    sizes = [t * h * w for t, h, w in grids]
    n = sum(sizes)
    if pixel_values.ndim != 2 or pixel_values.shape[0] != n:
        raise ValueError(f"pixel_values must have shape [sum(t*h*w)={n}, C*kt*p*p] for "
                         f"image_grid_thw={grids}, got {pixel_values.shape}")
    unit = spatial_merge_size ** 2
    for t, h, w in grids:
        if h % spatial_merge_size or w % spatial_merge_size:
            raise ValueError(f"grid {(t, h, w)} is not divisible by spatial_merge_size="
                             f"{spatial_merge_size}; resize images with the processor's "
                             "smart_resize")
    if slot is not None:
        if slot < unit or slot % unit:
            raise ValueError(f"slot={slot} patches must be a positive multiple of "
                             f"spatial_merge_size**2 = {unit}")
        big = [(i, sz) for i, sz in enumerate(sizes) if sz > slot]
        if big:
            i, sz = big[0]
            raise ValueError(f"image {i} (grid {grids[i]}) has {sz // unit} image tokens, "
                             "more than "
                             f"its slot of {slot // unit} (data.max_image_tokens); bound the "
                             "processor's max_pixels by it (balcap_jax.build does)")
        n_pad = max(len(grids), 1) * slot
        starts = [i * slot for i in range(len(grids))]
    else:
        n_pad = bucket_size(n, bucket, unit)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist() if sizes else []
    m, m_pad = n // unit, n_pad // unit

    patch_order = np.full((n_pad,), n, np.int32)      # empty slots read a zero pixel row
    rotary_pos = np.zeros((n_pad, 2), np.int32)
    window_segments = np.full((n_pad,), PAD_SEGMENT, np.int32)
    full_segments = np.full((n_pad,), PAD_SEGMENT, np.int32)
    merge_inverse = np.full((m_pad,), -1, np.int64)
    windows, frames = [], []                          # (start slot, length) in slot order
    pix, tok, n_win, n_frame = 0, 0, 0, 0
    for (t, h, w), size, start in zip(grids, sizes, starts):
        widx, cu_win = window_index([(t, h, w)], spatial_merge_size=spatial_merge_size,
                                    window_size=window_size, patch_size=patch_size)
        order = (widx[:, None] * unit + np.arange(unit)).reshape(-1)
        here = np.arange(start, start + size)
        patch_order[here] = pix + order
        rotary_pos[here] = vision_position_ids([(t, h, w)], spatial_merge_size)[order]
        lengths = np.diff(cu_win)
        window_segments[here] = n_win + np.repeat(np.arange(len(lengths)), lengths)
        windows += [(start + int(a), int(b)) for a, b in zip(cu_win[:-1], lengths)]
        full_segments[here] = n_frame + np.repeat(np.arange(t), h * w)
        frames += [(start + f * h * w, h * w) for f in range(t)]
        merge_inverse[tok:tok + size // unit] = start // unit + np.argsort(widx)
        pix, tok, n_win, n_frame = pix + size, tok + size // unit, n_win + len(lengths), n_frame + t
    # padding tokens read the merged rows no image token reads (a permutation, as before)
    merge_inverse[m:] = np.setdiff1d(np.arange(m_pad), merge_inverse[:m], assume_unique=True)
    merge_inverse = merge_inverse.astype(np.int32)
    padded_pixels = np.zeros((n_pad, pixel_values.shape[1]), np.float32)
    padded_pixels[:n] = pixel_values     # row n (when n < n_pad) is the zero row padding reads

    # window rows: a window holds at most vws**2 merged units, which bounds the row count
    rw = min(int(window_row), n_pad)
    max_win = (window_size // spatial_merge_size // patch_size) ** 2 * unit
    if rw == n_pad:
        gw = 1
    elif max_win > rw:
        raise ValueError(f"window_row={window_row} is shorter than a full window "
                         f"({max_win} patches)")
    else:
        gw = n_pad // (rw - max_win + 1) + 1
    window_rows, window_slots = pack_rows(windows, rw, gw, n_pad)
    # full-attention rows: whole frames
    longest = max((f for _, f in frames), default=unit)
    if slot is not None:
        rf, gf = slot, max(len(grids), 1)
    else:
        if full_row is None:
            rf = n_pad
        elif full_row == "auto":
            rf = min(_pow2(longest), n_pad)
        elif isinstance(full_row, (int, np.integer)) and full_row > 0:
            rf = min(int(full_row), n_pad)
        else:
            raise ValueError(f"full_row must be None, 'auto' or a positive int, got {full_row!r}")
        packed, fill = 1, 0
        for _, f in frames:
            if fill + f > rf:
                packed, fill = packed + 1, 0
            fill += f
        gf = 1 if rf == n_pad else _pow2(packed)
    full_rows, full_slots = pack_rows(frames, rf, gf, n_pad)
    return VisionInputs(padded_pixels, patch_order, rotary_pos, window_segments, full_segments,
                        merge_inverse, np.arange(m_pad) < m, window_rows, window_slots,
                        full_rows, full_slots)


def image_token_counts(image_grid_thw, spatial_merge_size: int) -> list[int]:
    return [t * h * w // spatial_merge_size ** 2 for t, h, w in _grid_list(image_grid_thw)]


def rope_index(input_ids, attention_mask=None, image_grid_thw=None, *, image_token_id: int,
               spatial_merge_size: int = 2,
               mm_token_type_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions [3, B, T] int32 (equal to HF get_rope_index; padding positions 0) and
    deltas [B] int32 such that the token at cache index i after a row's last prompt token has
    position i + delta on all three axes (for left-padded prompts: delta = max_pos + 1 - T).

    Image tokens (mm_token_type_ids == 1, or input_ids == image_token_id if not given) take the
    t/h/w grid of the next image offset by the current position; text continues after the max.
    Images are consumed in order across the batch, one grid per image-token run.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    b, t_len = input_ids.shape
    mask = (np.ones_like(input_ids, bool) if attention_mask is None
            else np.asarray(attention_mask).astype(bool))
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
    is_image = ((input_ids == image_token_id) if mm_token_type_ids is None
                else (np.asarray(mm_token_type_ids) == 1))
    grids = _grid_list(image_grid_thw) if image_grid_thw is not None and len(image_grid_thw) else []
    m = spatial_merge_size
    positions = np.zeros((3, b, t_len), np.int64)
    deltas = np.zeros((b,), np.int64)
    next_image = 0
    for row in range(b):
        valid = np.nonzero(mask[row])[0]
        kinds = is_image[row, valid]
        chunks, cur, i = [], 0, 0
        while i < len(valid):
            j = i
            while j < len(valid) and kinds[j] == kinds[i]:
                j += 1
            if not kinds[i]:
                chunks.append(np.broadcast_to(np.arange(cur, cur + j - i), (3, j - i)))
                cur += j - i
            else:
                k = i
                while k < j:  # a run may hold several images only if nothing separates them
                    if next_image >= len(grids):
                        raise ValueError(f"row {row} has more image-token runs than image_grid_thw "
                                         f"has images ({len(grids)})")
                    gt, gh, gw = grids[next_image]
                    next_image += 1
                    lt, lh, lw = gt, gh // m, gw // m
                    tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw),
                                             indexing="ij")
                    chunk = np.stack([tt, hh, ww]).reshape(3, -1) + cur
                    if k + chunk.shape[1] > j:
                        raise ValueError(f"row {row}: image {next_image - 1} with grid "
                                         f"{(gt, gh, gw)} needs {chunk.shape[1]} image tokens, "
                                         f"the prompt has {j - k}")
                    chunks.append(chunk)
                    cur += max(gh, gw) // m
                    k += chunk.shape[1]
            i = j
        if len(valid):
            row_pos = np.concatenate(chunks, 1)
            positions[:, row, valid] = row_pos
            deltas[row] = row_pos.max() + 1 - (valid[-1] + 1)
        else:
            deltas[row] = 0
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the prompts hold "
                         f"{next_image} image-token runs")
    return positions.astype(np.int32), deltas.astype(np.int32)
