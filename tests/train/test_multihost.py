"""Multi-host: two JAX processes on localhost (gloo collectives, 2 fake CPU devices each, one
global 4-device mesh) run one train step of configs/tiny.py, each on its own half of the batch
(a second run: the same with chunked, overlapped rollouts and dynamic sampling).
They are started by launch/local_multiprocess.sh, so this is also the real run of that script
(its environment, its exit codes, its logs).

They must agree (the same metrics and the same parameter checksums, replicated leaves
included: a host that computed different advantages would update its replicas differently)
and equal a single-process run of the same global batch on 4 devices. The workers go through
``balcap_jax.main.run`` (config checks, checkpoint, export), so this also checks what main
writes with two processes.

Time: about a minute on two shared cores, most of it the workers' one step (~35 s at load ~4.5
even with every compile served from the persistent cache: the per-parameter cross-process
collectives over gloo, not compiles).

Run as a script, this file is the worker: the launch script's interpreter (BALCAP_PYTHON) is a
shim that runs
    python tests/train/test_multihost.py OUT_DIR -m balcap_jax.main --config=... [flags]
with BALCAP_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID set by the script.
"""
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOSTS, DEVICES_PER_HOST, TIMEOUT_S = 2, 2, 240
METRICS = ("loss", "grad_norm", "reward/frequency", "reward/frequency_std", "advantage_abs",
           "length/tokens", "logp_gap_sampler_trainer", "scorer/target_token_share",
           "dynamic/rounds", "dynamic/signal_groups", "dynamic/extra_prompts")


FLAGS = ("--config.mesh.data=1", f"--config.mesh.fsdp={HOSTS * DEVICES_PER_HOST}",
         "--config.mesh.tensor=1",
         "--config.train.batch_size=4",   # global: 2 prompts per host, 16 rollouts, micro 8
         "--config.data.num_eval=3",      # held-out examples: odd, so the hosts' shares differ
         "--config.train.steps=1", "--config.compile_cache_dir=")


def tiny_config():
    from balcap_jax.config import load_config_file
    c = load_config_file(os.path.join(ROOT, "configs/tiny.py"))
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, HOSTS * DEVICES_PER_HOST, 1
    c.train.batch_size = 4          # global: 2 prompts per host, 16 rollouts, micro-batches of 8
    c.data.num_eval = 3             # held-out examples: an odd count, so the hosts' shares differ
    return c


def param_summary(values) -> list:
    """Per leaf: (sum, sum of squares) in float64 of the full value as this host sees it."""
    return [[float(v.astype(np.float64).sum()), float(np.square(v.astype(np.float64)).sum())]
            for v in values]


