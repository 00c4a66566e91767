"""One self-contained HTML page of an evaluation (no script, no CDN, images inline):

- per metric, a bar per policy with its 95% interval (inline SVG);
- a gallery: each image beside every policy's caption, the facts the judge found false
  highlighted where they appear in the caption and listed under it otherwise;
- each policy's caption-length distribution (words, CapArena's count), as a histogram.

Rendered with jinja2 (autoescaped): captions and file names are text, never markup.
"""
from __future__ import annotations

import base64
import io
import math
import re

import jinja2
import numpy as np

__all__ = ["write_html", "thumbnail", "highlight"]

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#9c755f")
BAR_W, BAR_H = 360, 22


def thumbnail(image, max_side: int = 192) -> str:
    """A data: URL of the image (an HxWx3 uint8 array or a PIL image), JPEG, longer side
    <= max_side."""
    from PIL import Image
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def highlight(caption: str, false_facts: list[str]) -> tuple[list[tuple[str, bool]], list[str]]:
    """(caption as [(text, is_false)] pieces, the false facts not found verbatim in it)."""
    spans = []
    rest = []
    for f in false_facts:
        m = re.search(re.escape(f.strip()), caption, re.IGNORECASE) if f.strip() else None
        (spans.append((m.start(), m.end())) if m else rest.append(f))
    pieces, at = [], 0
    for s, e in sorted(spans):
        if s < at:
            continue
        pieces += [(caption[at:s], False), (caption[s:e], True)]
        at = e
    pieces.append((caption[at:], False))
    return [p for p in pieces if p[0]], rest


def _bars(results: dict) -> list[dict]:
    names = list(results["policies"])
    metrics: list[str] = []
    for p in results["policies"].values():
        metrics += [m for m in p["metrics"] if m not in metrics]
    out = []
    for m in metrics:
        entries = [(n, results["policies"][n]["metrics"].get(m)) for n in names]
        vals = [e["value"] for _, e in entries if e and math.isfinite(e["value"])]
        his = [e["ci95"][1] for _, e in entries if e and e.get("ci95")
               and math.isfinite(e["ci95"][1])]
        lows = [e["ci95"][0] for _, e in entries if e and e.get("ci95")
                and math.isfinite(e["ci95"][0])]
        lo = min([0.0] + vals + lows)
        hi = max([1e-9] + vals + his)
        scale = (BAR_W - 60) / (hi - lo)
        rows = []
        for i, (n, e) in enumerate(entries):
            if not e or not math.isfinite(e["value"]):
                rows.append({"name": n, "text": "n/a", "color": PALETTE[i % len(PALETTE)]})
                continue
            x0, x1 = sorted(((0 - lo) * scale, (e["value"] - lo) * scale))
            row = {"name": n, "x": x0, "w": max(x1 - x0, 1.0), "color": PALETTE[i % len(PALETTE)],
                   "text": f"{e['value']:.4g}"}
            ci = e.get("ci95")
            if ci and all(math.isfinite(c) for c in ci):
                row["ci"] = ((ci[0] - lo) * scale, (ci[1] - lo) * scale)
                row["text"] += f" [{ci[0]:.3g}, {ci[1]:.3g}]"
            rows.append(row)
        out.append({"metric": m, "rows": rows, "height": BAR_H * len(rows) + 6})
    return out


def _lengths(results: dict, bins: int = 12) -> dict:
    words = {n: p.get("word_counts", []) for n, p in results["policies"].items()}
    top = max([max(w) for w in words.values() if w] + [1])
    edges = np.linspace(0, top + 1, bins + 1)
    hists = {n: np.histogram(w, bins=edges)[0].tolist() for n, w in words.items()}
    peak = max([max(h) for h in hists.values()] + [1])
    series = []
    for i, (n, h) in enumerate(hists.items()):
        series.append({"name": n, "color": PALETTE[i % len(PALETTE)],
                       "bars": [{"x": 40 + j * 30 + i * (26 / max(len(hists), 1)),
                                 "w": 26 / max(len(hists), 1), "h": 120 * c / peak, "count": c}
                                for j, c in enumerate(h)]})
    return {"series": series, "edges": [int(e) for e in edges],
            "width": 40 + bins * 30 + 10}


