"""Small generated caption corpora with every kind of bad record, in each input format.

Images (under <root>/img): 20 good RGB ones (JPEG and PNG), 5 in other modes (L, RGBA, P, CMYK,
I;16), 1 larger than MAX_SIDE, 1 over MAX_PIXELS, and a missing, a zero-byte, a truncated and an
undecodable file. With MAX_SIDE / MAX_PIXELS below, 26 images are usable.
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
from PIL import Image

MAX_SIDE = 64
MAX_PIXELS = 100_000
N_GOOD = 20
CONVERTED = ("L", "RGBA", "P", "CMYK", "I;16")
BAD_IMAGES = {"missing.jpg": "missing_image", "zero.jpg": "empty_image",
              "trunc.jpg": "truncated_image", "garbage.jpg": "undecodable_image",
              "bomb.png": "too_many_pixels"}


def _save(img: Image.Image, path: str, fmt: str) -> None:
    img.save(path, format=fmt)


def good_color(i: int) -> tuple[int, int, int]:
    return (10 * i % 256, 255 - 7 * i % 256, 40 + 3 * i)


def make_images(root: str) -> dict[str, list[str]]:
    """Writes the images; returns {"good": [...], "converted": [...], "resized": [...],
    "bad": [...]} of file names relative to <root>/img."""
    d = os.path.join(root, "img")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    good = []
    for i in range(N_GOOD):
        h, w = 12 + i % 7, 16 + i % 11
        arr = np.empty((h, w, 3), np.uint8)
        arr[...] = good_color(i)
        name = f"good{i:02d}." + ("jpg" if i % 2 else "png")
        _save(Image.fromarray(arr), os.path.join(d, name), "JPEG" if i % 2 else "PNG")
        good.append(name)
    base = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    rgb = Image.fromarray(base)
    converted = []
    for mode in CONVERTED:
        if mode == "I;16":
            img, fmt, ext = Image.fromarray(base[..., 0].astype(np.uint16) * 257), "PNG", "png"
        elif mode == "CMYK":
            img, fmt, ext = rgb.convert("CMYK"), "JPEG", "jpg"
        elif mode == "P":
            img, fmt, ext = rgb.convert("P"), "GIF", "gif"
        else:
            img, fmt, ext = rgb.convert(mode), "PNG", "png"
        name = f"mode_{mode.replace(';', '')}.{ext}"
        _save(img, os.path.join(d, name), fmt)
        converted.append(name)
    _save(Image.fromarray(np.full((80, 200, 3), 99, np.uint8)), os.path.join(d, "huge.png"),
          "PNG")
    _save(Image.new("RGB", (400, 300), (1, 2, 3)), os.path.join(d, "bomb.png"), "PNG")
    open(os.path.join(d, "zero.jpg"), "wb").close()
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    with open(os.path.join(d, "trunc.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    with open(os.path.join(d, "garbage.jpg"), "wb") as f:
        f.write(b"this is not an image at all, just some text" * 10)
    return {"good": good, "converted": converted, "resized": ["huge.png"],
            "bad": list(BAD_IMAGES)}


def usable(images: dict[str, list[str]]) -> list[str]:
    return images["good"] + images["converted"] + images["resized"]


def caption(name: str) -> str:
    return f"a caption of {name}"


def write_sharegpt4v(root: str, images: dict[str, list[str]], *, jsonl: bool = True) -> str:
    """Expected: kept 26; skipped duplicate_id 1, empty_reference 1, missing_reference 1,
    missing_image_field 1, malformed_line 1 (JSONL only), + the 5 bad images;
    fixed merged_duplicate_id 1 + the image fixes."""
    recs = [{"id": f"sg_{n}", "image": f"{n}",
             "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                               {"from": "gpt", "value": caption(n)}]}
            for n in usable(images) + images["bad"]]
    g = images["good"]
    recs += [
        # Same id, same image: references merged.
        {"id": f"sg_{g[0]}", "image": g[0],
         "conversations": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "second caption"}]},
        # Same id, another image: skipped.
        {"id": f"sg_{g[1]}", "image": g[2], "conversations": [{"from": "gpt", "value": "x"}]},
        {"id": "sg_empty", "image": g[3], "conversations": [{"from": "gpt", "value": "   "}]},
        {"id": "sg_noref", "image": g[4], "conversations": [{"from": "human", "value": "?"}]},
        {"id": "sg_noimage", "conversations": [{"from": "gpt", "value": "text only"}]},
    ]
    path = os.path.join(root, "sharegpt4v." + ("jsonl" if jsonl else "json"))
    with open(path, "w") as f:
        if not jsonl:
            json.dump(recs, f)
            return path
        for i, r in enumerate(recs):
            f.write(json.dumps(r) + "\n")
            if i == 3:
                f.write('{"id": "broken", "image": \n')  # line 5: malformed
    return path


def write_coco(root: str, images: dict[str, list[str]]) -> str:
    """Expected: kept 26; skipped duplicate_id 1, missing_reference 1, empty_reference 1,
    orphan_annotation 1, + the 5 bad images; fixed dropped_empty_reference 1 + image fixes."""
    names = usable(images) + images["bad"]
    ims = [{"id": 1000 + i, "file_name": n} for i, n in enumerate(names)]
    anns = [{"image_id": 1000 + i, "caption": caption(n)} for i, n in enumerate(names)]
    anns.append({"image_id": 1000, "caption": "another caption of the first image"})
    anns.append({"image_id": 1001, "caption": ""})                     # dropped, other remains
    g = images["good"]
    ims += [{"id": 1000, "file_name": g[5]},                           # duplicate id
            {"id": 2000, "file_name": g[6]},                           # no annotation
            {"id": 2001, "file_name": g[7]}]                           # only an empty caption
    anns += [{"image_id": 2001, "caption": " "}, {"image_id": 9999, "caption": "orphan"}]
    path = os.path.join(root, "coco.json")
    with open(path, "w") as f:
        json.dump({"images": ims, "annotations": anns}, f)
    return path


def write_csv(root: str, images: dict[str, list[str]]) -> str:
    """Expected: kept 26; skipped empty_reference 1, missing_image_field 1, duplicate_id 1,
    + the 5 bad images; fixed merged_duplicate_id 1 + image fixes."""
    g = images["good"]
    rows = [(n, caption(n), "") for n in usable(images) + images["bad"]]
    rows += [(g[0], "a second caption", ""),        # same image again: one more reference
             (g[8], "", "csv_empty"),               # empty caption
             ("", "no image", "csv_noimage"),       # no image
             (g[9], "other image, same id", g[10])]  # id g[10] names another image
    path = os.path.join(root, "captions.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "image_id"])
        w.writerows(rows)
    return path
