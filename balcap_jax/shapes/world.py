"""ShapesWorld scenes: one to four flat shapes on a plain background, a scene graph, the pixels.

A scene is a pure function of (seed, split, index): `make_scene` draws it from numpy's PCG64
seeded with those three numbers, `render` paints it. The image is a 3x3 grid of cells with at
most one object per cell, so a position word names exactly one cell and "left of" / "above" are
column / row comparisons; that keeps every statement about a scene decidable by code.

Scene graph (a JSON-able dict, stored with each example):

    {"version": 2, "image_size": 112, "background": "gray",
     "objects": [{"shape": "circle", "color": "red", "size": "large", "faint": false,
                  "row": 0, "col": 2, "position": "top right", "x": 93, "y": 18, "radius": 17},
                 ...]}                                   # in reading order (row, then column)

Faint objects are small ones painted at 40% opacity over the background: hard to see, so
captions guessing at them trade precision for recall (the reward conflict c-GDPO needs).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

__all__ = ["SHAPES", "COLORS", "SIZES", "BACKGROUNDS", "POSITIONS", "POSITION_CELLS",
           "SPLIT_IDS", "SCENE_VERSION", "make_scene", "render", "scene_to_json", "as_scene",
           "relation_holds", "RELATIONS", "rendered_color", "image_id", "parse_image_id",
           "scene_from_id", "cell_labels", "CELL_LABEL_CLASSES"]

SCENE_VERSION = 2   # 2: larger objects (v1: radius 0.36 / 0.19 cell, jitter 0.1 cell)
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 215, 40),
          "green": (50, 170, 70), "blue": (40, 90, 220), "purple": (140, 60, 190)}
BACKGROUNDS = {"white": (235, 235, 235), "gray": (128, 128, 128), "black": (25, 25, 25)}
SIZES = ("small", "large")
# Cell (row, col) -> canonical position name; the inverse map below.
POSITIONS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right",
             (1, 0): "left", (1, 1): "center", (1, 2): "right",
             (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
POSITION_CELLS = {name: cell for cell, name in POSITIONS.items()}
# Relations between two objects a, b (as "a is REL b"); canonical names.
RELATIONS = ("left of", "right of", "above", "below")
SPLIT_IDS = {"train": 0, "eval": 1}

FAINT_ALPHA = 0.4
_NUM_OBJECTS_P = (0.2, 0.3, 0.3, 0.2)   # 1, 2, 3, 4 objects
_LARGE_P = 0.6
_FAINT_GIVEN_SMALL_P = 0.5


def _split_id(split: str) -> int:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown ShapesWorld split {split!r}; use one of {sorted(SPLIT_IDS)}")
    return SPLIT_IDS[split]


def image_id(seed: int, split: str, index: int, image_size: int = 112) -> str:
    """The example's id; `parse_image_id` inverts it, so a scene can be regenerated from it."""
    _split_id(split)
    return f"shapes-v{SCENE_VERSION}-{image_size}-s{seed}-{split}-{index:07d}"


def parse_image_id(ident: str) -> tuple[int, str, int, int]:
    """(seed, split, index, image_size) of an id made by `image_id`."""
    parts = ident.split("-")
    if len(parts) != 6 or parts[0] != "shapes" or parts[1] != f"v{SCENE_VERSION}" \
            or not parts[3].startswith("s"):
        raise ValueError(f"{ident!r} is not a ShapesWorld v{SCENE_VERSION} image id "
                         f"(shapes-v{SCENE_VERSION}-<size>-s<seed>-<split>-<index>)")
    return int(parts[3][1:]), parts[4], int(parts[5]), int(parts[2])


def scene_from_id(ident: str) -> dict[str, Any]:
    """The scene graph of the example with this id (`image_id`), regenerated."""
    seed, split, index, size = parse_image_id(ident)
    return make_scene(seed, split, index, size)


