"""Supervised pretraining of the policy's vision tower on per-image-token labels.

A real MLLM starts from a pretrained image encoder; a randomly initialised tiny policy does
not, and on ShapesWorld the caption loss alone never teaches its tower to tell shapes apart
(one-object probes: the shape token's loss stays at chance, ln 4, while colour is learned).
This stage trains the tower, through its merger, with one linear head per label set on the
RMS-normalised image embeddings, then discards the heads: what is kept is a tower whose output
rows already separate the labelled attributes.

    params, losses = pretrain_vision(model, params, batches,
                                     num_classes={"shape": 5, "color": 7}, steps=300)

`batches` yields (pixel_values, image_grid_thw, labels) with labels {name: int [B, T]}, T the
image tokens per image (every image of a batch has the same grid), in the row-major order the
tower returns them. Only `params["visual"]` changes; freeze the tower afterwards
(`sft.freeze_vision`, `train.freeze_vision`), or the caption loss's gradient erases what it
learned. Supported for models with `prepare_vision_inputs` and a `visual` tower (Qwen2.5-VL).
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from balcap_jax import precision
from balcap_jax.models.qwen2_5_vl_index import image_token_counts

__all__ = ["pretrain_vision", "probe_loss"]


def _heads(dim: int, num_classes: Mapping[str, int], seed: int) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(seed), len(num_classes))
    return {n: {"w": jax.random.normal(k, (dim, c)) * 0.02, "b": jnp.zeros((c,))}
            for (n, c), k in zip(sorted(num_classes.items()), keys)}


def probe_loss(embeds, heads, labels, num_images: int):
    """Summed mean cross-entropy of the heads over the first num_images * T rows of `embeds`
    ([rows, D], image order); `labels` {name: [num_images, T]}."""
    t = next(iter(labels.values())).shape[1]
    e = embeds[: num_images * t].reshape(num_images, t, -1)
    e = e / (jnp.sqrt(jnp.mean(e * e, axis=-1, keepdims=True)) + 1e-6)
    total = 0.0
    for name, y in labels.items():
        logits = e @ heads[name]["w"] + heads[name]["b"]
        total = total + optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return total


def pretrain_vision(model, params, batches: Iterator, num_classes: Mapping[str, int], *,
                    steps: int, lr: float = 1e-3, seed: int = 0,
                    log: Callable[[str], None] | None = print, log_every: int = 100) -> tuple:
    """Trains params["visual"] (AdamW at peak `lr`: 10% warm-up, cosine decay to lr / 10,
    global-norm clip 1, no weight decay) for `steps` batches; returns
    (params with the new tower, list of per-step losses). `model` supplies the host-side
    vision layout and the graph (its own parameters are not read)."""
    if not hasattr(model, "prepare_vision_inputs") or "visual" not in params:
        raise ValueError(f"{type(model).__name__} has no Qwen2.5-VL style vision tower "
                         "(prepare_vision_inputs / params['visual']); vision pretraining "
                         "supports Qwen2.5-VL policies")
    vis_graph, _ = nnx.split(model.visual)
    dim = params["visual"]["merger"]["fc2"]["kernel"].value.shape[-1]
    heads = _heads(dim, num_classes, seed)
    # warm-up, cosine decay and clipping: a constant lr of 1e-3 is not stable on every seed
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(int(steps) // 10, 1),
                                                  max(int(steps), 2), end_value=0.1 * lr)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    trainable = (params["visual"], heads)
    master = precision.init_master(trainable)   # float32 copies of a bf16 tower
    opt_state = opt.init(precision.optimizer_view(trainable, master))

    def loss_fn(tr, vi, labels, num_images):
        vis, hd = tr
        return probe_loss(nnx.merge(vis_graph, vis)(vi), hd, labels, num_images)

    @jax.jit
    def step(tr, master, opt_state, vi, labels):
        n = next(iter(labels.values())).shape[0]
        loss, g = jax.value_and_grad(loss_fn)(tr, vi, labels, n)
        updates, opt_state = opt.update(jax.tree.map(lambda x: x.astype(jnp.float32), g),
                                        opt_state, precision.optimizer_view(tr, master))
        tr, master = precision.apply_updates(tr, master, updates)
        return tr, master, opt_state, loss

    losses, t0 = [], time.perf_counter()
    for i in range(int(steps)):
        pixel_values, grid, labels = next(batches)
        unknown = set(labels) - set(num_classes)
        if unknown:
            raise ValueError(f"labels {sorted(unknown)} have no entry in num_classes")
        grid = np.asarray(grid)
        shapes = {k: np.shape(v) for k, v in labels.items()}
        tokens = image_token_counts(grid, model.vl_cfg.vision.spatial_merge_size)
        if any(s != (len(grid), tokens[0]) for s in shapes.values()) or len(set(tokens)) > 1:
            raise ValueError(f"labels {shapes} must be [images, tokens per image] = "
                             f"[{len(grid)}, {tokens}] for image_grid_thw "
                             f"{grid.tolist()} (all images of a batch on the same grid)")
        vi = model.prepare_vision_inputs(np.asarray(pixel_values), grid)
        trainable, master, opt_state, loss = step(trainable, master, opt_state, vi,
                                          {k: jnp.asarray(v, jnp.int32) for k, v in labels.items()})
        losses.append(float(loss))
        if log and ((i + 1) % log_every == 0 or i + 1 == steps):
            log(f"[vision pretrain] step {i + 1}/{steps}: loss "
                f"{np.mean(losses[-log_every:]):.3f} ({time.perf_counter() - t0:.0f} s)")
    out = jax.tree.map(lambda x: x, params)   # a new tree: the caller's params stay as they were
    # back onto the tower's own shardings, so a jitted step compiled for them is reused
    out["visual"] = jax.tree.map(
        lambda new, old: jax.device_put(new, old.sharding) if hasattr(old, "sharding") else new,
        trainable[0], params["visual"])
    return out, losses
