"""The run configuration: every field with its default, and the up-front validation.

Config files under configs/ start from ``base_config()`` and change what they need; any field
can be overridden on the command line (``--config.train.steps=10``). ``validate`` runs before
any model is built or compiled and names the field and the fix for every problem it finds.
"""
from __future__ import annotations

import ml_collections

__all__ = ["base_config", "checkpoint_run_config", "validate", "ConfigError"]

PAPER_PROMPT = "Describe this image in detail."


class ConfigError(ValueError):
    pass


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "workdir/run"
    c.seed = 0
    c.compile_cache_dir = "~/.cache/balcap_jax/xla"  # persistent XLA cache; "" = off

    c.model = ml_collections.ConfigDict()
    c.model.path = ""            # a local HF checkpoint directory; "" = random init from below
    c.model.preset = ""          # random init of a hub shape (balcap_jax.models.presets)
    c.model.hf_config = ml_collections.ConfigDict()  # random init from an explicit config dict
    c.model.dtype = "float32"    # parameter dtype: float32 or bfloat16
    c.model.attention = "auto"   # attention kernel of the calls that see all their keys
                                 # (training, prefill, vision): xla | cudnn (GPU) | splash
                                 # (TPU) | auto (the platform's, checked once, else xla)
    c.model.decode_layers = "unroll"  # the sampler's decode step: unroll (a loop over per-layer
                                 # caches: no per-token copies of weights or cache; compile
                                 # time grows with depth) | scan (compile time flat in depth)
    c.model.scan_unroll = 1      # layers per iteration of the scanned layer stacks (training
                                 # forward, prefill, vision): 1 compiles one layer body; 0 =
                                 # all, straight-line (no per-layer residual stacking; faster
                                 # on shallow models, compile time grows with depth)
    # LoRA (balcap_jax.models.lora): rank > 0 trains adapters only; the base stays frozen
    # (no gradient, no optimiser state) and is re-read from model.path on resume
    c.model.lora = lc = ml_collections.ConfigDict()
    lc.rank = 0                  # 0: full fine-tuning
    lc.alpha = 16.0              # the adapters' scale is alpha / rank
    lc.dropout = 0.0             # dropout of the adapters' inputs in the update's forward
                                 # (rollouts and evaluation sample without it)
    lc.modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lc.parts = ("language",)     # language | projector | vision (qkv names a Qwen vision qkv)
    lc.quantize = ""             # QLoRA: "int8" or "nf4" stores the adapted kernels quantised
    c.model.adapter = ""         # a PEFT LoRA adapter directory (a run's export/adapter) put
                                 # onto model.path's weights, with its own rank, alpha and
                                 # targets (adapter_config.json): captioning a LoRA run
    c.model.tokenizer = ""       # "qwen2.5" (offline vocabulary), "tiny" (a BPE trained on
                                 # the data's references), a path, or "" = model.path
    c.model.tiny_vocab = 400     # vocabulary size of the "tiny" tokenizer

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1             # -1: all remaining devices
    c.mesh.tensor = 1
    c.mesh.device_memory_gb = 0.0  # 0: ask the backend (CPU reports none: no check)
    # logical axis -> mesh axes overrides (balcap_jax.sharding.Rules), e.g. {"mlp": "tensor"}
    c.mesh.rules = ml_collections.ConfigDict()

    c.data = d = ml_collections.ConfigDict()
    d.source = "synthetic"       # synthetic (generated images) | shapes (ShapesWorld) | tfds
    d.prompt = PAPER_PROMPT      # the caption instruction
    d.prompts = ()               # several instructions: one chosen per example (seed, epoch, id)
    d.use_data_prompt = False    # use a record's own instruction (ShareGPT4V human turn) if any
    d.num_eval = 16              # held-out examples evaluated every train.eval_every steps
    # synthetic / shapes: generated on the spot
    d.image_size = 56            # pixels per side
    d.num_train = 256            # training images
    d.world_seed = 0             # ShapesWorld: the world (scenes, splits) is fixed by this seed
    # tfds: annotation files + an image folder become a TFDS dataset (balcap_jax.data)
    d.builder = "sharegpt4v"     # sharegpt4v | coco | captions (CSV/JSONL image,caption)
    d.files = ""                 # annotation file(s), comma-separated
    d.eval_files = ""            # a held-out file in the same format; "" = no eval set
    d.image_root = ""            # relative image paths are joined to it ("" = the file's dir)
    d.allow_outside_root = False  # read images named by absolute or ../ paths outside the root
    d.split = "train"
    d.data_dir = ""              # prepared datasets; "" = <workdir>/tfds
    d.name = ""                  # dataset config name; "" = a hash of every input (files,
                                 # settings, and the named images' sizes and mtimes)
    d.max_side = 2048            # longer image side kept in the dataset (larger are resized)
    d.max_pixels = 1 << 28       # images whose header claims more pixels are skipped
    d.max_image_bytes = 1 << 28  # image files larger than this are skipped (256 MiB)
    d.max_caption_chars = 20000  # longer references are cut at a sentence end (counted)
    d.build_workers = 4          # threads decoding images while the dataset is prepared
    d.read_threads = 4           # grain read threads while training
    # Fixed shapes (each new shape is a compile of the whole model): every prompt is padded to
    # a bucket and every image to a slot of max_image_tokens, so real images of any size reuse
    # the first step's programs.
    c.data.max_prompt_tokens = 0   # the prompt bucket (text + image tokens); 0 = the power of
                                   # two above each batch's longest (inputs of one size only)
    c.data.prompt_buckets = ()     # ascending prompt lengths instead of one bucket (less
                                   # padding, one compile per bucket); () = (max_prompt_tokens,)
    c.data.max_image_tokens = 0    # tokens per image: bounds the processor's max_pixels and
                                   # sizes each image's vision slot; 0 = unbounded (one size only)
    # image processor fields (Qwen: min_pixels, max_pixels; LLaVA: size, crop_size) over the
    # checkpoint's preprocessor_config.json; max_pixels may not exceed max_image_tokens' bound
    c.data.image_processor = ml_collections.ConfigDict()

    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_samples = 8   # G rollouts per prompt
    c.sampling.max_new_tokens = 512
    c.sampling.temperature = 1.0
    c.sampling.top_p = 1.0
    c.sampling.top_k = 0
    # each sample's generation cache (any G; the prompt's is kept once) is decoded in this many
    # windows of steps, each on a cache grown to the slots it can reach (early steps read a
    # fraction of it); each window compiles its own loop. 1 = one loop over the whole cache
    c.sampling.cache_windows = 4

    c.rl = ml_collections.ConfigDict()
    c.rl.advantage = "cgdpo"     # cgdpo | grpo
    c.rl.rewards = ["precision", "recall", "linguistic"]
    c.rl.weights = [1.0, 1.0, 1.0]
    c.rl.adv_eps = 1e-4
    c.rl.batch_norm = True
    c.rl.length_control = "mask"  # mask | linear | none
    c.rl.length_reward = "linguistic"  # the channel the mask zeroes
    c.rl.tau_low = 0.5
    c.rl.tau_high = 2.0
    c.rl.w_len = 1.0             # weight of the r_len channel when length_control = linear
    c.rl.mask_truncated = False
    c.rl.beta = 0.0              # KL weight; 0 = no reference model loaded
    c.rl.eps_low = 0.2
    c.rl.eps_high = 0.2
    c.rl.aggregation = "dapo"
    c.rl.ppo_epochs = 1
    c.rl.dynamic_sampling = 0    # DAPO: up to this many extra rounds of prompts per step, to
                                 # fill the batch with groups whose rewards differ (0 = off)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.batch_size = 8       # prompts per step (rollouts = batch_size * num_samples)
    c.train.micro_batch_size = 16  # rollouts per gradient micro-batch
    c.train.lr = 1e-6
    c.train.warmup_steps = 0
    c.train.schedule = "constant"  # constant | cosine
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.optimizer = "adamw"  # adamw | adafactor (factored second moments, no first)
    c.train.moment_dtype = "float32"  # adamw moments stored in float32 | bfloat16 (half the
                                      # state; the update is computed in float32)
    c.train.freeze_vision = False
    c.train.remat = False
    c.train.rollout_layout = "auto"  # fsdp: decode on the training layout (weights gathered at
                                     # every token); replicated: gathered once per step; auto:
                                     # replicated when the memory plan fits the copy
    c.train.rollout_chunks = 1   # each host's prompts sampled in this many generate calls
    c.train.overlap_scoring = False  # score a finished chunk while the next decodes (remote
                                 # judges or judges.devices: scoring off the policy's devices)
    c.train.share_prompts = True  # the update forwards each prompt (and image) once for its G
                                  # rollouts, which read it as a shared prefix
    c.train.trim_completions = True  # update on completions cut to the batch's longest, rounded
                                     # up to a power of two (>= 16), not to max_new_tokens
    c.train.eval_every = 50
    c.train.log_every = 1

    # The supervised warm start and the vision stage of the ShapesWorld demo
    # (balcap_jax.shapes_demo, configs/shapes.py); a plain RL run does not read them.
    c.sft = sc = ml_collections.ConfigDict()
    sc.batch_size = 32           # captions per supervised step
    sc.lr = 5e-4                 # AdamW peak after a linear warm-up, then constant
    sc.warmup_steps = 50
    sc.weight_decay = 0.0
    sc.max_steps = 2500          # the warm start stops earlier when the loss plateaus
    sc.chunk = 100               # steps per plateau check
    sc.plateau_tol = 0.01        # stop when a chunk's mean loss improves by less (relative)
    sc.max_len = 80              # caption tokens incl. the stop; longer ones cut at a sentence
    sc.vision_pretrain_steps = 0  # stage 0: the tower learns per-cell labels first (0 = off)
    sc.vision_pretrain_lr = 1e-3
    sc.freeze_vision = False     # keep the vision tower fixed during the warm start
    c.demo = ml_collections.ConfigDict()
    c.demo.curve_every = 10      # RL steps between the points of the plotted curves
    c.demo.warm_from = ""        # a saved warm_start.npz: skip stages 0-1
    c.demo.meteor = True         # METEOR in the demo's evaluation (its Java process: ~5 s/policy)
    c.demo.control = True        # the supervised control (as long as RL ran, then evaluated)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50
    c.checkpoint.keep = 3
    c.checkpoint.directory = ""  # "" = <workdir>/checkpoints; else a path or bucket URL of its own

    c.scorer = ml_collections.ConfigDict()
    c.scorer.name = "token_frequency"
    c.scorer.tokens = [" a"]    # token_frequency: the target tokens (one token each)

    # BalCapRL's judges (scorer.name = "judges"; built by balcap_jax.build.build_scorer)
    c.judges = j = ml_collections.ConfigDict()
    j.backend = "in_process"     # in_process (our jitted models) | remote (OpenAI-compatible)
    j.threshold = False          # read each yes/no as 0/1 at p = 0.5 instead of p itself
    j.pointability = True        # False: precision without the pointability question (ablation)
    j.cache_dir = ""             # reference-unit cache; "" = <workdir>/judge_cache
    # in_process: local HF checkpoint directories ("" text_path: the multimodal judge does all)
    j.multimodal_path = ""       # verification and pointability (Qwen2.5-VL)
    j.text_path = ""             # decomposition, coverage, linguistic ratings
    j.multimodal_preset = ""     # shapes the memory plan uses while multimodal_path has no
    j.text_preset = ""           #   config.json yet (balcap_jax.models.presets)
    j.dtype = "bfloat16"         # judge parameter dtype
    j.devices = 0                # devices of their own (the last N; single host); 0 = share
                                 # the policy's devices
    j.max_image_tokens = 0       # tokens per image the judge sees; 0 = data.max_image_tokens
    j.list_max_tokens = 512      # longest decomposition (a longer list is a judge failure)
    j.decode_batch = 64          # rows of the one decomposition decode a step makes (its
                                 # captions and uncached references; more become more calls)
    j.prefix_batch = 16          # heads (images) / shared prefixes per prefix-tree pass
    j.item_tokens = 256          # tokens of items (assertions, units, criteria) packed into
                                 # the row beside each prefix-tree row per pass
    # remote: an OpenAI-compatible endpoint (vLLM, SGLang, a hosted API)
    j.base_url = ""              # e.g. http://localhost:8000/v1
    j.model = ""                 # the served model name (multimodal roles)
    j.text_base_url = ""         # text roles elsewhere; "" = base_url
    j.text_model = ""            # "" = model
    j.api_key_env = "OPENAI_API_KEY"   # environment variable holding the key ("" = none)
    j.timeout = 60.0             # seconds per request attempt
    j.max_retries = 2            # retries after the first attempt
    j.concurrency = 16           # requests in flight
    j.top_logprobs = 10          # logprobs asked per answer token (yes/no and digit reading)
    return c



