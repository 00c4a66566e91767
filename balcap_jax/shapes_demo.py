"""The ShapesWorld demo: BalCapRL learning on a CPU in minutes, against an honest control.

    python -m balcap_jax.shapes_demo --config=configs/shapes.py [--config.seed=1 ...]

Pipeline (one process, one model):
  0. vision pretraining (`sft.vision_pretrain_steps`): the tower learns per-cell shape, colour
     and size labels, then stays frozen (`sft.freeze_vision`, `train.freeze_vision`) as a real
     MLLM's pretrained encoder would;
  1. warm start: supervised cross-entropy (balcap_jax.train.sft) on the world's deliberately
     imperfect captions (`sft_caption_for`, a fresh draw every step) until the loss plateaus;
  2. `before`: greedy held-out evaluation of the warm start;
  3. RL: BalCapRL steps (balcap_jax.train.Trainer: c-GDPO, length masking) from the warm start;
  4. `after`: the same evaluation;
  5. `sft_control`: the warm start trained on with supervision (same optimiser state, more fresh
     captions) for the wall time the RL phase took, then evaluated: a gain that only more
     supervised steps would give shows up here too (`demo.control=False` skips it: the
     summary's sft_control is then null).
Writes workdir/summary.json, workdir/curves.png, workdir/metrics.jsonl (RL steps), the warm
start's parameters (workdir/warm_start.npz) and the exported policy under workdir/export.

`--config.demo.warm_from=PATH` (a warm_start.npz of the same config) skips step 1: RL settings
can be compared from one warm start without retraining it. The control then starts a fresh
supervised optimiser (its warm-up included), since the file holds parameters only.

The policy's chat template has no default system prompt: ShapesWorld prompts are then 32
tokens instead of 64, which halves the cost of every step on a CPU.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("balcap_jax")

__all__ = ["run_demo", "demo_parts", "vision_stage", "warm_start", "rl_phase", "sft_for_seconds",
           "summarise", "save_params", "load_params"]

_SYSTEM_BLOCK = ("{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
                 "You are a helpful assistant.<|im_end|>\n{% endif %}")


def _no_system_template() -> str:
    from balcap_jax.processing import QWEN25_VL_CHAT_TEMPLATE
    if _SYSTEM_BLOCK not in QWEN25_VL_CHAT_TEMPLATE:
        raise RuntimeError("QWEN25_VL_CHAT_TEMPLATE changed: update shapes_demo._SYSTEM_BLOCK")
    return QWEN25_VL_CHAT_TEMPLATE.replace(_SYSTEM_BLOCK, "")



def demo_parts(cfg, mesh=None, rules=None):
    """balcap_jax.build.build_parts, with the tokenizer's template lacking a system prompt."""
    from balcap_jax import build
    parts = build.build_parts(cfg, mesh, rules)
    parts.tokenizer.chat_template = _no_system_template()
    return parts


def _builder(cfg):
    from balcap_jax import shapes
    d = cfg.data
    return shapes.build_shapes_dataset(
        seed=d.world_seed, num_train=d.num_train, num_eval=d.num_eval,
        image_size=d.image_size, data_dir=d.data_dir or
        os.path.join(cfg.workdir, "tfds"))


class _SftData:
    """Training images with a fresh warm-start caption per visit (draw = 1 + step)."""

    def __init__(self, cfg, seed_offset: int):
        from balcap_jax import shapes
        self.loader = shapes.make_shapes_loader(_builder(cfg), batch_size=cfg.sft.batch_size,
                                                seed=cfg.seed + seed_offset)
        self.draw = 0

    def __next__(self):
        from balcap_jax.shapes import sft_caption_for
        self.draw += 1
        ex = next(self.loader)
        return ex, [sft_caption_for(e["image_id"], self.draw) for e in ex]


def _vision_batches(cfg, parts, batch_size: int = 64):
    """(pixel_values, image_grid_thw, per-cell labels) of training images for the vision
    pretraining stage; labels from each image's scene graph (regenerated from its id)."""
    from balcap_jax import shapes
    from balcap_jax.shapes.world import cell_labels, scene_from_id
    loader = shapes.make_shapes_loader(_builder(cfg), batch_size=batch_size, seed=cfg.seed + 2)
    for ex in loader:
        px = parts.processor.image_processor([e["image"] for e in ex])
        labels = [cell_labels(scene_from_id(e["image_id"])) for e in ex]
        yield px["pixel_values"], px["image_grid_thw"], {
            k: np.stack([lab[k] for lab in labels]) for k in labels[0]}


