"""Entry point: ``python -m balcap_jax.main --config=configs/qwen.py [--config.a.b=v ...]``.

Order of work, so that every mistake a user can make fails before anything compiles:
validate the config -> (multi-host init) -> memory plan -> build -> restore -> loop.
Everything the run writes goes under ``config.workdir``.

Multi-host: start the same command on every host with BALCAP_COORDINATOR=host:port (process 0's
address), BALCAP_NUM_PROCESSES and BALCAP_PROCESS_ID (or BALCAP_DISTRIBUTED=1 where JAX finds
the cluster itself: TPU pods, SLURM). The mesh spans every host's devices, ``train.batch_size``
is the global batch (each host loads batch_size / processes examples), and ``workdir`` must be
one directory all hosts can write (orbax writes each host's shards of a checkpoint); metrics,
completions, the config and the export are written by process 0. CPU hosts (JAX_PLATFORMS=cpu)
use gloo collectives. See ``balcap_jax.distributed`` for how a step is split.
"""
from __future__ import annotations

import json
import logging
import os
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
flags.mark_flags_as_required(["config"])
_PLAN_ONLY = flags.DEFINE_bool(
    "plan_only", False, "Validate the config, print the per-device memory plan and exit. The "
    "mesh is taken as configured (no -1), so a pod can be planned from a laptop; set "
    "--config.mesh.device_memory_gb to check against a card.")

log = logging.getLogger("balcap_jax")


def run(cfg) -> dict:
    """Runs (or resumes) training as configured; returns the last metrics row."""
    import jax
    from tqdm.auto import tqdm

    from balcap_jax import build, checkpoint, workdir
    from balcap_jax.metrics import MetricsWriter
    from balcap_jax.run import postfix, start, train_steps
    from balcap_jax.sharding import use_sharding

    mesh, rules = start(cfg)
    with use_sharding(mesh, rules):
        trainer = build.build_trainer(cfg, mesh, rules)
        ckpt = checkpoint.Checkpointer(cfg.workdir, directory=cfg.checkpoint.directory or None,
                                       every=cfg.checkpoint.every,
                                       keep=cfg.checkpoint.keep)
        if ckpt.latest_step is not None:
            tree, meta, step = ckpt.restore(trainer.state.tree())
            trainer.load_tree(tree, meta)
            print(f"[balcap_jax] resumed from step {step} ({ckpt.directory})", flush=True)
        # rows past the restored step (logged after the last checkpoint) are dropped
        writer = MetricsWriter(cfg.workdir, resume_step=trainer.state.step) \
            if jax.process_index() == 0 else None
        judge_cache = build.judge_cache(cfg)
        remote_cache = judge_cache.is_remote and jax.process_index() == 0 and \
            os.path.exists(judge_cache.path("reference_units.sqlite"))
        sigterm = checkpoint.SigtermFlag()
        row: dict = {}
        bar = tqdm(total=cfg.train.steps, initial=trainer.state.step, desc="balcap",
                   dynamic_ncols=True, disable=jax.process_index() != 0)
        try:
            for step, metrics in train_steps(trainer, cfg.train.steps, lambda: _stop(sigterm)):
                if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                    ev, records = trainer.evaluate()
                    metrics.update(ev)
                    if writer:
                        writer.write_completions(step, records)
                if writer and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                    row = writer.write(step, metrics)
                bar.update(1)
                bar.set_postfix(postfix(metrics, cfg.rl.rewards))
                if ckpt.save(step, trainer.state.tree(), trainer.meta()) and remote_cache:
                    judge_cache.sync()   # a bucket workdir: the judges' cache goes up too
        finally:
            bar.close()
            # Always leave a restorable checkpoint: at the end, on SIGTERM, and on a crash.
            ckpt.save(trainer.state.step, trainer.state.tree(), trainer.meta(), force=True)
            ckpt.close()
            if remote_cache:
                judge_cache.sync()
            sigterm.restore()
            if writer:
                writer.close()
        if trainer.state.step >= cfg.train.steps:
            if jax.process_count() > 1:   # every process takes part in gathering the shards
                from balcap_jax.distributed import to_host
                trainer.state.params = jax.tree.map(to_host, trainer.state.params)
                trainer.rest = jax.tree.map(to_host, trainer.rest)
            if jax.process_index() == 0:
                path = build.export(trainer, workdir.join(cfg.workdir, "export"))
                if path:
                    print(f"[balcap_jax] exported the policy to {path}", flush=True)
    return row


def _stop(sigterm) -> bool:
    """SIGTERM seen by any process: hosts may get the signal between different steps, and they
    must all leave the loop after the same one (the checkpoint save is collective)."""
    import jax
    if jax.process_count() == 1:
        return sigterm.triggered
    from balcap_jax.distributed import allgather_json
    return any(allgather_json(bool(sigterm.triggered)))


def plan(cfg) -> str:
    """The memory plan of ``cfg`` on its configured mesh, without touching any device."""
    from balcap_jax import build
    from balcap_jax import config as config_lib
    sizes = {k: int(cfg.mesh[k]) for k in ("data", "fsdp", "tensor")}
    if min(sizes.values()) < 1:
        raise config_lib.ConfigError(f"--plan_only needs an explicit mesh, got {sizes}; set "
                                     "--config.mesh.data/fsdp/tensor")
    config_lib.validate(cfg, sizes["data"] * sizes["fsdp"] * sizes["tensor"]
                        + build.judge_devices(cfg))
    p = build.memory_plan(cfg, sizes, query_device=False)
    text = f"mesh {sizes}\n{p.table()}"
    try:
        p.check()
        return text + "\nfits"
    except MemoryError as e:
        return text + "\nDOES NOT FIT: " + str(e).split("\n")[0]


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if _PLAN_ONLY.value:
        print(plan(_CONFIG.value))
        return
    t = time.time()
    row = run(_CONFIG.value)
    print(json.dumps({"final": row, "seconds": round(time.time() - t, 1)}), flush=True)


if __name__ == "__main__":
    app.run(main)
