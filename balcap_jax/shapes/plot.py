"""Curves of the ShapesWorld demo as a PNG drawn with PIL (matplotlib is not a dependency).

Three panels: the supervised loss (warm start, then the control continuing it), the per-step RL
rewards (precision, recall, length-masked linguistic; smoothed), and the RL caption length in
words; the held-out before / after / sft_control b-CapScores are written in the title.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["plot_curves", "smooth"]

W, H, PAD = 420, 300, 40
COLORS = {"precision": (200, 40, 40), "recall": (40, 90, 220), "linguistic": (40, 150, 60),
          "warm start": (60, 60, 60), "control": (230, 140, 20), "words": (120, 60, 170)}


def smooth(y, k: int = 5) -> np.ndarray:
    """Trailing moving average over up to k points (the first points use fewer)."""
    y = np.asarray(y, np.float64)
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.minimum(np.arange(1, len(y) + 1), k)
    return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


def _panel(draw, x0, title, series, xlabel):
    """series: [(name, xs, ys)]; axes scaled to their joint range."""
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
        color = COLORS.get(name, (0, 0, 0))
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        draw.text((x0 + PAD + 6, PAD + 4 + 12 * i), name, fill=color)


def plot_curves(path: str, warm_losses, control_losses, rl_rows, summary: dict | None = None):
    """Writes the three-panel PNG to `path`."""
    img = Image.new("RGB", (3 * W, H + 20), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    n_warm = len(warm_losses)
    _panel(draw, 0, "supervised loss (warm start, then control)",
           [("warm start", list(range(n_warm)), smooth(warm_losses, 10)),
            ("control", list(range(n_warm, n_warm + len(control_losses))),
             smooth(control_losses, 10))], "SFT step")
    steps = list(range(1, len(rl_rows) + 1))
    rewards = [(k, steps, smooth([r.get(f"reward/{k}", np.nan) for r in rl_rows]))
               for k in ("precision", "recall", "linguistic")]
    _panel(draw, W, "BalCapRL rewards per step (sampled, smoothed)", rewards, "RL step")
    _panel(draw, 2 * W, "BalCapRL caption words",
           [("words", steps, smooth([r.get("length/caption_words", np.nan) for r in rl_rows]))],
           "RL step")
    if summary:
        text = "held-out b-CapScore: " + ", ".join(
            f"{k} {summary[k]['b_capscore']:.1f}" for k in ("before", "after", "sft_control")
            if k in summary)
        draw.text((10, H + 4), text, fill=(0, 0, 0))
    img.save(path)
    return path