_TEMPLATE = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:32px} table{border-collapse:collapse}
td,th{border:1px solid #ddd;padding:4px 6px;vertical-align:top;font-size:12px}
.metric{display:inline-block;margin:8px 24px 8px 0;vertical-align:top}
.gallery td{max-width:320px} mark{background:#ffc9c9} .note{color:#666;font-size:13px}
.false{color:#b00020;font-size:12px}
</style></head><body>
<h1>{{ title }}</h1>
<p class="note">{{ results.images }} images; 95% bootstrap intervals over images
({{ results.bootstrap_samples }} resamples). Judge: {{ judge }}. {{ results.note }}.</p>
<h2>Metrics</h2>
<div style="overflow-x:auto"><table id="summary"><tr><th>policy</th>
{% for b in bars %}<th>{{ b.metric }}</th>{% endfor %}
<th>words</th></tr>
{% for name, p in results.policies.items() %}<tr><td>{{ name }}</td>
{% for b in bars %}<td>{% for r in b.rows if r.name == name %}{{ r.text }}{% endfor %}</td>
{% endfor %}<td>{{ '%.1f' % p.words.mean }}</td></tr>{% endfor %}</table></div>
{% for b in bars %}<div class="metric"><div><b>{{ b.metric }}</b></div>
<svg class="bars" width="{{ bar_w + 200 }}" height="{{ b.height }}"
 role="img" aria-label="{{ b.metric }}">
{% for r in b.rows %}{% set y = loop.index0 * bar_h + 3 %}
<text x="0" y="{{ y + 15 }}" font-size="12">{{ r.name }}</text>
{% if r.w is defined %}<rect x="{{ 100 + r.x }}" y="{{ y + 3 }}" width="{{ r.w }}"
 height="{{ bar_h - 8 }}" fill="{{ r.color }}"><title>{{ r.text }}</title></rect>
{% if r.ci is defined %}<line x1="{{ 100 + r.ci[0] }}" x2="{{ 100 + r.ci[1] }}"
 y1="{{ y + 11 }}" y2="{{ y + 11 }}" stroke="#222" stroke-width="1.5"/>{% endif %}{% endif %}
<text x="{{ bar_w + 50 }}" y="{{ y + 15 }}" font-size="11">{{ r.text }}</text>
{% endfor %}</svg></div>{% endfor %}
<h2>Caption length (words)</h2>
<svg id="lengths" width="{{ lengths.width }}" height="170" role="img"
 aria-label="caption length histogram">
{% for s in lengths.series %}{% for b in s.bars %}<rect x="{{ b.x }}" y="{{ 140 - b.h }}"
 width="{{ b.w }}" height="{{ b.h }}" fill="{{ s.color }}"><title>{{ s.name }}:
 {{ b.count }}</title></rect>{% endfor %}{% endfor %}
{% for e in lengths.edges %}<text x="{{ 36 + loop.index0 * 30 }}" y="156"
 font-size="10">{{ e }}</text>{% endfor %}
{% for s in lengths.series %}<rect x="{{ 40 + loop.index0 * 110 }}" y="160" width="10"
 height="10" fill="{{ s.color }}"/><text x="{{ 54 + loop.index0 * 110 }}" y="169"
 font-size="11">{{ s.name }}</text>{% endfor %}</svg>
<h2>Gallery</h2>
<table class="gallery"><tr><th>image</th>{% for n in names %}<th>{{ n }}</th>{% endfor %}</tr>
{% for g in gallery %}<tr><td><img src="{{ g.src }}" alt="{{ g.key }}"><br>
<span class="note">{{ g.key }}</span></td>
{% for c in g.captions %}<td>{% for text, bad in c.pieces %}{% if bad %}<mark>{{ text }}</mark>
{%- else %}{{ text }}{% endif %}{% endfor %}
{% if c.false %}<div class="false">false: {{ c.false | join('; ') }}</div>{% endif %}
</td>{% endfor %}</tr>{% endfor %}</table>
</body></html>
""")


def write_html(path: str, results: dict, gallery: list[dict], *, title: str = "Evaluation"
               ) -> None:
    """gallery: [{"key", "image" (array), "captions": {policy: caption},
    "false_facts": {policy: [str]}}]."""
    names = list(results["policies"])
    rows = []
    for g in gallery:
        caps = []
        for n in names:
            pieces, rest = highlight(g["captions"].get(n, ""), g.get("false_facts", {}).get(n, []))
            caps.append({"pieces": pieces, "false": rest})
        rows.append({"key": g["key"], "src": thumbnail(g["image"]), "captions": caps})
    meta = results.get("judges", {})
    who = [f"{k[len('judge/'):]} {v}" for k, v in meta.items() if k.startswith("judge/")]
    if isinstance(meta.get("eval_judge"), dict):
        who.append(f"evaluation {meta['eval_judge'].get('judge', '?')}")
    judge = ", ".join(who) or "none"
    html = _TEMPLATE.render(title=title, results=results, bars=_bars(results),
                            lengths=_lengths(results), gallery=rows, names=names,
                            judge=judge, bar_w=BAR_W, bar_h=BAR_H)
    with open(path, "w") as f:
        f.write(html)