def vision_stage(sft, cfg, parts, *, progress=True) -> dict | None:
    """Pretrains the policy's vision tower on per-cell shape / colour / size labels for
    `cfg.sft.vision_pretrain_steps` steps (balcap_jax.shapes.vision_pretrain): the stand-in for a
    real MLLM's pretrained encoder, without which the tiny tower never learns shape. None (and
    nothing done) when that is 0."""
    from balcap_jax.shapes.vision_pretrain import pretrain_vision
    from balcap_jax.shapes.world import CELL_LABEL_CLASSES
    sc, t0 = cfg.sft, time.perf_counter()
    if int(sc.vision_pretrain_steps) <= 0:
        return None
    sft.params, losses = pretrain_vision(
        sft.model(), sft.params, _vision_batches(cfg, parts), CELL_LABEL_CLASSES,
        steps=int(sc.vision_pretrain_steps), lr=float(sc.vision_pretrain_lr),
        seed=int(cfg.seed), log=(lambda m: print(m, flush=True)) if progress else None)
    return {"steps": len(losses), "seconds": time.perf_counter() - t0, "losses": losses,
            "final_loss": float(np.mean(losses[-20:]))}


def save_params(path: str, params) -> None:
    """The warm start's parameters as one .npz (keyed by tree path), so benchmarks (the
    ablation) can start from the very policy the demo evaluated instead of retraining it."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


def load_params(path: str, like):
    """`save_params`' file as a tree shaped and placed like `like`; names the first missing or
    mis-shaped leaf (a file from another config)."""
    with np.load(path) as f:
        def read(name, shape):
            if name in f or "['stack']" not in name:
                return f[name] if name in f else None
            # a file from before the layers were stacked: one entry per layer
            layers = [name.replace("['stack']", f"[{i}]") for i in range(shape[0])]
            return np.stack([f[n] for n in layers]) if all(n in f for n in layers) else None

        def put(k, ref):
            name = jax.tree_util.keystr(k)
            value = read(name, ref.shape)
            if value is None or value.shape != ref.shape:
                raise ValueError(f"{path}: leaf {name} is missing or has shape "
                                 f"{None if value is None else value.shape}, expected "
                                 f"{ref.shape}: was it saved from another config?")
            return jax.device_put(value.astype(ref.dtype), ref.sharding)
        return jax.tree_util.tree_map_with_path(put, like)


def _bar(total, desc, enabled=True):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=not enabled)


def warm_start(sft, data, sc, *, progress=True, on_step: Callable | None = None) -> dict:
    """SFT until the mean loss of a `sc.chunk`-step chunk improves by less than
    `sc.plateau_tol` (relative) on the previous chunk, or `sc.max_steps`."""
    losses, chunks, t0 = [], [], time.perf_counter()
    bar = _bar(sc.max_steps, "warm start", progress)
    plateau = False
    try:
        for step in range(int(sc.max_steps)):
            ex, caps = next(data)
            losses.append(sft.step(ex, caps))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_step:
                on_step(step, losses[-1])
            if (step + 1) % int(sc.chunk) == 0:
                chunks.append(float(np.mean(losses[-int(sc.chunk):])))
                if len(chunks) >= 2 and chunks[-2] - chunks[-1] < sc.plateau_tol * chunks[-2]:
                    plateau = True
                    break
    finally:
        bar.close()
    return {"steps": len(losses), "losses": losses, "chunk_means": chunks, "plateau": plateau,
            "seconds": time.perf_counter() - t0}


def sft_for_seconds(sft, data, seconds: float, *, progress=True) -> dict:
    """Supervised steps until `seconds` of wall time have passed (the control)."""
    losses, t0 = [], time.perf_counter()
    bar = _bar(None, "sft control", progress)
    try:
        while time.perf_counter() - t0 < seconds:
            ex, caps = next(data)
            losses.append(sft.step(ex, caps))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
    return {"steps": len(losses), "losses": losses, "seconds": time.perf_counter() - t0}


_CURVE_KEYS = ("reward/precision", "reward/recall", "reward/linguistic", "length/caption_words",
               "entropy_est", "length/masked_fraction")


def rl_phase(trainer, steps: int, *, progress=True, writer=None,
             seconds: float | None = None) -> dict:
    """`steps` BalCapRL steps (main.train_steps), or fewer when `seconds` of wall time run out
    first; per-step rewards (precision, recall, linguistic as scored, the linguistic one after
    length masking) and caption length."""
    from balcap_jax.run import postfix, train_steps
    rows, t0 = [], time.perf_counter()
    bar = _bar(steps, "BalCapRL", progress)

    def out_of_time():
        return seconds is not None and time.perf_counter() - t0 >= seconds
    try:
        for step, m in train_steps(trainer, trainer.state.step + int(steps), out_of_time):
            rows.append({k: float(m[k]) for k in _CURVE_KEYS if k in m})
            if writer:
                writer.write(step, m)
            bar.update(1)
            bar.set_postfix(postfix(m, trainer.cfg.rl.rewards))
    finally:
        bar.close()
    return {"steps": len(rows), "rows": rows, "seconds": time.perf_counter() - t0}


def summarise(ev: dict) -> dict:
    """Trainer.evaluate's metrics -> the summary's object."""
    return {"precision": ev["eval/precision"], "recall": ev["eval/recall"],
            "linguistic": ev["eval/linguistic"], "b_capscore": ev["eval/b_capscore"],
            "mean_words": ev["eval/words"]}


def _evaluate(trainer, params, name: str, progress=True) -> tuple[dict, list, dict]:
    """(held-out summary, every caption's record, the attribute report of those captions)."""
    from balcap_jax.shapes.attributes import attribute_report
    trainer.state.params = jax.tree.map(jnp.copy, params)
    t = time.perf_counter()
    examples = trainer.p.eval_examples   # records come back in this order, each with its scene
    ev, records = trainer.evaluate(num_samples_logged=len(examples))
    out = summarise(ev)
    attrs = attribute_report([r["caption"] for r in records], [e["scene"] for e in examples])
    if progress:
        acc = attrs["accuracy"]
        print(f"[demo] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()) +
              " | accuracy " + " ".join(f"{k} {acc[k]:.2f}" for k in
                                         ("shape", "color", "size", "position") if k in acc) +
              f" ({time.perf_counter() - t:.0f} s)", flush=True)
    return out, records, attrs


def evaluate_policies(workdir: str, examples: list, captions: dict[str, list[str]], *,
                      samples: int = 1000, meteor: bool = True, progress: bool = True) -> dict:
    """The evaluation harness (balcap_jax.evaluate) on each policy's held-out captions, with
    ShapesWorld's exact judges standing in for the LLM judges: b-CapScore from the exact
    scorer, QA accuracy on the world's questions, fact P/R/F1, and the pairwise score against
    the warm start ("before"). Writes workdir/captions/<policy>.jsonl, workdir/eval/results.json
    and .md, and workdir/report.html; returns {policy: {metric: value}}."""
    from balcap_jax.data.records import Record
    from balcap_jax.evaluate import evaluate
    from balcap_jax.shapes import world
    from balcap_jax.shapes.eval_judge import ShapesEvalJudge, shapes_questions
    from balcap_jax.shapes.scorer import ShapesScorer
    ids = [str(e["image_id"]) for e in examples]
    files = {}
    os.makedirs(os.path.join(workdir, "captions"), exist_ok=True)
    for name, caps in captions.items():
        files[name] = os.path.join(workdir, "captions", f"{name}.jsonl")
        with open(files[name], "w") as f:
            for i, c in zip(ids, caps):
                f.write(json.dumps({"image": i, "caption": c, "model": name,
                                    "decoding": "greedy"}) + "\n")
    records = [Record(image=i, image_id=i, references=list(e["references"]))
               for i, e in zip(ids, examples)]
    t = time.perf_counter()
    res = evaluate(records, files, os.path.join(workdir, "eval"), scorer=ShapesScorer(),
                   load_image=lambda k: world.render(world.scene_from_id(k)),
                   scorer_context=lambda keys: {"image_ids": list(keys)},
                   eval_judge=ShapesEvalJudge(), questions=shapes_questions(ids),
                   baselines=("before",), samples=samples, meteor=meteor,
                   html_path=os.path.join(workdir, "report.html"),
                   title="ShapesWorld: warm start, RL, supervised control")
    out = {n: {m: e["value"] for m, e in p["metrics"].items()}
           for n, p in res["policies"].items()}
    if progress:
        print(f"[demo] evaluation harness ({time.perf_counter() - t:.0f} s): "
              f"{os.path.join(workdir, 'report.html')}", flush=True)
    return out


def run_demo(cfg, *, progress: bool = True) -> dict:
    """The whole pipeline (module doc); returns the summary written to workdir/summary.json."""
    from balcap_jax import build
    from balcap_jax.metrics import MetricsWriter
    from balcap_jax.run import start
    from balcap_jax.shapes.plot import plot_curves
    from balcap_jax.sharding import use_sharding
    from balcap_jax.train import Trainer
    from balcap_jax.train.sft import SFT

    t_start = time.perf_counter()
    mesh, rules = start(cfg, memory_plan=False)
    with use_sharding(mesh, rules):
        parts = demo_parts(cfg, mesh, rules)
        trainer = Trainer(cfg, parts)
        sft = SFT(cfg.sft, parts, trainer.state.params, trainer.rest, trainer.graphdef)
        data = _SftData(cfg, seed_offset=1)
        t_built = time.perf_counter()

        warm_from = cfg.demo.warm_from
        vision = None
        if warm_from:   # a saved warm start: RL, the control and the evaluations only
            sft.params = load_params(warm_from, sft.params)
            warm = {"steps": 0, "plateau": False, "seconds": 0.0, "chunk_means": [],
                    "losses": [], "loaded_from": warm_from}
            print(f"[demo] warm start: loaded {warm_from}", flush=True)
        else:
            vision = vision_stage(sft, cfg, parts, progress=progress)
            if vision is not None:
                print(f"[demo] vision pretraining: {vision['steps']} steps in "
                      f"{vision['seconds']:.0f} s, loss {vision['final_loss']:.3f}",
                      flush=True)
            warm = warm_start(sft, data, cfg.sft, progress=progress)
            print(f"[demo] warm start: {warm['steps']} steps in {warm['seconds']:.0f} s, loss "
                  f"{np.mean(warm['losses'][-20:]):.3f} "
                  f"({'plateau' if warm['plateau'] else 'max_steps'})", flush=True)
        warm_params = jax.tree.map(jnp.copy, sft.params)  # sft.params live on for the control
        save_params(os.path.join(cfg.workdir, "warm_start.npz"), warm_params)
        before, before_rec, before_attrs = _evaluate(trainer, warm_params, "before", progress)

        trainer.reset_params(warm_params)
        writer = MetricsWriter(cfg.workdir, tensorboard=False)
        try:
            rl = rl_phase(trainer, cfg.train.steps, progress=progress, writer=writer)
        finally:
            writer.close()
        rl_params = jax.tree.map(jnp.copy, trainer.state.params)
        after, after_rec, after_attrs = _evaluate(trainer, rl_params, "after", progress)
        build.export(trainer, os.path.join(cfg.workdir, "export"))

        policies = {"before": before_rec, "after": after_rec}
        control = {"steps": 0, "seconds": 0.0, "losses": []}
        sft_control = control_attrs = None
        if cfg.demo.get("control", True):
            control = sft_for_seconds(sft, data, rl["seconds"], progress=progress)
            sft_control, policies["sft_control"], control_attrs = _evaluate(
                trainer, sft.params, "sft_control", progress)

    gain = {"after_minus_before": after["b_capscore"] - before["b_capscore"]}
    if sft_control is not None:
        gain["after_minus_sft_control"] = after["b_capscore"] - sft_control["b_capscore"]
    summary = {
        "before": before, "after": after, "sft_control": sft_control, "gain": gain,
        "seed": int(cfg.seed), "held_out_images": len(parts.eval_examples),
        "warm_start": {k: warm[k] for k in ("steps", "plateau", "seconds", "chunk_means",
                                            "loaded_from") if k in warm},
        "vision_pretrain": None if vision is None else {
            k: vision[k] for k in ("steps", "seconds", "final_loss")},
        "rl": {"steps": rl["steps"], "seconds": rl["seconds"]},
        "sft_control_run": {"steps": control["steps"], "seconds": control["seconds"]},
        "seconds": {"build": t_built - t_start, "total": time.perf_counter() - t_start},
        "attributes": {k: v for k, v in (("before", before_attrs), ("after", after_attrs),
                                         ("sft_control", control_attrs)) if v is not None},
        "examples": {k: rec[:4] for k, rec in policies.items()},
        "evaluation": evaluate_policies(
            cfg.workdir, parts.eval_examples,
            {k: [r["caption"] for r in rec] for k, rec in policies.items()},
            meteor=bool(cfg.demo.get("meteor", True)), progress=progress),
    }
    with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(cfg.workdir, "curves.json"), "w") as f:
        json.dump({"warm_start_loss": warm["losses"], "control_loss": control["losses"],
                   "rl": rl["rows"]}, f)
    plot_curves(os.path.join(cfg.workdir, "curves.png"), warm["losses"], control["losses"],
                rl["rows"], summary)
    return summary


def main(argv):
    del argv
    from absl import flags  # noqa: F401
    logging.basicConfig(level=logging.WARNING)
    s = run_demo(_CONFIG.value)
    keys = ("precision", "recall", "linguistic", "b_capscore", "mean_words")
    print(f"{'':12s}" + "".join(f"{k:>12s}" for k in keys))
    for name in ("before", "after", "sft_control"):
        if s[name] is not None:
            print(f"{name:12s}" + "".join(f"{s[name][k]:12.3f}" for k in keys))
    print(f"[demo] wrote {os.path.join(_CONFIG.value.workdir, 'summary.json')} and curves.png "
          f"in {s['seconds']['total']:.0f} s", flush=True)


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes.py",
                                              "Path to a config file (configs/shapes.py).")
    app.run(main)
