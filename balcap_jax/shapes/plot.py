"""Curves of the ShapesWorld demo as a PNG drawn with PIL (matplotlib is not a dependency).

Three panels: the supervised loss (warm start, then the control continuing it), the per-step RL
rewards (precision, recall, length-masked linguistic; smoothed), and the RL caption length in
words; the held-out before / after / sft_control b-CapScores are written in the title.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from balcap_jax.plot import H, W, panel, smooth

__all__ = ["plot_curves", "smooth"]

COLORS = {"precision": (200, 40, 40), "recall": (40, 90, 220), "linguistic": (40, 150, 60),
          "warm start": (60, 60, 60), "control": (230, 140, 20), "words": (120, 60, 170)}


def plot_curves(path: str, warm_losses, control_losses, rl_rows, summary: dict | None = None):
    """Writes the three-panel PNG to `path`."""
    img = Image.new("RGB", (3 * W, H + 20), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    n_warm = len(warm_losses)
    _panel = functools.partial(panel, colors=COLORS)
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
            if summary.get(k))
        draw.text((10, H + 4), text, fill=(0, 0, 0))
    img.save(path)
    return path
