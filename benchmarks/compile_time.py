"""Compile time against depth: configs/tiny.py at 4 and at 32 decoder layers (and as many vision
blocks), one RL step each in a fresh process (no persistent compile cache).

    .venv/bin/python -m benchmarks.compile_time [--layers 4 32] [--steps 3]
        [--decode-layers unroll|scan]   # model.decode_layers (default: the config's, unroll)
        [--scan-unroll K]   # model.scan_unroll (default: the config's, 1 = one scanned layer)

For each depth: the first step's seconds (compiling sampler, gradient and update, then
running), the steady step's seconds (the median of the next steps) and their difference, the
compile cost; then the ratio of the compile costs of the deepest and the shallowest model.
The layers of the training forward and backward run under lax.scan, so their compiled body is
one layer whatever the depth (model.scan_unroll=0 unrolls them: compile grows with depth); the
sampler's decode step follows model.decode_layers (unroll by
default: a loop whose compile grows with depth, for per-token speed). Peak RSS of each process
is printed beside.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKER = r"""
import json, sys, time, resource
import jax
from balcap_jax import build
from balcap_jax.sharding import make_mesh
from benchmarks.compile_time import config
layers, steps, decode, unroll = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
cfg = config(layers)
if decode:
    cfg.model.decode_layers = decode
if unroll:
    cfg.model.scan_unroll = int(unroll)
trainer = build.build_trainer(cfg, make_mesh((1, 1, 1), jax.devices()[:1]))
times = []
for _ in range(steps):
    t = time.perf_counter()
    trainer.train_step(next(trainer.p.loader))
    times.append(time.perf_counter() - t)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("RESULT " + json.dumps({"layers": layers, "times": times, "peak_rss_gib": rss}))
"""


def config(layers: int):
    """configs/tiny.py with `layers` decoder layers and vision blocks (the last one full)."""
    from balcap_jax.config import load_config_file
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config_file(os.path.join(root, "configs/tiny.py"))
    c.compile_cache_dir = ""
    c.model.hf_config.num_hidden_layers = layers
    c.model.hf_config.vision_config.depth = layers
    c.model.hf_config.vision_config.fullatt_block_indexes = [layers - 1]
    return c


def run(layers: int, steps: int, decode: str = "", unroll: str = "") -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", WORKER, str(layers), str(steps), decode, unroll],
                         env=env, cwd=root, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(next(line[7:] for line in out.stdout.splitlines()
                           if line.startswith("RESULT ")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--decode-layers", choices=["unroll", "scan"], default="")
    ap.add_argument("--scan-unroll", default="", help="model.scan_unroll (0 = all layers)")
    a = ap.parse_args()
    rows = []
    for n in a.layers:
        r = run(n, a.steps, a.decode_layers, a.scan_unroll)
        steady = sorted(r["times"][1:])[len(r["times"][1:]) // 2]
        r.update(first_s=r["times"][0], steady_s=steady, compile_s=r["times"][0] - steady)
        rows.append(r)
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                          if k != "times"}), flush=True)
    lo, hi = rows[0], rows[-1]
    print(f"compile {hi['layers']} layers / {lo['layers']} layers: "
          f"{hi['compile_s'] / lo['compile_s']:.2f}x ({hi['compile_s']:.1f} s / "
          f"{lo['compile_s']:.1f} s); first step {hi['first_s'] / lo['first_s']:.2f}x")


if __name__ == "__main__":
    main()
