"""A run's start-up and step loop, shared by `main` and the ShapesWorld demo (neither
defines its command-line flags here, so both can import it)."""
from __future__ import annotations

import os

__all__ = ["start", "train_steps", "postfix"]


def start(cfg, *, memory_plan: bool = True):
    """What every run does before it builds anything (main.run and the ShapesWorld demo):
    several processes joined, the persistent compile cache, the config validated, the memory
    plan printed and checked, the resolved config saved; returns (mesh, rules)."""
    import jax

    from balcap_jax import build, checkpoint, workdir
    from balcap_jax import config as config_lib
    from balcap_jax.distributed import initialize_from_env
    initialize_from_env()
    if cfg.compile_cache_dir:  # a re-run (or a Colab restart) skips recompiling
        if jax.default_backend() == "cpu" and jax.local_device_count() > 1:
            # XLA:CPU programs over several devices read back from the cache can deadlock in
            # their collectives (jax 0.10.2); one CPU device, GPUs and TPUs are unaffected
            print("[balcap_jax] compile_cache_dir ignored: several CPU devices", flush=True)
        else:
            jax.config.update("jax_compilation_cache_dir",
                              os.path.expanduser(cfg.compile_cache_dir))
    mesh_sizes = config_lib.validate(cfg, jax.device_count())
    if memory_plan:
        plan = build.memory_plan(cfg, mesh_sizes)
        if jax.process_index() == 0:
            print(f"[balcap_jax] mesh {mesh_sizes}; memory plan per device:\n{plan.table()}",
                  flush=True)
        plan.check()
    workdir.makedirs(cfg.workdir)      # a local path or a bucket URL
    if jax.process_index() == 0:
        checkpoint.save_config(cfg.workdir, cfg)
    return build.mesh_and_rules(cfg, mesh_sizes)


def train_steps(trainer, until: int, stop=lambda: False):
    """(step, metrics) of each RL step until the trainer reaches step `until` or `stop()`."""
    while trainer.state.step < until and not stop():
        metrics = trainer.train_step(next(trainer.p.loader),
                                     more=lambda: next(trainer.p.loader))
        yield trainer.state.step, metrics


def postfix(m: dict, rewards) -> dict:
    """The progress bar's fields: each reward's mean and the caption length."""
    out = {r[:4]: f"{m.get(f'reward/{r}', float('nan')):.3f}" for r in rewards}
    out["len"] = f"{m.get('length/caption_words', float('nan')):.1f}"
    return out
