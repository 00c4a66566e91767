"""Builds a run's parts from its config: mesh, policy, tokenizer, processor, data, scorer.

Kept apart from train.py so the loop stays readable and tests can hand the Trainer parts of
their own (a tiny model, a scripted scorer) without going through a config.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from balcap_jax import memory_plan as mp
from balcap_jax.sharding import Rules, make_mesh

__all__ = ["hf_config_of", "memory_plan", "mesh_and_rules", "build_policy", "build_tokenizer",
           "build_parts", "build_trainer", "export"]


def hf_config_of(cfg) -> dict:
    """The policy's HF config dict: the checkpoint's config.json, a preset, or explicit."""
    path = os.path.join(cfg.model.path, "config.json") if cfg.model.path else ""
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if cfg.model.preset:   # shapes for planning (the checkpoint itself is read at build time)
        from balcap_jax.models.presets import preset
        out = preset(cfg.model.preset)
        out.update(cfg.model.hf_config.to_dict())
        return out
    if path:
        raise FileNotFoundError(f"model.path={cfg.model.path!r} has no config.json; point it at "
                                "a Hugging Face checkpoint directory")
    return cfg.model.hf_config.to_dict()


def memory_plan(cfg, mesh_sizes: dict, *, query_device: bool = True) -> mp.MemoryPlan:
    s, t = cfg.sampling, cfg.train
    limit = cfg.mesh.device_memory_gb * mp.GiB if cfg.mesh.device_memory_gb else None
    if limit is None and query_device:
        limit = mp.device_memory_bytes()
    return mp.plan_memory(
        hf_config_of(cfg), mesh_shape=mesh_sizes, param_dtype=cfg.model.dtype,
        rollouts_per_step=t.batch_size * s.num_samples, prompt_len=cfg.data.get(
            "max_prompt_tokens", 1024), max_new_tokens=s.max_new_tokens,
        micro_batch=t.micro_batch_size, remat=t.remat, freeze_vision=t.freeze_vision,
        reference_model=cfg.rl.beta > 0, image_tokens=cfg.data.get("max_image_tokens", 1024),
        device_bytes=limit)


def mesh_and_rules(cfg, mesh_sizes: dict):
    mesh = make_mesh((mesh_sizes["data"], mesh_sizes["fsdp"], mesh_sizes["tensor"]))
    overrides = cfg.mesh.get("rules", None)
    return mesh, Rules.create(overrides.to_dict() if overrides else None)


def build_policy(cfg, mesh=None, rules=None):
    """Loads model.path, or random-initialises the configured shapes (seeded by cfg.seed)."""
    from balcap_jax import models
    if cfg.model.path:
        return models.from_pretrained(cfg.model.path, dtype=cfg.model.dtype, mesh=mesh,
                                      rules=rules)
    from balcap_jax.models.random_init import from_config
    return from_config(hf_config_of(cfg), dtype=cfg.model.dtype, seed=cfg.seed,
                              mesh=mesh, rules=rules)


def build_tokenizer(cfg, corpus=None):
    """``model.tokenizer``: "qwen2.5" (offline real vocabulary), "tiny" (a BPE trained on the
    data's references), a directory, or "" for model.path."""
    from balcap_jax import tokenizers
    name = cfg.model.tokenizer or cfg.model.path
    if name == "qwen2.5":
        return tokenizers.qwen25_tokenizer()
    if name == "tiny":
        if corpus is None:
            raise ValueError("model.tokenizer='tiny' needs a corpus (the data's references)")
        return tokenizers.train_tiny_bpe(corpus, vocab_size=cfg.model.get("tiny_vocab", 400))
    if not name:
        raise ValueError("set model.tokenizer ('qwen2.5', 'tiny' or a directory) or model.path")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name)


def _loader_and_eval(cfg, shard: tuple[int, int] | None = None):
    """(this host's training loader, the held-out examples); `shard` = (index, count) overrides
    the host's own data shard, (0, 1) reads the whole stream."""
    d = cfg.data
    shard, shards = shard or (jax.process_index(), jax.process_count())
    per_host = cfg.train.batch_size // shards
    if d.source == "synthetic":
        from balcap_jax.data.synthetic import SyntheticCaptions, synthetic_example
        loader = SyntheticCaptions(num_examples=d.num_train, batch_size=per_host, seed=cfg.seed,
                                   image_size=d.image_size, prompt=d.prompt, shard_index=shard,
                                   shard_count=shards)
        evals = [dict(synthetic_example(cfg.seed + 100_003, i, d.image_size), prompt=d.prompt)
                 for i in range(d.num_eval)]
        return loader, evals
    if d.source == "shapes":   # ShapesWorld through the same TFDS + grain path as real data
        from balcap_jax.data import shapes
        builder = shapes.build_shapes_dataset(
            seed=d.get("world_seed", 0), num_train=d.num_train, num_eval=d.num_eval,
            image_size=d.image_size, data_dir=d.get("data_dir", "") or
            os.path.join(cfg.workdir, "tfds"))
        loader = shapes.make_shapes_loader(builder, batch_size=per_host, seed=cfg.seed,
                                           shard_index=shard, shard_count=shards)
        return loader, shapes.shapes_eval_examples(builder, d.num_eval)
    if d.source == "tfds":
        from balcap_jax.data import config as data_config
        loader = data_config.make_loader(d, batch_size=per_host, seed=cfg.seed,
                                         shard_index=shard, shard_count=shards)
        evals = data_config.eval_examples(d) if hasattr(data_config, "eval_examples") else []
        return loader, evals
    raise ValueError(f"data.source={d.source!r}: use 'synthetic', 'shapes' or 'tfds'")


