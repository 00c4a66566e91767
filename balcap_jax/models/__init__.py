"""Flax NNX policies and the layers they share; Hugging Face checkpoints in and out.

`from_pretrained(path, *, dtype="float32", mesh=None, rules=None)` and
`save_pretrained(model, path)` dispatch on config.json's model_type (registry in hf.py).
"""
from balcap_jax.models.decoder import (
                                       CausalLM,
                                       Decoder,
                                       DecoderConfig,
                                       KVCache,
                                       token_logprobs_from_hidden,
)
from balcap_jax.models.hf import from_pretrained, save_pretrained

__all__ = ["CausalLM", "Decoder", "DecoderConfig", "KVCache", "from_pretrained",
           "save_pretrained", "token_logprobs_from_hidden"]
