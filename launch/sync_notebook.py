"""Writes launch/colab.ipynb from its source launch/colab.py (jupytext's percent format:
`# %%` opens a code cell, `# %% [markdown]` a markdown cell of `# `-prefixed lines).

    python launch/sync_notebook.py          # rewrite the .ipynb
    python launch/sync_notebook.py --check  # exit 1 if the .ipynb is out of date

Only the standard library: no jupytext needed to keep the two in step.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE, NOTEBOOK = os.path.join(HERE, "colab.py"), os.path.join(HERE, "colab.ipynb")
METADATA = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"}, "accelerator": "GPU",
            "colab": {"provenance": []}}


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    return [line + "\n" for line in lines[:-1]] + lines[-1:]


def cells(source: str) -> list[dict]:
    """The notebook cells of a percent-format source (its `# ---` header skipped)."""
    out, kind, buf = [], None, []

    def flush():
        if kind is None:
            return
        text = "\n".join(buf)
        if kind == "markdown":
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                             for line in buf)
        cell = {"cell_type": kind, "id": f"cell-{len(out):02d}", "metadata": {},
                "source": _lines(text)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        out.append(cell)

    for line in source.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, buf = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            buf.append(line)
    flush()
    return out


def notebook(source: str) -> dict:
    return {"cells": cells(source), "metadata": METADATA, "nbformat": 4, "nbformat_minor": 5}


def render(source: str) -> str:
    return json.dumps(notebook(source), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    with open(SOURCE) as f:
        want = render(f.read())
    have = open(NOTEBOOK).read() if os.path.exists(NOTEBOOK) else ""
    if "--check" in argv:
        if have != want:
            print(f"{NOTEBOOK} is out of date: run python launch/sync_notebook.py",
                  file=sys.stderr)
            return 1
        return 0
    with open(NOTEBOOK, "w") as f:
        f.write(want)
    print(f"wrote {NOTEBOOK} ({len(notebook(open(SOURCE).read())['cells'])} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
