"""Compile time against depth: configs/tiny.py at 4 and at 32 decoder layers (and as many vision
blocks), one RL step each in a fresh process (no persistent compile cache).

    .venv/bin/python -m benchmarks.compile_time [--layers 4 32] [--steps 3] [--rounds N]
        [--decode-layers unroll|scan]   # model.decode_layers (default: the config's, unroll)
        [--scan-unroll K]   # model.scan_unroll (default: the config's, 1 = one scanned layer)
        [--cache-windows K]   # sampling.cache_windows (default: the config's, 4)

For each depth: the first step's seconds (compiling sampler, gradient and update, then
running), the steady step's seconds (the median of the next steps) and their difference, the
compile cost, and XLA's compile seconds per jitted function (jax.monitoring); then the ratio
of the compile costs of the deepest and the shallowest model. This VM's speed drifts by tens of
percent between processes (the same program's compile took 7.7 s and 11.9 s in two runs a
minute apart, one compile each), so `--rounds N` runs the depths N times, alternating their
order, and prints each round's ratio, their median, and the ratio of each depth's fastest
compile (the least disturbed estimate of what depth costs).
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
import statistics
import subprocess
import sys

WORKER = r"""
import collections, json, sys, time, resource
import jax
compiles, counts = collections.Counter(), collections.Counter()
def on_event(event, secs, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
        compiles[kw.get("fun_name", "?")] += secs
        counts[kw.get("fun_name", "?")] += 1
jax.monitoring.register_event_duration_secs_listener(on_event)
from balcap_jax import build
from balcap_jax.sharding import make_mesh
from benchmarks.compile_time import config
layers, steps, decode, unroll, windows = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                          sys.argv[4], sys.argv[5])
cfg = config(layers)
if decode:
    cfg.model.decode_layers = decode
if unroll:
    cfg.model.scan_unroll = int(unroll)
if windows:
    cfg.sampling.cache_windows = int(windows)
trainer = build.build_trainer(cfg, make_mesh((1, 1, 1), jax.devices()[:1]))
compiles.clear(); counts.clear()    # from here: the step's functions
times, cpu = [], []
for _ in range(steps):
    t, c = time.perf_counter(), time.process_time()
    trainer.train_step(next(trainer.p.loader))
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
top = {f"{k} x{counts[k]}": round(v, 2) for k, v in compiles.most_common(4)}
print("RESULT " + json.dumps({"layers": layers, "times": times, "cpu_times": cpu,
                              "peak_rss_gib": rss, "xla_compile_s": top}))
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


def run(layers: int, steps: int, decode: str = "", unroll: str = "", windows: str = "") -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", WORKER, str(layers), str(steps), decode, unroll,
                          windows],
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
    ap.add_argument("--cache-windows", default="", help="sampling.cache_windows")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {a.rounds}")
    ratios, best = [], {}
    for i in range(a.rounds):
        rows = {}
        for n in (a.layers if i % 2 == 0 else a.layers[::-1]):
            r = run(n, a.steps, a.decode_layers, a.scan_unroll, a.cache_windows)
            # the steady step: the (upper) median of the steps after the first
            steady, steady_cpu = (statistics.median_high(r[k][1:]) for k in ("times", "cpu_times"))
            r.update(first_s=r["times"][0], steady_s=steady, compile_s=r["times"][0] - steady,
                     compile_cpu_s=r["cpu_times"][0] - steady_cpu)
            rows[n] = r
            best[n] = min(best.get(n, float("inf")), r["compile_s"])
            print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v)
                              for k, v in r.items() if k not in ("times", "cpu_times")}),
                  flush=True)
        lo, hi = rows[min(a.layers)], rows[max(a.layers)]
        ratios.append(hi["compile_s"] / lo["compile_s"])
        print(f"compile {hi['layers']} layers / {lo['layers']} layers: "
              f"{ratios[-1]:.2f}x ({hi['compile_s']:.1f} s / {lo['compile_s']:.1f} s); "
              f"first step {hi['first_s'] / lo['first_s']:.2f}x; in CPU seconds (all threads, "
              f"not counting time the VM took away) "
              f"{hi['compile_cpu_s'] / lo['compile_cpu_s']:.2f}x "
              f"({hi['compile_cpu_s']:.1f} / {lo['compile_cpu_s']:.1f})", flush=True)
    if a.rounds > 1:
        hi, lo = max(a.layers), min(a.layers)
        print(f"{a.rounds} rounds: " + ", ".join(f"{x:.2f}x" for x in ratios)
              + f"; median {statistics.median(ratios):.2f}x; each depth's fastest compile: "
              f"{best[hi]:.1f} s / {best[lo]:.1f} s = {best[hi] / best[lo]:.2f}x")


if __name__ == "__main__":
    main()
