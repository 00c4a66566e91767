"""Vision-tower pretraining (balcap_jax.shapes.vision_pretrain), ShapesWorld's per-cell labels, and
the frozen tower in the supervised warm start."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest


def test_cell_labels_by_hand():
    from balcap_jax.shapes.world import CELL_LABEL_CLASSES, COLORS, SHAPES, cell_labels
    scene = {"version": 2, "image_size": 112, "background": "gray", "objects": [
        {"shape": "triangle", "color": "red", "size": "small", "faint": True, "row": 0,
         "col": 2, "position": "top right", "x": 93, "y": 18, "radius": 9},
        {"shape": "circle", "color": list(COLORS)[-1], "size": "large", "faint": False,
         "row": 2, "col": 0, "position": "bottom left", "x": 18, "y": 93, "radius": 17}]}
    lab = cell_labels(scene)
    assert CELL_LABEL_CLASSES == {"shape": 5, "color": 1 + len(COLORS), "size": 3}
    want_shape = np.zeros(9, np.int32)
    want_shape[2], want_shape[6] = 1 + SHAPES.index("triangle"), 1 + SHAPES.index("circle")
    np.testing.assert_array_equal(lab["shape"], want_shape)
    np.testing.assert_array_equal(lab["color"], [0, 0, 1, 0, 0, 0, len(COLORS), 0, 0])
    np.testing.assert_array_equal(lab["size"], [0, 0, 1, 0, 0, 0, 2, 0, 0])


def test_probe_loss_matches_numpy():
    from balcap_jax.shapes.vision_pretrain import probe_loss
    rng = np.random.default_rng(0)
    n, t, d = 3, 4, 8
    emb = rng.standard_normal((n * t + 5, d)).astype(np.float32)   # 5 padding rows, ignored
    heads = {k: {"w": rng.standard_normal((d, c)).astype(np.float32),
                 "b": rng.standard_normal(c).astype(np.float32)} for k, c in (("a", 3), ("b", 2))}
    labels = {"a": rng.integers(0, 3, (n, t)), "b": rng.integers(0, 2, (n, t))}
    e = emb[: n * t].reshape(n, t, d)
    e = e / (np.sqrt((e * e).mean(-1, keepdims=True)) + 1e-6)
    want = 0.0
    for k, y in labels.items():
        z = e @ heads[k]["w"] + heads[k]["b"]
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        want += -np.take_along_axis(logp, y[..., None], -1).mean()
    got = probe_loss(jnp.asarray(emb), heads, {k: jnp.asarray(v) for k, v in labels.items()}, n)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.fixture(scope="module")
def shapes_policy():
    from flax import nnx

    from balcap_jax.models import random_init
    from balcap_jax.processing.images import QwenImageProcessor
    from configs.shapes import PIXELS, shapes_qwen_vl_config
    model = random_init.from_config(shapes_qwen_vl_config(), seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ip = QwenImageProcessor(min_pixels=PIXELS * PIXELS, max_pixels=PIXELS * PIXELS, merge_size=1)
    return model, graphdef, params, rest, ip


def _label_batches(ip, n=16, seed=0):
    """Training scenes of the world, labelled per cell; a fixed pool cycled."""
    from balcap_jax.shapes.world import cell_labels, make_scene, render
    scenes = [make_scene(0, "train", i) for i in range(n)]
    px = ip([render(s) for s in scenes])
    labs = [cell_labels(s) for s in scenes]
    labels = {k: np.stack([lab[k] for lab in labs]) for k in labs[0]}
    while True:
        yield px["pixel_values"], px["image_grid_thw"], labels


def test_pretrain_vision_fits_labels_and_only_changes_the_tower(shapes_policy):
    from balcap_jax.shapes.vision_pretrain import pretrain_vision
    from balcap_jax.shapes.world import CELL_LABEL_CLASSES
    model, _, params, _, ip = shapes_policy
    before = jax.tree.map(np.asarray, params)
    out, losses = pretrain_vision(model, params, _label_batches(ip), CELL_LABEL_CLASSES,
                                  steps=40, lr=3e-3, log=None)
    # three heads at chance start near ln5 + ln7 + ln3 = 4.6; a fixed pool is fitted quickly
    assert losses[0] > 3.5 and np.mean(losses[-5:]) < 0.5 * losses[0], losses
    flat_b = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    changed = {jax.tree_util.keystr(k): not np.array_equal(np.asarray(v), flat_b[k])
               for k, v in jax.tree_util.tree_flatten_with_path(out)[0]}
    assert all(c for k, c in changed.items() if "visual" in k and "merger" in k), changed
    assert not any(c for k, c in changed.items() if "visual" not in k), changed
    # the caller's tree is untouched
    for k, v in jax.tree_util.tree_flatten_with_path(params)[0]:
        np.testing.assert_array_equal(np.asarray(v), flat_b[k])


def test_pretrain_vision_names_bad_labels(shapes_policy):
    from balcap_jax.shapes.vision_pretrain import pretrain_vision
    model, _, params, _, ip = shapes_policy
    with pytest.raises(ValueError, match="size"):
        pretrain_vision(model, params, _label_batches(ip, n=2), {"shape": 5, "color": 7},
                        steps=1, log=None)
    # labels for a 3x3 grid against 6x6-token images (a 84 px input): named, not misread
    from balcap_jax.processing.images import QwenImageProcessor
    big = QwenImageProcessor(min_pixels=84 * 84, max_pixels=84 * 84, merge_size=1)
    px = big([np.zeros((112, 112, 3), np.uint8)] * 2)
    batches = iter([(px["pixel_values"], px["image_grid_thw"],
                     {"shape": np.zeros((2, 9), np.int32)})])
    with pytest.raises(ValueError, match=r"tokens per image.*\[2, \[36, 36\]\]"):
        pretrain_vision(model, params, batches, {"shape": 5}, steps=1, log=None)


def test_sft_freeze_vision_updates_only_the_language_model(shapes_policy):
    """sft.freeze_vision: after supervised steps the tower is bit-identical, the rest moved."""
    import optax

    from balcap_jax.train.sft import make_sft_optimizer
    _, _, params, _, _ = shapes_policy
    from balcap_jax.config import base_config
    sc = base_config().sft
    sc.update(lr=1e-2, warmup_steps=1, freeze_vision=True)
    opt = make_sft_optimizer(sc, params)
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    p = params
    for _ in range(2):
        upd, state = jax.jit(opt.update)(grads, state, p)
        p = optax.apply_updates(p, upd)
    flat_old = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for k, v in jax.tree_util.tree_flatten_with_path(p)[0]:
        same = np.array_equal(np.asarray(v), np.asarray(flat_old[k]))
        assert same == ("visual" in jax.tree_util.keystr(k)), jax.tree_util.keystr(k)
    with pytest.raises(ValueError, match="needs params"):
        make_sft_optimizer(sc)
