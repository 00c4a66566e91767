"""Builds a run's parts from its config: mesh, memory plan, policy, tokenizer, processor, data
and scorer. The only module where the config becomes objects: the trainer, the scorers and the
data loaders take objects, so tests can hand them parts of their own (a tiny model, a scripted
scorer) without going through a config.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax

from balcap_jax import memory_plan as mp
from balcap_jax.sharding import Rules, make_mesh

log = logging.getLogger(__name__)

__all__ = ["hf_config_of", "memory_plan", "mesh_and_rules", "judge_mesh", "judge_devices",
           "prompt_buckets", "bound_image_processor", "build_policy", "build_tokenizer",
           "build_scorer", "build_parts", "build_trainer", "export"]


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


def _judge_hf_config(j, role: str) -> dict:
    """A judge's HF config dict for planning: its checkpoint's config.json, else the
    judges.<role>_preset shapes (so a pod can be planned before the checkpoints are there)."""
    path = j[f"{role}_path"]
    file = os.path.join(path, "config.json") if path else ""
    if file and os.path.exists(file):
        with open(file) as f:
            return json.load(f)
    if j[f"{role}_preset"]:
        from balcap_jax.models.presets import preset
        return preset(j[f"{role}_preset"])
    raise FileNotFoundError(f"judges.{role}_path={path!r} has no config.json to plan the judge's "
                            f"memory from; point it at the checkpoint or set "
                            f"judges.{role}_preset (e.g. 'qwen2_5_vl_7b', 'qwen2_5_7b')")


def _in_process_judges(cfg) -> bool:
    return cfg.scorer.name == "judges" and cfg.judges.backend == "in_process"


def judge_devices(cfg) -> int:
    """Devices set aside for in-process judges (0: they share the policy's devices)."""
    return int(cfg.judges.devices) if _in_process_judges(cfg) else 0


def _judge_plan_items(cfg, mesh_sizes: dict) -> list:
    """The in-process judges' plan items ([] for remote or no judges)."""
    if not _in_process_judges(cfg):
        return []
    j = cfg.judges
    own = judge_devices(cfg)
    if own:
        shard, batch_shards, tensor = own, own, 1
    else:
        shard = mesh_sizes["fsdp"] * mesh_sizes["tensor"]
        batch_shards = mesh_sizes["data"] * mesh_sizes["fsdp"]
        tensor = mesh_sizes["tensor"]
    roles = ["multimodal"] + (["text"] if j.text_path else [])
    items = []
    for role in roles:
        name = os.path.basename(os.path.normpath(j[f"{role}_path"] or "")) or \
            j[f"{role}_preset"] or role
        shared = shares_policy_base(cfg, role)
        items += [it for it in mp.judge_items(
            name, _judge_hf_config(j, role), dtype=j.dtype, shard=shard,
            batch_shards=batch_shards, tensor=tensor, caption_tokens=cfg.sampling.max_new_tokens,
            image_tokens=int(j.max_image_tokens or cfg.data.max_image_tokens or 1024),
            list_max_tokens=int(j.list_max_tokens), decode_batch=int(j.decode_batch),
            prefix_batch=int(j.prefix_batch), item_tokens=int(j.item_tokens),
            text_roles=role == "text" or len(roles) == 1)
            if not (shared and it.name.startswith("judge weights"))]   # the policy's own
    return items


def rollout_layout(cfg, mesh_sizes: dict, *, query_device: bool = True) -> str:
    """train.rollout_layout resolved: "replicated" (auto) when the mesh has fsdp > 1 and the
    memory plan fits with the rollout copy of the weights counted, else "fsdp"."""
    layout = cfg.train.rollout_layout
    if layout != "auto":
        return layout
    if mesh_sizes["fsdp"] == 1:
        return "fsdp"
    plan = memory_plan(cfg, mesh_sizes, query_device=query_device, rollout="replicated")
    try:
        plan.check()
        return "replicated"
    except MemoryError:
        return "fsdp"


def memory_plan(cfg, mesh_sizes: dict, *, query_device: bool = True,
                rollout: str | None = None) -> mp.MemoryPlan:
    """The per-device plan of `cfg` on `mesh_sizes`, with its in-process judges: on the
    policy's devices by default, or as a second plan for `judges.devices` of their own."""
    s, t, d = cfg.sampling, cfg.train, cfg.data
    limit = cfg.mesh.device_memory_gb * mp.GiB if cfg.mesh.device_memory_gb else None
    if limit is None and query_device:
        limit = mp.device_memory_bytes()
    rollout = rollout or rollout_layout(cfg, mesh_sizes, query_device=query_device)
    buckets = prompt_buckets(cfg)
    plan = mp.plan_memory(
        hf_config_of(cfg), mesh_shape=mesh_sizes, param_dtype=cfg.model.dtype,
        rollouts_per_step=t.batch_size * s.num_samples, prompts_per_step=t.batch_size,
        prompt_len=max(buckets) if buckets else 1024, max_new_tokens=s.max_new_tokens,
        micro_batch=t.micro_batch_size, remat=t.remat, freeze_vision=t.freeze_vision,
        reference_model=cfg.rl.beta > 0, image_tokens=d.max_image_tokens or 1024,
        device_bytes=limit, rollout_replicated=rollout == "replicated",
        optimizer=t.optimizer, moment_dtype=t.moment_dtype,
        lora_rank=int(cfg.model.lora.rank), lora_quantize=cfg.model.lora.quantize)
    judges = _judge_plan_items(cfg, mesh_sizes)
    if judge_devices(cfg):
        plan.others.append(mp.MemoryPlan(judges, limit,
                                         title=f"judge devices ({judge_devices(cfg)})"))
    else:
        plan.items += judges
    return plan


def mesh_and_rules(cfg, mesh_sizes: dict):
    """The policy's mesh (the first devices; the last `judges.devices` are the judges')."""
    n = mesh_sizes["data"] * mesh_sizes["fsdp"] * mesh_sizes["tensor"]
    mesh = make_mesh((mesh_sizes["data"], mesh_sizes["fsdp"], mesh_sizes["tensor"]),
                     jax.devices()[:n])
    overrides = cfg.mesh.rules.to_dict()
    return mesh, Rules.create(overrides or None)


def judge_mesh(cfg, mesh):
    """The judges' mesh: the last `judges.devices` devices (fsdp over them), or the policy's."""
    own = judge_devices(cfg)
    if not own:
        return mesh
    if jax.process_count() > 1:
        raise ValueError("judges.devices (judges on devices of their own) is single-host only; "
                         "on several hosts share the policy's devices (judges.devices=0) or "
                         "serve the judges remotely (judges.backend=remote)")
    return make_mesh((1, own, 1), jax.devices()[-own:])


def build_policy(cfg, mesh=None, rules=None):
    """Loads model.path, or random-initialises the configured shapes (seeded by cfg.seed)."""
    from balcap_jax import models
    if cfg.model.path:
        from balcap_jax.models.hf import LoadStats
        stats = LoadStats()
        t = time.time()
        model = models.from_pretrained(cfg.model.path, dtype=cfg.model.dtype, mesh=mesh,
                                       rules=rules, stats=stats)
        # each host reads only the slices its devices hold: one line per host says how much
        print(f"[balcap_jax] host {jax.process_index()}: loaded {cfg.model.path}: "
              f"{stats.summary()} in {time.time() - t:.1f} s", flush=True)
        return model
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
        return tokenizers.train_tiny_bpe(corpus, vocab_size=cfg.model.tiny_vocab)
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
        from balcap_jax import shapes
        builder = shapes.build_shapes_dataset(
            seed=d.world_seed, num_train=d.num_train, num_eval=d.num_eval,
            image_size=d.image_size, data_dir=d.data_dir or os.path.join(cfg.workdir, "tfds"))
        loader = shapes.make_shapes_loader(builder, batch_size=per_host, seed=cfg.seed,
                                           shard_index=shard, shard_count=shards)
        return loader, shapes.shapes_eval_examples(builder, d.num_eval)
    if d.source == "tfds":
        from balcap_jax.data import config as data_config
        d = data_config.with_defaults(d)
        d.data_dir = d.data_dir or os.path.join(cfg.workdir, "tfds")
        loader = data_config.make_loader(d, batch_size=per_host, seed=cfg.seed,
                                         shard_index=shard, shard_count=shards)
        return loader, data_config.eval_examples(d)
    raise ValueError(f"data.source={d.source!r}: use 'synthetic', 'shapes' or 'tfds'")


def _llava_processor(cfg, tokenizer, hf_config: dict):
    from balcap_jax.models.llava import LlavaConfig
    from balcap_jax.processing import LlavaImageProcessor, LlavaProcessor
    mc = LlavaConfig.from_hf(hf_config)
    ip = cfg.data.image_processor.to_dict()
    if cfg.model.path and os.path.exists(os.path.join(cfg.model.path,
                                                      "preprocessor_config.json")):
        image_processor = LlavaImageProcessor.from_pretrained(cfg.model.path)
    else:   # the tower's own resolution unless the config says otherwise
        s = mc.vision.image_size
        image_processor = LlavaImageProcessor(**dict(dict(size=s, crop_size=(s, s)), **ip))
    return LlavaProcessor(tokenizer, image_processor, patch_size=mc.vision.patch_size,
                          vision_feature_select_strategy=mc.vision_feature_select_strategy,
                          image_token=tokenizer.convert_ids_to_tokens(mc.image_token_id))


def bound_image_processor(image_processor, max_image_tokens: int, overrides: dict | None = None):
    """A Qwen image processor whose max_pixels keeps every image within `max_image_tokens`
    (0: unbounded), with `overrides` (data.image_processor) applied; an explicit max_pixels
    above the bound is an error naming both fields."""
    overrides = dict(overrides or {})
    if overrides:
        image_processor = dataclasses.replace(image_processor, **overrides)
    cap = int(max_image_tokens) * image_processor.factor ** 2
    if max_image_tokens > 0 and overrides.get("max_pixels", 0) > cap:
        raise ValueError(f"data.image_processor.max_pixels={overrides['max_pixels']} allows more "
                         f"than data.max_image_tokens={max_image_tokens} image tokens ({cap} "
                         "pixels); lower it or raise data.max_image_tokens")
    return image_processor.with_max_tokens(int(max_image_tokens))


def _processor(cfg, tokenizer, hf_config: dict):
    from balcap_jax.processing import Qwen25VLProcessor, QwenImageProcessor
    if hf_config.get("model_type") == "llava":
        return _llava_processor(cfg, tokenizer, hf_config)
    if hf_config.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"no processor wired for model_type={hf_config.get('model_type')!r}")
    if cfg.model.path and os.path.exists(os.path.join(cfg.model.path,
                                                      "preprocessor_config.json")):
        image_processor = QwenImageProcessor.from_pretrained(cfg.model.path)
    else:
        image_processor = QwenImageProcessor()
    image_processor = bound_image_processor(image_processor, cfg.data.max_image_tokens,
                                            cfg.data.image_processor.to_dict())
    return Qwen25VLProcessor(tokenizer, image_processor)