def _llava_processor(cfg, tokenizer, hf_config: dict):
    from balcap_jax.models.llava import LlavaConfig
    from balcap_jax.processing import LlavaImageProcessor, LlavaProcessor
    mc = LlavaConfig.from_hf(hf_config)
    ip = cfg.data.get("image_processor", None)
    if cfg.model.path and os.path.exists(os.path.join(cfg.model.path,
                                                      "preprocessor_config.json")):
        image_processor = LlavaImageProcessor.from_pretrained(cfg.model.path)
    else:   # the tower's own resolution unless the config says otherwise
        s = mc.vision.image_size
        image_processor = LlavaImageProcessor(**dict(dict(size=s, crop_size=(s, s)),
                                                     **(ip.to_dict() if ip else {})))
    return LlavaProcessor(tokenizer, image_processor, patch_size=mc.vision.patch_size,
                          vision_feature_select_strategy=mc.vision_feature_select_strategy,
                          image_token=tokenizer.convert_ids_to_tokens(mc.image_token_id))


def _processor(cfg, tokenizer, hf_config: dict):
    from balcap_jax.processing import QwenImageProcessor, Qwen25VLProcessor
    if hf_config.get("model_type") == "llava":
        return _llava_processor(cfg, tokenizer, hf_config)
    if hf_config.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"no processor wired for model_type={hf_config.get('model_type')!r}")
    ip = cfg.data.get("image_processor", None)
    if cfg.model.path and os.path.exists(os.path.join(cfg.model.path,
                                                      "preprocessor_config.json")):
        image_processor = QwenImageProcessor.from_pretrained(cfg.model.path)
    else:
        image_processor = QwenImageProcessor(**(ip.to_dict() if ip else {}))
    return Qwen25VLProcessor(tokenizer, image_processor)


def build_parts(cfg, mesh=None, rules=None):
    from balcap_jax.rewards.base import make_scorer
    from balcap_jax.train import RunParts
    loader, evals = _loader_and_eval(cfg)
    hf_config = hf_config_of(cfg)
    corpus = None
    if cfg.model.tokenizer == "tiny" and cfg.data.source == "shapes":
        from balcap_jax.data.shapes import SHAPES_PROMPT, tokenizer_corpus
        corpus = list(tokenizer_corpus(seed=cfg.data.get("world_seed", 0))) + [SHAPES_PROMPT]
    elif cfg.model.tokenizer == "tiny":  # a BPE trained on what the run will see
        # read unsharded: every host must train the same tokenizer
        probe, _ = _loader_and_eval(cfg, shard=(0, 1))
        corpus = [r for _ in range(4) for e in next(probe) for r in e["references"]]
        corpus += [r for e in evals for r in e["references"]] + [cfg.data.prompt]
    tokenizer = build_tokenizer(cfg, corpus)
    text = hf_config.get("text_config") or hf_config
    vocab = text.get("vocab_size", hf_config.get("vocab_size"))
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{vocab}; raise the model's vocab_size or pick a matching tokenizer")
    # Qwen's two stop tokens where the vocabulary has them (a Llama vocabulary maps them to
    # <unk>), plus the tokenizer's own eos (</s> for LLaVA)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    eos_ids = [i for i in eos_ids if i is not None and i != tokenizer.unk_token_id]
    eos_ids += [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    eos = tuple(dict.fromkeys(int(t) for t in eos_ids))
    policy = build_policy(cfg, mesh, rules)
    if cfg.train.remat:
        policy.set_remat(True)
    return RunParts(model=policy, tokenizer=tokenizer, processor=_processor(cfg, tokenizer,
                    hf_config), scorer=make_scorer(cfg, tokenizer, mesh=mesh, rules=rules), loader=loader,
                    eval_examples=evals, eos_token_ids=eos, pad_id=int(tokenizer.pad_token_id))


def build_trainer(cfg, mesh=None, rules=None):
    from balcap_jax.train import Trainer
    return Trainer(cfg, build_parts(cfg, mesh, rules))


def export(trainer, path: str) -> str | None:
    """Writes the policy with save_pretrained (transformers-loadable) and the tokenizer."""
    from balcap_jax import models
    models.save_pretrained(trainer.model(), path)
    trainer.p.tokenizer.save_pretrained(path)
    return path

