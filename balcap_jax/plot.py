"""Line charts as PNGs drawn with PIL (matplotlib is not a dependency): panels of named
series, and a run's metrics.jsonl plotted per step (the Colab notebook, any run)."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["smooth", "panel", "plot_metrics", "W", "H"]

W, H, PAD = 420, 300, 40
PALETTE = [(200, 40, 40), (40, 90, 220), (40, 150, 60), (230, 140, 20), (120, 60, 170),
           (60, 60, 60)]


def smooth(y, k: int = 5) -> np.ndarray:
    """Trailing moving average over up to k points (the first points use fewer)."""
    y = np.asarray(y, np.float64)
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.minimum(np.arange(1, len(y) + 1), k)
    return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


def panel(draw, x0, title, series, xlabel, colors=None):
    """Draws one panel at x offset x0. series: [(name, xs, ys)]; axes scaled to their joint
    range; colors: name -> RGB (else the palette in order)."""
    draw.rectangle([x0 + PAD, PAD, x0 + W - 10, H - PAD], outline=(0, 0, 0))
    draw.text((x0 + PAD, 10), title, fill=(0, 0, 0))
    draw.text((x0 + W // 2 - 20, H - 18), xlabel, fill=(0, 0, 0))
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if np.isfinite(y)]
    if not pts:
        return
    xs_all, ys_all = zip(*pts)
    xlo, xhi = min(xs_all), max(max(xs_all), min(xs_all) + 1)
    ylo, yhi = min(ys_all), max(ys_all)
    if yhi - ylo < 1e-9:
        ylo, yhi = ylo - 0.5, yhi + 0.5
    sx = lambda x: x0 + PAD + (x - xlo) / (xhi - xlo) * (W - PAD - 12)
    sy = lambda y: H - PAD - (y - ylo) / (yhi - ylo) * (H - 2 * PAD - 2)
    draw.text((x0 + 2, PAD - 4), f"{yhi:.3g}", fill=(0, 0, 0))
    draw.text((x0 + 2, H - PAD - 8), f"{ylo:.3g}", fill=(0, 0, 0))
    draw.text((x0 + PAD, H - PAD + 4), f"{xlo:g}", fill=(0, 0, 0))
    draw.text((x0 + W - 40, H - PAD + 4), f"{xhi:g}", fill=(0, 0, 0))
    for i, (name, xs, ys) in enumerate(series):
        line = [(sx(x), sy(y)) for x, y in zip(xs, ys) if np.isfinite(y)]
        color = (colors or {}).get(name, PALETTE[i % len(PALETTE)])
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        draw.text((x0 + PAD + 6, PAD + 4 + 12 * i), name, fill=color)


def plot_metrics(path: str, metrics_jsonl: str, keys, *, title: str = "", k: int = 5) -> str:
    """One panel per key of `keys` (smoothed over k steps) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(metrics_jsonl) if line.strip()]
    keys = list(keys)
    img = Image.new("RGB", (W * max(len(keys), 1), H + 20), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, key in enumerate(keys):
        steps = [r.get("step", j + 1) for j, r in enumerate(rows)]
        ys = smooth([r.get(key, np.nan) for r in rows], k)
        panel(draw, i * W, key, [(key, steps, ys)], "step")
    if title:
        draw.text((10, H + 4), title, fill=(0, 0, 0))
    img.save(path)
    return path