def prompt_buckets(cfg) -> tuple[int, ...] | None:
    """The fixed prompt lengths of a run: data.prompt_buckets, else (data.max_prompt_tokens,);
    None (max_prompt_tokens 0) pads each batch to the power of two above its longest prompt."""
    d = cfg.data
    buckets = tuple(int(b) for b in d.prompt_buckets or ())
    if buckets:
        return tuple(sorted(buckets))
    return (int(d.max_prompt_tokens),) if d.max_prompt_tokens > 0 else None


def _check_prompt_fits(cfg, processor, buckets) -> None:
    """Fails before any compile when the configured instruction with the largest image does
    not fit the largest prompt bucket."""
    if not buckets or cfg.data.max_image_tokens <= 0:
        return
    from balcap_jax.processing import build_caption_prompt
    prompts = [cfg.data.prompt] + list(cfg.data.prompts or ())
    text = max(len(processor.tokenizer(build_caption_prompt(p, processor.tokenizer),
                                       add_special_tokens=True)["input_ids"]) for p in prompts)
    need = text - 1 + int(cfg.data.max_image_tokens)   # the placeholder becomes the image tokens
    if need > max(buckets):
        raise ValueError(f"a prompt needs up to {need} tokens ({text - 1} of text and "
                         f"data.max_image_tokens={cfg.data.max_image_tokens} of image) but the "
                         f"largest prompt bucket is {max(buckets)}; set data.max_prompt_tokens "
                         f">= {need} (or lower data.max_image_tokens)")


