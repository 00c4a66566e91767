"""The ShapesWorld attribute report: hand-counted cases and invariants on the world's own text."""
import numpy as np
import pytest

from balcap_jax.shapes.attributes import attribute_report
from balcap_jax.shapes.text import reference_caption
from balcap_jax.shapes.world import make_scene


def _obj(shape, color, size, row, col, position):
    return dict(shape=shape, color=color, size=size, faint=False, row=row, col=col,
                position=position, x=0, y=0, radius=10)


SCENE = {"version": 2, "image_size": 112, "background": "gray", "objects": [
    _obj("circle", "red", "large", 0, 2, "top right"),
    _obj("square", "blue", "small", 2, 0, "bottom left")]}


def test_hand_counted():
    caps = ["a large red triangle is at the top right. the picture feels calm.",
            "there are two shapes. a small blue square is in the bottom left corner."]
    r = attribute_report(caps, [SCENE, SCENE])
    # caption 1: size, colour, position true; shape false. caption 2: all four true.
    assert r["stated"] == {"color": 2, "position": 2, "shape": 2, "size": 2}
    assert r["accuracy"] == {"color": 1.0, "position": 1.0, "shape": 0.5, "size": 1.0}
    # top-right object described in caption 1; bottom-left in caption 2; 1 of 2 per row
    assert r["described"] == {"top": 0.5, "middle": None, "bottom": 0.5}


def test_commentary_states_nothing():
    r = attribute_report(["the picture feels calm."], [SCENE])
    assert r["accuracy"] == {} and r["stated"] == {}
    assert r["described"]["top"] == 0.0 and r["described"]["bottom"] == 0.0


def test_references_are_all_true():
    scenes = [make_scene(0, "eval", i) for i in range(40)]
    caps = [reference_caption(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]
    r = attribute_report(caps, scenes)
    assert set(r["accuracy"]) >= {"color", "position", "shape", "size"}
    assert all(v == 1.0 for v in r["accuracy"].values()), r
    assert all(v == 1.0 for v in r["described"].values() if v is not None), r


def test_length_mismatch_is_named():
    with pytest.raises(ValueError, match="2 captions but 1 scenes"):
        attribute_report(["a.", "b."], [SCENE])
