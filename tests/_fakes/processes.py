"""Several JAX processes on localhost (gloo collectives, fake CPU devices each), for the
multi-host tests: each runs `script out_dir` with BALCAP_COORDINATOR / _NUM_PROCESSES /
_PROCESS_ID set, so balcap_jax.distributed.initialize_from_env joins them."""
import os
import socket
import subprocess
import sys

from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(script: str, out_dir: str, *, processes: int, devices_per_process: int,
                  timeout_s: float) -> list[str]:
    """Run `processes` copies of `script` and wait; their logs (out_dir/log{i}.txt). Fails,
    with the log's tail, when one exits non-zero or outlives timeout_s (then it is killed).
    No persistent XLA cache: several devices per process (see tests/conftest.py)."""
    base = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": xla_flags(devices_per_process),
            "BALCAP_COORDINATOR": f"127.0.0.1:{free_port()}",
            "BALCAP_NUM_PROCESSES": str(processes)}
    base.pop("JAX_COMPILATION_CACHE_DIR", None)
    procs = []
    for i in range(processes):
        log = open(os.path.join(out_dir, f"log{i}.txt"), "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(script), out_dir], cwd=ROOT,
            env={**base, "BALCAP_PROCESS_ID": str(i)}, stdout=log, stderr=subprocess.STDOUT),
            log))
    try:
        for p, _ in procs:
            p.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
            log.close()
    logs = [open(os.path.join(out_dir, f"log{i}.txt")).read() for i in range(processes)]
    for i, (p, _) in enumerate(procs):
        assert p.returncode == 0, (f"process {i} exited with {p.returncode} (killed after "
                                   f"{timeout_s} s if negative):\n" + logs[i][-4000:])
    return logs