def build_scorer(cfg, tokenizer, *, mesh=None, rules=None, policy=None):
    """The scorer named by `scorer.name`: the scripted token-frequency reward, ShapesWorld's
    exact scorer, or BalCapRL's judges (on `mesh`: the policy's, or their own devices). A
    judge whose checkpoint is a LoRA `policy`'s base runs on that policy's frozen weights."""
    name = cfg.scorer.name
    if name == "token_frequency":
        from balcap_jax.rewards.scripted import TokenFrequencyScorer
        ids = []
        for tok in cfg.scorer.tokens:
            enc = tokenizer.encode(tok, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"scorer.tokens entry {tok!r} is {len(enc)} tokens for this "
                                 "tokenizer; use strings that are exactly one token each")
            ids += enc
        return TokenFrequencyScorer(ids, names=tuple(cfg.rl.rewards))
    if name == "shapes":
        from balcap_jax.shapes.scorer import ShapesScorer
        return ShapesScorer()
    if name == "judges":
        return _judges_scorer(cfg, mesh=mesh, rules=rules, policy=policy)
    raise ValueError(f"unknown scorer.name={name!r}")


def build_eval_judge(kind: str, scorer=None, load_image=None):
    """The evaluation's judge (balcap_jax.eval.judges): "none", "llm" (the judge model of a
    `judges` scorer answers the questions) or "shapes" (ShapesWorld's exact judge)."""
    if kind == "none":
        return None
    if kind == "llm":
        from balcap_jax.eval.judges import LLMJudge
        if not hasattr(scorer, "backend"):
            raise ValueError("eval_judge=llm needs scorer.name=judges: its judge model answers "
                             "the evaluation's questions")
        return LLMJudge(scorer.backend, load_image)
    if kind == "shapes":
        from balcap_jax.shapes.eval_judge import ShapesEvalJudge
        return ShapesEvalJudge()
    raise ValueError(f"eval_judge={kind!r}: use none, llm or shapes")