def make_scene(seed: int, split: str, index: int, image_size: int = 112) -> dict[str, Any]:
    """The scene graph of example `index` of `split` (deterministic in all four arguments)."""
    if image_size < 48:
        raise ValueError(f"image_size={image_size} is too small for a 3x3 grid of shapes; "
                         "use at least 48")
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed} and index={index} must be >= 0")
    rng = np.random.default_rng([seed, _split_id(split), index])
    n = int(rng.choice(4, p=_NUM_OBJECTS_P)) + 1
    background = str(rng.choice(list(BACKGROUNDS)))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    # (color, shape) pairs are unique within a scene, so "the red circle" names one object.
    pairs = rng.choice(len(COLORS) * len(SHAPES), size=n, replace=False)
    cell_px = image_size / 3
    # Objects nearly fill their cell: in v1 (radii 0.36 / 0.19 cell) an object covered 1-4% of
    # the pixels, and the tiny policy's colour / shape losses stayed at chance for 800+
    # supervised steps; with these radii colour is learned within a few hundred.
    jitter = max(1, int(round(cell_px * 0.03)))
    objects = []
    for cell, pair in zip(cells, pairs):
        row, col = divmod(cell, 3)
        color = list(COLORS)[int(pair) // len(SHAPES)]
        shape = SHAPES[int(pair) % len(SHAPES)]
        large = bool(rng.random() < _LARGE_P)
        faint = (not large) and bool(rng.random() < _FAINT_GIVEN_SMALL_P)
        radius = int(round(cell_px * (0.455 if large else 0.24)))
        dx, dy = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
        objects.append({
            "shape": shape, "color": color, "size": "large" if large else "small",
            "faint": faint, "row": row, "col": col, "position": POSITIONS[(row, col)],
            "x": int((col + 0.5) * cell_px) + dx, "y": int((row + 0.5) * cell_px) + dy,
            "radius": radius})
    return {"version": SCENE_VERSION, "image_size": image_size, "background": background,
            "objects": objects}


def as_scene(scene: Mapping[str, Any] | str | bytes) -> dict[str, Any]:
    """A scene dict from a dict or its JSON text (as stored in the dataset), checked."""
    if isinstance(scene, bytes):
        scene = scene.decode("utf-8")
    if isinstance(scene, str):
        try:
            scene = json.loads(scene)
        except json.JSONDecodeError as e:
            raise ValueError(f"scene JSON does not parse ({e.msg} at {e.pos}): "
                             f"{scene[:80]!r}") from None
    if not isinstance(scene, Mapping) or "objects" not in scene or "background" not in scene:
        raise ValueError("a ShapesWorld scene needs 'background' and 'objects' (got keys "
                         f"{sorted(scene) if isinstance(scene, Mapping) else type(scene)}); pass "
                         "the example's `scene` feature")
    return dict(scene)


def scene_to_json(scene: Mapping[str, Any]) -> str:
    return json.dumps(scene, sort_keys=True, separators=(",", ":"))


def rendered_color(scene: Mapping[str, Any], obj: Mapping[str, Any]) -> tuple[int, int, int]:
    """The exact RGB an object is painted with (faint objects are blended into the background)."""
    fg = np.array(COLORS[obj["color"]], np.float64)
    if not obj["faint"]:
        return tuple(int(v) for v in fg)
    bg = np.array(BACKGROUNDS[scene["background"]], np.float64)
    return tuple(int(v) for v in np.round(FAINT_ALPHA * fg + (1 - FAINT_ALPHA) * bg))


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: int) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = round(0.8 * r)
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up at dy = -r, base at dy = 0.6 r with half-width r
        return (dy >= -r) & (dy <= 0.6 * r) & (np.abs(dx) <= (dy + r) / 1.6)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scene: Mapping[str, Any]) -> np.ndarray:
    """uint8 [S, S, 3]: the background, then each object (flat colour, no anti-aliasing, so the
    pixels at an object's centre are exactly `rendered_color`)."""
    scene = as_scene(scene)
    size = int(scene["image_size"])
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUNDS[scene["background"]]
    yy, xx = np.mgrid[0:size, 0:size]
    for obj in scene["objects"]:
        m = _mask(obj["shape"], xx - obj["x"], yy - obj["y"], int(obj["radius"]))
        img[m] = rendered_color(scene, obj)
    return img


def relation_holds(a: Mapping[str, Any], rel: str, b: Mapping[str, Any]) -> bool:
    """Whether "a is REL b" is true: strict column / row order of the grid cells."""
    if rel == "left of":
        return a["col"] < b["col"]
    if rel == "right of":
        return a["col"] > b["col"]
    if rel == "above":
        return a["row"] < b["row"]
    if rel == "below":
        return a["row"] > b["row"]
    raise ValueError(f"unknown relation {rel!r}; known: {RELATIONS}")


CELL_LABEL_CLASSES = {"shape": 1 + len(SHAPES), "color": 1 + len(COLORS), "size": 1 + len(SIZES)}


def cell_labels(scene: Mapping[str, Any] | str | bytes) -> dict[str, np.ndarray]:
    """Per grid cell (row-major, 9) class ids of the object there: shape, colour and size, each
    0 for an empty cell, else 1 + the index in SHAPES / COLORS / SIZES. The targets of the
    vision tower's pretraining (balcap_jax.shapes.vision_pretrain); CELL_LABEL_CLASSES counts
    them."""
    scene = as_scene(scene)
    out = {name: np.zeros(9, np.int32) for name in CELL_LABEL_CLASSES}
    for obj in scene["objects"]:
        cell = obj["row"] * 3 + obj["col"]
        out["shape"][cell] = 1 + SHAPES.index(obj["shape"])
        out["color"][cell] = 1 + list(COLORS).index(obj["color"])
        out["size"][cell] = 1 + SIZES.index(obj["size"])
    return out
