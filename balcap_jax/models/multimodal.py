"""What every vision-language policy shares: writing image embeddings into the text stream."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def scatter_image_embeds(x: Array, input_ids: Array, image_token_id: int,
                         image_embeds: Array | None) -> Array:
    """Text embeddings x [B,T,D] with image_embeds rows written, in order, at the image tokens
    (row-major over the batch, as HF masked_scatter).

    A fixed-size gather, so it jits for any number of image tokens: the caller must supply at
    least as many rows as there are image tokens (the models' host-side checks do).
    """
    if image_embeds is None:
        return x
    if image_embeds.shape[-1] != x.shape[-1]:
        raise ValueError(f"image_embeds dim {image_embeds.shape[-1]} != hidden {x.shape[-1]}")
    is_img = input_ids == image_token_id
    idx = jnp.cumsum(is_img.reshape(-1).astype(jnp.int32)) - 1
    idx = jnp.clip(idx, 0, image_embeds.shape[0] - 1).reshape(is_img.shape)
    rows = jnp.take(image_embeds, idx, axis=0).astype(x.dtype)
    return jnp.where(is_img[..., None], rows, x)