def judge_cache(cfg):
    """The judges' reference-unit cache (SQLite) as a workdir.Mirror: in the workdir, or in a
    local copy synced to a bucket workdir (SQLite cannot live in a bucket)."""
    from balcap_jax.workdir import Mirror, join
    return Mirror(cfg.judges.cache_dir or join(cfg.workdir, "judge_cache"))


def shares_policy_base(cfg, role: str) -> bool:
    """True when judge `role`'s checkpoint is the policy's own and the policy trains LoRA
    adapters on the judges' devices: the judge then runs on the policy's frozen base weights,
    adapters off, with no second copy (a fully fine-tuned policy's weights move, so a judge
    from the same checkpoint is loaded on its own)."""
    path, own = cfg.judges[f"{role}_path"], cfg.model.path
    return bool(path and own and cfg.model.lora.rank > 0 and not judge_devices(cfg) and
                os.path.realpath(path) == os.path.realpath(own))


def _judges_scorer(cfg, *, mesh=None, rules=None, policy=None):
    """BalCapScorer from the `judges` block: in-process judges (local checkpoints) or an
    OpenAI-compatible endpoint; every field and default in config.base_config()."""
    from balcap_jax.rewards.balcap import REWARDS, BalCapScorer
    j = cfg.judges
    cache = judge_cache(cfg)
    cache.pull("reference_units.sqlite")       # a bucket workdir: the units of earlier runs
    cache_dir = cache.local
    rewards = tuple(r for r in cfg.rl.rewards if r in REWARDS) or REWARDS
    if j.backend == "remote":
        from balcap_jax.rewards.remote import RemoteBackend
        if not j.base_url or not j.model:
            raise ValueError("judges.backend='remote' needs judges.base_url and judges.model")
        key = os.environ.get(j.api_key_env or "")
        common = dict(api_key=key or None, timeout=float(j.timeout),
                      max_retries=int(j.max_retries), concurrency=int(j.concurrency),
                      top_logprobs=int(j.top_logprobs))
        mm = text = RemoteBackend.from_url(j.base_url, j.model, **common)
        if j.text_base_url or j.text_model:
            text = RemoteBackend.from_url(j.text_base_url or j.base_url, j.text_model or j.model,
                                          **common)
    elif j.backend == "in_process":
        from balcap_jax.rewards.judges import load_backend
        if not j.multimodal_path:
            raise ValueError("judges.backend='in_process' needs judges.multimodal_path (a local "
                             "checkpoint directory), or use judges.backend='remote'")
        kw = dict(list_max_tokens=int(j.list_max_tokens), decode_batch=int(j.decode_batch),
                  prefix_batch=int(j.prefix_batch), item_tokens=int(j.item_tokens),
                  max_image_tokens=int(j.max_image_tokens or cfg.data.max_image_tokens))

        def backend(role):
            path = j[f"{role}_path"]
            shared = None
            if policy is not None and shares_policy_base(cfg, role):
                from balcap_jax.models import lora
                shared = lora.without_adapters(policy)
                print(f"[balcap_jax] judge {path}: runs on the policy's frozen base weights "
                      f"(adapters off, {cfg.model.dtype}); no second copy is loaded", flush=True)
            return load_backend(path, dtype=j.dtype, mesh=mesh, rules=rules, model=shared, **kw)
        mm = text = backend("multimodal")
        if j.text_path:
            text = backend("text")
    else:
        raise ValueError(f"judges.backend={j.backend!r}: use 'in_process' or 'remote'")
    return BalCapScorer(mm, text_backend=text, threshold=bool(j.threshold),
                        pointability=bool(j.pointability), rewards=rewards, cache_dir=cache_dir)