def worker(out_dir: str, argv: list[str]) -> None:
    """``balcap_jax.main`` with the launch script's arguments (it initialises jax.distributed
    from BALCAP_*), with the Trainer it builds recorded, then this process's view of the result
    as JSON."""
    import jax

    from balcap_jax import build, main
    seen = {}
    real_build = build.build_trainer

    def build_trainer(*args, **kwargs):
        trainer = seen["trainer"] = real_build(*args, **kwargs)
        if os.environ.get("BALCAP_TEST_SIGNAL_EVERY"):   # signal for 1 prompt in k only
            from tests.train.test_dynamic_sampling import SignalFor
            k = int(os.environ["BALCAP_TEST_SIGNAL_EVERY"])
            trainer.p.scorer = seen["scorer"] = SignalFor(lambda i: i % k == 0)
        real_step = trainer.train_step

        def train_step(examples, **kw):
            t = time.time()
            seen["metrics"], seen["examples"] = real_step(examples, **kw), examples
            print(f"step {time.time() - t:.1f} s", flush=True)
            seen["spans_hosts"] = any(
                len({d.process_index for d in x.sharding.device_set}) > 1
                and not x.sharding.is_fully_replicated
                for x in jax.tree.leaves(trainer.state.params))
            return seen["metrics"]
        trainer.train_step = train_step
        real_eval = trainer.evaluate

        def evaluate(*a, **k):      # count the examples this host's judges see
            scorer = trainer.p.scorer

            def counting(images, *args, **kw):
                seen["eval_rows"] = seen.get("eval_rows", 0) + len(images)
                return scorer(images, *args, **kw)
            trainer.p = dataclasses.replace(trainer.p, scorer=counting)
            try:
                seen["eval"] = real_eval(*a, **k)[0]
            finally:
                trainer.p = dataclasses.replace(trainer.p, scorer=scorer)
            return seen["eval"], []
        trainer.evaluate = evaluate
        return trainer
    build.build_trainer = build_trainer

    assert argv[:2] == ["-m", "balcap_jax.main"], argv
    from absl import app
    try:
        app.run(main.main, argv=["balcap_jax.main", *argv[2:]])
    except SystemExit as e:
        if e.code:
            raise
    # the run has ended: main gathered the parameters to every host for the export
    values = [np.asarray(x) for x in jax.tree.leaves(seen["trainer"].state.params)]
    result = {"process": jax.process_index(), "processes": jax.process_count(),
              "devices": jax.device_count(), "spans_hosts": seen["spans_hosts"],
              "image_ids": [e["image_id"] for e in seen["examples"]],
              "metrics": {k: seen["metrics"][k] for k in METRICS if k in seen["metrics"]},
              "scored": seen["scorer"].seen if "scorer" in seen else None,
              "eval": seen["eval"], "eval_rows": seen.get("eval_rows", 0),
              "params": param_summary(values)}
    if jax.process_index() == 0:    # the full parameters, for the single-process comparison
        np.savez(os.path.join(out_dir, "params.npz"), *values)
    with open(os.path.join(out_dir, f"result{jax.process_index()}.json"), "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


# ----------------------------------------------------------------------------------------------

def _run_workers(out_dir: str, flags: tuple = (), env_extra: dict | None = None
                 ) -> tuple[list[dict], str, list[str]]:
    """launch/local_multiprocess.sh with a shim interpreter that runs `worker` (FLAGS, then
    `flags`): the workers' results, the script's output and the processes' logs."""
    shim = os.path.join(out_dir, "python")
    with open(shim, "w") as f:
        f.write(f"#!/bin/sh\nPYTHONPATH={shlex.quote(ROOT)} exec {shlex.quote(sys.executable)} "
                f"-u {shlex.quote(os.path.abspath(__file__))} {shlex.quote(out_dir)} \"$@\"\n")
    os.chmod(shim, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # no persistent cache: several devices a process
    env["BALCAP_PYTHON"] = shim
    env.update(env_extra or {})
    logdir = os.path.join(out_dir, "logs")
    p = subprocess.Popen(
        ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "--processes",
         str(HOSTS), "--devices-per-process", str(DEVICES_PER_HOST), "--logdir", logdir,
         "--config", "configs/tiny.py", "--", *FLAGS, *flags,
         f"--config.workdir={os.path.join(out_dir, 'run')}"],   # shared: each host's shards
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        out, _ = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, _ = p.communicate()
    logs = []
    for i in range(HOSTS):
        path = os.path.join(logdir, f"proc{i}.log")
        logs.append(open(path).read() if os.path.exists(path) else "")
    assert p.returncode == 0, (out, [log[-4000:] for log in logs])
    results = [json.load(open(os.path.join(out_dir, f"result{i}.json"))) for i in range(HOSTS)]
    return results, out, logs


def _single_process_reference(cfg, image_ids):
    """One process, 4 of the 8 fake devices, the two hosts' examples as one global batch."""
    import jax

    from balcap_jax import build
    from balcap_jax.data.synthetic import synthetic_example
    from balcap_jax.sharding import make_mesh, use_sharding
    mesh = make_mesh((1, HOSTS * DEVICES_PER_HOST, 1), jax.devices()[:HOSTS * DEVICES_PER_HOST])
    with use_sharding(mesh, None):
        trainer = build.build_trainer(cfg, mesh)
        examples = [dict(synthetic_example(cfg.seed, int(i.rsplit("-", 1)[1]),
                                           cfg.data.image_size), prompt=cfg.data.prompt)
                    for i in image_ids]
        metrics = trainer.train_step(examples)
    return trainer, metrics


@pytest.mark.heavy
def test_two_processes_run_a_step_and_agree(tmp_path):
    import jax

    from balcap_jax.checkpoint import Checkpointer
    results, out, logs = _run_workers(str(tmp_path))
    a, b = results
    # the launch script's report: both processes exited 0; main logged the one 4-device mesh
    assert re.findall(r"process (\d): exit (\d+)", out) == [("0", "0"), ("1", "0")], out
    assert "'fsdp': 4" in logs[0], logs[0][-3000:]
    assert [(r["process"], r["processes"], r["devices"]) for r in results] == [
        (0, 2, 4), (1, 2, 4)]
    assert a["spans_hosts"], "no parameter was sharded across the two processes"
    assert len(a["image_ids"]) == len(b["image_ids"]) == 2
    assert not set(a["image_ids"]) & set(b["image_ids"]), "the hosts read the same examples"
    # both hosts saw the same global step: identical metrics and parameters (replicas too)
    assert a["metrics"] == b["metrics"]
    assert a["params"] == b["params"]
    assert np.isfinite(a["metrics"]["loss"]) and a["metrics"]["grad_norm"] > 0
    # the held-out set is scored once overall: each host judges its own share, all agree
    assert (a["eval_rows"], b["eval_rows"]) == (2, 1)
    assert a["eval"] == b["eval"] and np.isfinite(a["eval"]["eval/frequency"])

    # ... and it is the step one process takes on the same global batch and mesh size
    trainer, metrics = _single_process_reference(tiny_config(), a["image_ids"] + b["image_ids"])
    ref = [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]
    for k in ("reward/frequency", "reward/frequency_std", "length/tokens", "advantage_abs"):
        assert metrics[k] == pytest.approx(a["metrics"][k], rel=1e-6, abs=1e-7), k
    for k in ("loss", "grad_norm", "logp_gap_sampler_trainer"):
        assert metrics[k] == pytest.approx(a["metrics"][k], rel=1e-4, abs=1e-6), k
    ev, _ = trainer.evaluate()      # one process judges all three
    assert ev == pytest.approx(a["eval"], rel=1e-5), (ev, a["eval"])
    # what main wrote: process 0's metrics row, one checkpoint of both hosts' shards, the export
    run = os.path.join(tmp_path, "run")
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1] and rows[0]["loss"] == a["metrics"]["loss"]
    assert os.path.exists(os.path.join(run, "export", "model.safetensors"))
    ck = Checkpointer(run)       # read onto this process's 4 devices
    state, meta, _ = ck.restore(trainer.state.tree())
    ck.close()
    assert int(state["step"]) == 1
    assert [d["pos"] for d in meta["data_by_process"]] == [2, 2]   # each host's own stream
    got = np.load(os.path.join(tmp_path, "params.npz"))
    saved = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
    assert len(saved) == len(got.files)
    for i, x in enumerate(saved):
        np.testing.assert_array_equal(x, got[f"arr_{i}"], err_msg=f"checkpoint leaf {i}")
    assert len(got.files) == len(ref) > 0
    for i, y in enumerate(ref):
        # the update is lr * Adam's sign-like step (lr 3e-3): float noise in a near-zero
        # gradient moves a weight by up to ~lr * 1e-2, as in the one-process sharding test
        np.testing.assert_allclose(got[f"arr_{i}"], y, atol=1e-4, rtol=0, err_msg=f"leaf {i}")


@pytest.mark.heavy
def test_two_processes_agree_with_chunked_overlapped_rollouts_and_dynamic_sampling(tmp_path):
    """The multi-host paths of train.rollout_chunks (each host's prompts in two generate
    calls, gathered across hosts per chunk), train.overlap_scoring (a chunk scored in a thread
    while the next decodes) and rl.dynamic_sampling (extra rounds until EVERY host has its
    groups with signal): a scripted scorer gives signal to 1 prompt in 3, so the rounds are
    known by hand from what each host scored, and the hosts must still take the same step."""
    results, out, _ = _run_workers(
        str(tmp_path), ("--config.train.rollout_chunks=2", "--config.train.overlap_scoring=True",
                        "--config.rl.dynamic_sampling=2"), {"BALCAP_TEST_SIGNAL_EVERY": "3"})
    a, b = results
    assert re.findall(r"process (\d): exit (\d+)", out) == [("0", "0"), ("1", "0")], out
    assert a["metrics"] == b["metrics"] and a["params"] == b["params"]
    assert np.isfinite(a["metrics"]["loss"])
    # each host scored its own prompts: one prompt's G = 4 rollouts per chunk call
    calls = [r["scored"][:2 * int(a["metrics"]["dynamic/rounds"])] for r in results]
    assert all(len(call) == 4 and len(set(call)) == 1 for c in calls for call in c)  # 1 x G
    train = [[i for call in c for i in call] for c in calls]
    assert not set(train[0]) & set(train[1])
    prompts = [sorted(set(t), key=t.index) for t in train]      # each host's, in order
    # by hand: the rounds stop when both hosts have 2 prompts with signal, or after 1 + 2
    rounds = next((r for r in (1, 2, 3)
                   if all(sum(i % 3 == 0 for i in p[:2 * r]) >= 2 for p in prompts)), 3)
    assert int(a["metrics"]["dynamic/rounds"]) == rounds and rounds > 1, (prompts, a["metrics"])
    kept = sum(min(sum(i % 3 == 0 for i in p[:2 * rounds]), 2) for p in prompts)
    assert a["metrics"]["dynamic/signal_groups"] == pytest.approx(kept / 4)
    assert a["metrics"]["dynamic/extra_prompts"] == 4 * (rounds - 1)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
