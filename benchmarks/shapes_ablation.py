"""BalCapRL's ablation in miniature on ShapesWorld: one warm start, then RL variants from it.

    python -m benchmarks.shapes_ablation [--seeds 0 1] [--steps 120] [--variants balcap grpo]

Every variant starts from the same warm start (per seed), sees the same RL data order and the
same sampling seed, and runs the same number of steps; only the named knob differs. Each is
evaluated greedily on the same held-out images (SPEC.md section 6). Variants:

  balcap          c-GDPO, length masking of the linguistic reward, pointability-aware precision,
                  three rewards, one update per rollout batch (configs/shapes.py as is)
  grpo            vanilla GRPO advantages (sum, then normalise) instead of c-GDPO
  linear_length   a linear length penalty channel r_len = -|rho - 1| (weight rl.w_len) instead
                  of masking
  no_length       no length control at all
  no_pointability precision without the pointability check: a verifier that asks only "is this
                  false of the image?" does not count commentary ("the picture feels calm.") as
                  false, so each commentary sentence counts as a true assertion; unparsable
                  sentences stay false. Evaluation still uses the full scorer.
  no_linguistic   rewards precision and recall only (no length control: the mask has nothing to
                  act on); evaluation still reports linguistic
  ppo_epochs_4    four updates per rollout batch, so the PPO clip acts (with one it never does)
  dynamic_sampling  DAPO's dynamic sampling (rl.dynamic_sampling = 2: up to two extra rounds of
                  prompts per step to fill the batch with groups whose rewards differ), for the
                  wall time balcap took (when balcap ran first), not the same number of steps

Prints one table (held-out precision, recall, linguistic, b-CapScore, words, and the change of
b-CapScore against the warm start), averaged over seeds, and writes it as JSON under --workdir.
Report whatever it shows.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import numpy as np

VARIANTS = ("balcap", "grpo", "linear_length", "no_length", "no_pointability", "no_linguistic",
            "ppo_epochs_4", "dynamic_sampling")


class NoPointabilityScorer:
    """ShapesScorer with precision = (true + commentary assertions) / assertions (module doc)."""

    names = ("precision", "recall", "linguistic")

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, images, captions, references, **context):
        from balcap_jax.rewards.types import ScoreResult
        from balcap_jax.shapes.scorer import _scene_from_id, score_caption
        from balcap_jax.shapes.world import as_scene
        result = self.inner(images, captions, references, **context)
        if context.get("scenes") is not None:
            scenes = [as_scene(s) for s in context["scenes"]]
        else:
            scenes = [_scene_from_id(str(i)) for i in context["image_ids"]]
        prec = []
        for c, r, s in zip(captions, references, scenes):
            sc = score_caption(c, r, s)
            prec.append((sc.true_assertions + sc.commentary) / sc.assertions if sc.assertions
                        else 0.0)
        rewards = dict(result.rewards)
        rewards["precision"] = np.asarray(prec, np.float32)
        return ScoreResult(rewards, result.diagnostics)


def variant_config(cfg, name: str):
    c = copy.deepcopy(cfg)
    if name == "grpo":
        c.rl.advantage = "grpo"
    elif name == "linear_length":
        c.rl.length_control = "linear"
    elif name == "no_length":
        c.rl.length_control = "none"
    elif name == "no_linguistic":
        c.rl.rewards, c.rl.weights = ["precision", "recall"], [1.0, 1.0]
        c.rl.length_control, c.rl.length_reward = "none", "precision"
    elif name == "ppo_epochs_4":
        c.rl.ppo_epochs = 4
    elif name == "dynamic_sampling":
        c.rl.dynamic_sampling = 2
    elif name not in ("balcap", "no_pointability"):
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    return c


def run_seed(cfg, variants, *, progress: bool, warm_from: str = "",
             on_result=lambda out: None) -> dict:
    """Warm start once (or load the demo's, `warm_from`), evaluate it, then each variant's RL
    from it; {name: summary}. `on_result(out)` runs after each row, so a long run that stops
    keeps what it measured."""
    import jax
    import jax.numpy as jnp

    from balcap_jax import build, shapes
    from balcap_jax import config as config_lib
    from balcap_jax import shapes_demo as demo
    from balcap_jax.sharding import use_sharding
    from balcap_jax.train import Trainer
    from balcap_jax.train.sft import SFT

    if cfg.get("compile_cache_dir"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compile_cache_dir))
    sizes = config_lib.validate(cfg, jax.device_count())
    mesh, rules = build.mesh_and_rules(cfg, sizes)
    out = {}
    with use_sharding(mesh, rules):
        parts = demo.demo_parts(cfg, mesh, rules)
        trainer = Trainer(cfg, parts)
        if warm_from:  # no supervised trainer (nor its optimiser state) is needed then
            warm_params = demo.load_params(warm_from, trainer.state.params)
        else:
            sft = SFT(cfg.sft, parts, trainer.state.params, trainer.rest, trainer.graphdef)
            demo.vision_stage(sft, cfg, parts, progress=progress)
            demo.warm_start(sft, demo._SftData(cfg, seed_offset=1), cfg.sft, progress=progress)
            warm_params = jax.tree.map(jnp.copy, sft.params)
        out["warm_start"] = demo._evaluate(trainer, warm_params, "warm start", progress)[0]
        out["warm_start"]["rl_seconds"] = 0.0
        builder = demo._builder(cfg)
        for name in variants:
            vcfg = variant_config(cfg, name)
            config_lib.validate(vcfg, jax.device_count())
            scorer = NoPointabilityScorer(parts.scorer) if name == "no_pointability" else \
                parts.scorer
            loader = shapes.make_shapes_loader(builder, batch_size=cfg.train.batch_size,
                                               seed=cfg.seed)  # the same data order
            vparts = dataclasses.replace(parts, scorer=scorer, loader=loader)
            tr = Trainer(vcfg, vparts)
            tr.reset_params(warm_params)
            same_time = out.get("balcap", {}).get("rl_seconds") \
                if name == "dynamic_sampling" else None
            rl = demo.rl_phase(tr, vcfg.train.steps, progress=progress, seconds=same_time)
            tr.p = dataclasses.replace(vparts, scorer=parts.scorer)  # evaluate with the full one
            out[name] = demo._evaluate(tr, tr.state.params, name, progress)[0]
            out[name]["rl_seconds"] = rl["seconds"]
            out[name]["rl_steps"] = rl["steps"]
            on_result(out)
    return out


def table(results: dict[int, dict]) -> str:
    keys = ("precision", "recall", "linguistic", "b_capscore", "mean_words")
    names = list(next(iter(results.values())))
    lines = [f"{'variant':16s}" + "".join(f"{k:>12s}" for k in keys) + f"{'vs warm':>10s}"
             + f"{'rl s':>8s}  b_capscore per seed"]
    for n in names:
        mean = {k: float(np.mean([r[n][k] for r in results.values()])) for k in keys}
        gain = float(np.mean([r[n]["b_capscore"] - r["warm_start"]["b_capscore"]
                              for r in results.values()]))
        secs = float(np.mean([r[n]["rl_seconds"] for r in results.values()]))
        per_seed = " / ".join(f"{r[n]['b_capscore']:.1f}" for r in results.values())
        lines.append(f"{n:16s}" + "".join(f"{mean[k]:12.3f}" for k in keys) +
                     f"{gain:10.2f}{secs:8.0f}  {per_seed}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/shapes.py")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=None, help="RL steps per variant")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--sft-steps", type=int, default=None, help="warm start step cap")
    ap.add_argument("--num-eval", type=int, default=None, help="held-out images")
    ap.add_argument("--workdir", default="workdir/shapes_ablation")
    ap.add_argument("--warm-from", default="", help="a demo's warm_start.npz to start from instead "
                    "of training one; {seed} is replaced "
                    "(e.g. workdir/demo_s{seed}/warm_start.npz)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    from ml_collections import config_flags
    cfg = config_flags.config_flags._ConfigFileParser("config").parse(args.config)
    results = {}
    t0 = time.time()
    for seed in args.seeds:
        c = copy.deepcopy(cfg)
        c.seed = seed
        c.workdir = os.path.join(args.workdir, f"seed{seed}")
        if args.steps:
            c.train.steps = args.steps
        if args.sft_steps:
            c.sft.max_steps = args.sft_steps
        if args.num_eval:
            c.data.num_eval = args.num_eval

        def save(out, seed=seed):  # after every row: a stopped run keeps its finished rows
            results[seed] = dict(out)
            os.makedirs(args.workdir, exist_ok=True)
            with open(os.path.join(args.workdir, "ablation_partial.json"), "w") as f:
                json.dump({"seeds": args.seeds, "results": {str(k): v for k, v in
                                                            results.items()}}, f, indent=1)
        results[seed] = run_seed(c, args.variants, progress=not args.quiet,
                                 warm_from=args.warm_from.format(seed=seed), on_result=save)
    text = table(results)
    print(f"\nShapesWorld ablation: seeds {args.seeds}, "
          f"{cfg.train.steps if not args.steps else args.steps}"
          f" RL steps, {len(next(iter(results.values())))} rows, {time.time() - t0:.0f} s\n"
          + text, flush=True)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "ablation.json"), "w") as f:
        json.dump({"seeds": args.seeds, "results": {str(k): v for k, v in results.items()},
                   "table": text}, f, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