def _ready_policy(cfg, mesh=None, rules=None):
    """The policy with the model block's kernels and the data block's fixed vision slot."""
    policy = build_policy(cfg, mesh, rules)
    lc = cfg.model.lora
    adapter = cfg.model.get("adapter", "")
    if adapter:       # trained adapters onto model.path's weights, with their own settings
        from balcap_jax.models import lora
        lora.apply_lora(policy, **lora.peft_settings(adapter), quantize=lc.quantize,
                        seed=cfg.seed, mesh=mesh, rules=rules)
        n = lora.load_peft(policy, adapter)
        log.info("loaded %d adapted projections from %s", n, adapter)
    elif lc.rank > 0:  # adapters (and a quantised base) before anything reads the parameters
        from balcap_jax.models import lora
        lora.apply_lora(policy, rank=int(lc.rank), alpha=float(lc.alpha),
                        modules=tuple(lc.modules), parts=tuple(lc.parts),
                        quantize=lc.quantize, seed=cfg.seed, mesh=mesh, rules=rules)
    from balcap_jax.models.attention import resolve
    policy.set_attention(resolve(cfg.model.attention, cfg.model.dtype))
    policy.set_decode_layers(cfg.model.decode_layers)
    from balcap_jax.models import stack
    stack.set_unroll(policy, cfg.model.get("scan_unroll", 1))
    if cfg.data.max_image_tokens > 0 and hasattr(policy, "vision_slot"):
        # every image padded to a slot of max_image_tokens: the vision shapes are fixed
        policy.vision_slot = int(cfg.data.max_image_tokens) * \
            policy.vl_cfg.vision.spatial_merge_size ** 2
    return policy