def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config a configs/*.py file gives, as `--config=path:arg` loads it: its
    get_config(arg), or get_config() without arg (tests, notebooks)."""
    import importlib.util
    import os
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"balcap_config_{name}", path)
    if spec is None:
        raise FileNotFoundError(f"no config file at {path!r}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def checkpoint_run_config(*, workdir: str, path: str, preset: str) -> ml_collections.ConfigDict:
    """``base_config`` for BalCapRL on a local HF checkpoint directory (configs/qwen.py and
    configs/llava.py): bfloat16 policy sharded over fsdp, ShareGPT4V-style data through TFDS,
    the paper's judges, SPEC.md's optimiser settings. `preset` names the architecture shapes
    the memory plan uses before loading (balcap_jax.models.presets)."""
    c = base_config()
    c.workdir = workdir
    c.model.path = path
    c.model.preset = preset
    c.model.dtype = "bfloat16"
    c.model.tokenizer = ""                  # the checkpoint's own tokenizer files
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.data.source = "tfds"
    # ShareGPT4V-style JSON/JSONL + image folder (the data block of base_config)
    c.data.builder = "sharegpt4v"
    c.data.files = "data/sharegpt4v_recaptioned.jsonl"
    c.data.image_root = "data/images"
    c.data.num_eval = 256
    c.data.max_image_tokens = 1024   # up to 1024 tokens (~0.8 MP) per image, each in its own slot
    c.data.max_prompt_tokens = 1152  # 1024 image tokens + the chat template and instruction
    # sampling (G = 8, 512 new tokens) and rl: SPEC.md's defaults, from base_config
    c.train.steps = 1000
    c.train.batch_size = 64
    c.train.lr = 1e-6
    c.train.warmup_steps = 10
    c.train.remat = True
    c.train.eval_every = 50
    c.checkpoint.every = 50
    c.scorer.name = "judges"
    c.judges.multimodal_path = "checkpoints/Qwen2.5-VL-7B-Instruct"   # verification, pointability
    c.judges.text_path = "checkpoints/Qwen2.5-7B-Instruct"          # decomposition, recall, style
    c.judges.multimodal_preset = "qwen2_5_vl_7b"
    c.judges.text_preset = "qwen2_5_7b"
    return c

_CHOICES = {
    "rl.advantage": ("cgdpo", "grpo"),
    "rl.length_control": ("mask", "linear", "none"),
    "rl.aggregation": ("dapo", "grpo", "dr_grpo", "bnpo"),
    "train.schedule": ("constant", "cosine"),
    "train.rollout_layout": ("auto", "fsdp", "replicated"),
    "model.dtype": ("float32", "bfloat16"),
    "model.lora.quantize": ("", "int8", "nf4"),
    "train.optimizer": ("adamw", "adafactor"),
    "train.moment_dtype": ("float32", "bfloat16"),
    "model.attention": ("auto", "xla", "cudnn", "splash"),
    "model.decode_layers": ("unroll", "scan"),
    "data.source": ("synthetic", "shapes", "tfds"),
    "data.builder": ("sharegpt4v", "coco", "captions"),
    "judges.backend": ("in_process", "remote"),
    "judges.dtype": ("float32", "bfloat16"),
    "scorer.name": ("token_frequency", "shapes", "judges"),   # built by build.build_scorer
}


def _get(c, dotted):
    for k in dotted.split("."):
        c = c[k]
    return c


def resolve_mesh(c, n_devices: int) -> dict:
    """Mesh sizes with -1 filled in; raises ConfigError when they do not multiply out."""
    sizes = {k: int(c.mesh[k]) for k in ("data", "fsdp", "tensor")}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    known = 1
    for k, v in sizes.items():
        if v != -1:
            if v < 1:
                raise ConfigError(f"mesh.{k} must be >= 1 or -1, got {v}")
            known *= v
    if free:
        if n_devices % known:
            raise ConfigError(f"mesh: {n_devices} devices do not divide by the fixed axes "
                              f"{sizes}; change mesh.* so their product divides {n_devices}")
        sizes[free[0]] = n_devices // known
    if sizes["data"] * sizes["fsdp"] * sizes["tensor"] != n_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {sizes} must equal the {n_devices} "
                          f"devices; set one axis to -1 to fill the rest")
    return sizes


def validate(c, n_devices: int) -> dict:
    """Checks the config against itself and the device count; returns the resolved mesh (of
    the policy: the devices left after `judges.devices`)."""
    errors = []
    own = int(c.judges.devices) if (c.scorer.name == "judges" and
                                    c.judges.backend == "in_process") else 0
    if own < 0 or own >= n_devices and own:
        errors.append(f"judges.devices={own} must leave the policy at least one of the "
                      f"{n_devices} devices")
        own = 0
    n_devices -= own
    for field, options in _CHOICES.items():
        if _get(c, field) not in options:
            errors.append(f"{field}={_get(c, field)!r} is not one of {options}")
    if len(c.rl.weights) != len(c.rl.rewards):
        errors.append(f"rl.weights has {len(c.rl.weights)} entries but rl.rewards has "
                      f"{len(c.rl.rewards)}: give one weight per reward")
    if c.rl.length_control == "mask" and c.rl.length_reward not in c.rl.rewards:
        errors.append(f"rl.length_reward={c.rl.length_reward!r} is not in rl.rewards "
                      f"{list(c.rl.rewards)}")
    if not 0 < c.rl.tau_low <= c.rl.tau_high:
        errors.append(f"need 0 < rl.tau_low <= rl.tau_high, got {c.rl.tau_low}, {c.rl.tau_high}")
    for f in ("train.steps", "train.batch_size", "train.micro_batch_size",
              "sampling.num_samples", "sampling.max_new_tokens", "rl.ppo_epochs",
              "checkpoint.every", "checkpoint.keep"):
        if int(_get(c, f)) < 1:
            errors.append(f"{f} must be >= 1, got {_get(c, f)}")
    if int(c.sampling.get("cache_windows", 4)) < 1:
        errors.append(f"sampling.cache_windows must be >= 1 (1 = one decode loop over the "
                      f"whole cache), got {c.sampling.cache_windows}")
    if int(c.model.get("scan_unroll", 1)) < 0:
        errors.append(f"model.scan_unroll must be >= 0 (0 = all layers), got "
                      f"{c.model.scan_unroll}")
    chunks = int(c.train.get("rollout_chunks", 1))
    if chunks < 1 or c.train.batch_size % chunks:
        errors.append(f"train.rollout_chunks={chunks} must be >= 1 and divide "
                      f"train.batch_size={c.train.batch_size}")
    if c.train.get("overlap_scoring", False) and c.scorer.name == "judges" and \
            c.judges.backend == "in_process" and int(c.judges.devices) == 0:
        errors.append("train.overlap_scoring with in-process judges on the policy's devices "
                      "would only queue the judges behind the decode (and, on several hosts, "
                      "interleave their collectives); give them judges.devices=N or "
                      "judges.backend=remote, or turn it off")
    if int(c.rl.get("dynamic_sampling", 0)) < 0:
        errors.append(f"rl.dynamic_sampling={c.rl.dynamic_sampling} must be >= 0 (extra "
                      "sampling rounds per step; 0 = off)")
    if c.sampling.num_samples < 2 and c.rl.advantage in ("cgdpo", "grpo"):
        errors.append("sampling.num_samples must be >= 2: group-relative advantages of a "
                      "single sample are always 0")
    d = c.data
    buckets = list(d.prompt_buckets or ())
    if min(int(d.max_prompt_tokens), int(d.max_image_tokens)) < 0 or \
            any(int(b) < 1 for b in buckets):
        errors.append("data.max_prompt_tokens, data.max_image_tokens and data.prompt_buckets "
                      "must be positive (0 for the first two: not fixed)")
    if d.source == "tfds" and (d.max_prompt_tokens <= 0 and not buckets or
                               d.max_image_tokens <= 0):
        errors.append("data.source='tfds' holds images of many sizes: set data.max_image_tokens "
                      "(tokens per image, e.g. 1024) and data.max_prompt_tokens (e.g. 1152) so "
                      "every batch has the same shapes; otherwise new image sizes recompile")
    if 0 < d.max_prompt_tokens < d.max_image_tokens:
        errors.append(f"data.max_prompt_tokens={d.max_prompt_tokens} is smaller than "
                      f"data.max_image_tokens={d.max_image_tokens}: an image's tokens are part "
                      "of its prompt")
    j = c.judges
    for f, low in (("judges.timeout", 1e-9), ("judges.max_retries", 0),
                   ("judges.concurrency", 1), ("judges.top_logprobs", 1),
                   ("judges.list_max_tokens", 1), ("judges.decode_batch", 1),
                   ("judges.prefix_batch", 1), ("judges.item_tokens", 1),
                   ("judges.max_image_tokens", 0), ("judges.devices", 0)):
        if _get(c, f) < low:
            errors.append(f"{f}={_get(c, f)} must be >= {low:g}")
    if not 1 <= j.top_logprobs <= 20:
        errors.append(f"judges.top_logprobs={j.top_logprobs} must be in 1..20 (the OpenAI "
                      "API's range)")
    if c.scorer.name == "judges":
        if j.backend == "remote" and not (j.base_url and j.model):
            errors.append("judges.backend='remote' needs judges.base_url (e.g. "
                          "http://localhost:8000/v1) and judges.model (the served name)")
        if j.backend == "remote" and j.base_url and \
                not j.base_url.startswith(("http://", "https://")):
            errors.append(f"judges.base_url={j.base_url!r} must start with http:// or https://")
        if j.backend == "in_process" and not j.multimodal_path:
            errors.append("judges.backend='in_process' needs judges.multimodal_path (a local "
                          "checkpoint directory); or judges.backend='remote'")
    lc = c.model.lora
    if lc.rank < 0:
        errors.append(f"model.lora.rank={lc.rank} must be >= 0 (0: full fine-tuning)")
    if not 0 <= lc.dropout < 1:
        errors.append(f"model.lora.dropout={lc.dropout} must be in [0, 1)")
    if lc.quantize and lc.rank < 1:
        errors.append(f"model.lora.quantize={lc.quantize!r} needs model.lora.rank >= 1: a "
                      "quantised base is frozen, only adapters can train")
    if c.sampling.temperature < 0:
        errors.append(f"sampling.temperature must be >= 0, got {c.sampling.temperature}")
    if not c.model.path and not c.model.preset and not c.model.hf_config:
        errors.append("model: set model.path (a local HF checkpoint directory), or "
                      "model.preset / model.hf_config for a random init")
    try:
        mesh = resolve_mesh(c, n_devices)
    except ConfigError as e:
        errors.append(str(e))
        mesh = None
    if mesh is not None and not errors:
        shards = mesh["data"] * mesh["fsdp"]
        rollouts = c.train.batch_size * c.sampling.num_samples
        if c.train.batch_size % shards:
            errors.append(f"train.batch_size={c.train.batch_size} does not divide across the "
                          f"{shards} batch shards (mesh.data*mesh.fsdp); use a multiple of "
                          f"{shards}")
        if rollouts % c.train.micro_batch_size:
            errors.append(f"train.micro_batch_size={c.train.micro_batch_size} must divide the "
                          f"{rollouts} rollouts per step (train.batch_size*sampling.num_samples)")
        elif c.train.micro_batch_size % shards:
            errors.append(f"train.micro_batch_size={c.train.micro_batch_size} does not divide "
                          f"across the {shards} batch shards; use a multiple of {shards}")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return mesh