def build_parts(cfg, mesh=None, rules=None):
    from balcap_jax.train import RunParts
    loader, evals = _loader_and_eval(cfg)
    corpus = None
    if cfg.model.tokenizer == "tiny" and cfg.data.source == "shapes":
        from balcap_jax.shapes import SHAPES_PROMPT, tokenizer_corpus
        corpus = list(tokenizer_corpus(seed=cfg.data.world_seed)) + [SHAPES_PROMPT]
    elif cfg.model.tokenizer == "tiny":  # a BPE trained on what the run will see
        # read unsharded: every host must train the same tokenizer
        probe, _ = _loader_and_eval(cfg, shard=(0, 1))
        corpus = [r for _ in range(4) for e in next(probe) for r in e["references"]]
        corpus += [r for e in evals for r in e["references"]] + [cfg.data.prompt]
    tokenizer = build_tokenizer(cfg, corpus)
    cap = build_captioner(cfg, mesh, rules, tokenizer=tokenizer)
    policy = cap.model
    if cfg.train.remat:
        policy.set_remat(True)
    sizes = {"data": 1, "fsdp": 1, "tensor": 1} if mesh is None else dict(mesh.shape)
    return RunParts(model=policy, tokenizer=tokenizer, processor=cap.processor,
                    scorer=build_scorer(cfg, tokenizer, mesh=None if mesh is None else
                                        judge_mesh(cfg, mesh), rules=rules, policy=policy),
                    loader=loader,
                    eval_examples=evals, eos_token_ids=cap.eos_token_ids, pad_id=cap.pad_id,
                    prompt_buckets=cap.prompt_buckets, rollout_layout=rollout_layout(cfg, sizes))


@dataclasses.dataclass
class Captioner:
    """A policy with what sampling needs, for captioning outside a training run."""
    model: object
    tokenizer: object
    processor: object
    eos_token_ids: tuple
    pad_id: int
    prompt_buckets: tuple | None


def build_captioner(cfg, mesh=None, rules=None, *, tokenizer=None) -> Captioner:
    """The policy and what sampling it needs: its tokenizer (`tokenizer`, else
    model.tokenizer or model.path's), the data block's processor and fixed shapes, the stop and
    pad ids. A training run (build_parts) and `balcap_jax.caption` both start here."""
    from balcap_jax.tokenizers import stop_token_ids
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg)
    hf_config = hf_config_of(cfg)
    text = hf_config.get("text_config") or hf_config
    vocab = text.get("vocab_size", hf_config.get("vocab_size"))
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{vocab}; raise the model's vocab_size or pick a matching tokenizer")
    processor = _processor(cfg, tokenizer, hf_config)
    buckets = prompt_buckets(cfg)
    _check_prompt_fits(cfg, processor, buckets)
    policy = _ready_policy(cfg, mesh, rules)
    return Captioner(policy, tokenizer, processor, stop_token_ids(tokenizer),
                     int(tokenizer.pad_token_id), buckets)


def build_trainer(cfg, mesh=None, rules=None):
    from balcap_jax.train import Trainer
    return Trainer(cfg, build_parts(cfg, mesh, rules))


def export(trainer, path: str) -> str | None:
    """Writes the policy with save_pretrained (transformers-loadable) and the tokenizer; to a
    bucket URL through a local copy. A LoRA policy is written merged (adapters folded into
    dense kernels of the policy's dtype), and its adapters alone in PEFT's layout under
    `<path>/adapter` (peft.PeftModel.from_pretrained on the base checkpoint)."""
    from balcap_jax import models
    from balcap_jax.models import lora
    from balcap_jax.workdir import Mirror
    out = Mirror(path)
    model = trainer.model()
    if lora.has_lora(model):
        lora.save_peft(model, os.path.join(out.local, "adapter"),
                       base_model=trainer.cfg.model.path)
        model = lora.merged(model)
    models.save_pretrained(model, out.local)
    trainer.p.tokenizer.save_pretrained(out.local)
    out.sync()
    return path

