"""Test-wide setup: CPU only, 8 fake devices for sharding tests, offline hubs.

XLA_FLAGS must be set before JAX initialises its backend, so it is done at import time here.
Single-device tests are unaffected: jit places work on device 0 unless told otherwise.
"""
import gc
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles far more than it runs (tiny models, a few steps each): with LLVM at -O0
# XLA:CPU compiles about 40% faster, which took the suite from 19 to 12 minutes on two cores.
# XLA's own passes (fusion, layouts, the arithmetic in the HLO) are unchanged; LLVM's code
# generation is not, so float32 results may differ from an -O2 build in their last bits, and
# the long runs (ShapesWorld's 20 RL steps) run slower. Subprocesses a test starts get the same
# level: through `xla_flags` / `TEST_XLA_FLAGS` where a test sets their XLA_FLAGS, by inheriting
# this process's otherwise. Benchmarks and real runs keep XLA's default (-O2).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess of the suite with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " " + TEST_XLA_FLAGS
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Persistent XLA cache: tests that build equal models (several Trainers in one session, the
# entry point in subprocesses) compile identical HLO; the cache is keyed by the HLO itself, so it
# never returns a stale program. It lives in .pytest_cache (ignored by git). Programs over
# several (fake) CPU devices are kept out of it: XLA:CPU executables of such programs read back
# from the cache can deadlock in their collectives (seen with jax 0.10.2: 7 devices in one
# all-gather, device 0 in an all-reduce, until the 40 s rendezvous timeout aborts the process).
# Under pytest-xdist each worker has a cache of its own: one worker reading an entry another is
# still writing is not a case the cache promises to survive.
XLA_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         ".pytest_cache", "jax_cc" + os.environ.get("PYTEST_XDIST_WORKER", ""))

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402


def _cache_single_device_programs_only():
    """Route multi-device CPU programs around the persistent cache (a private JAX hook; when
    it is missing the cache stays off, which is slower but correct)."""
    try:
        from jax._src import compiler
        resolve = compiler._resolve_compilation_strategy
    except (ImportError, AttributeError):
        return False

    def resolve_single_device(computation, devices, compile_options, backend, *args, **kw):
        if backend.platform == "cpu" and devices.size > 1:
            return None, compile_options          # no key: compiled, never cached
        return resolve(computation, devices, compile_options, backend, *args, **kw)

    compiler._resolve_compilation_strategy = resolve_single_device
    return True


if _cache_single_device_programs_only():
    jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


MAX_MAPPINGS = 30_000   # half of Linux's default vm.max_map_count (65530)


def _mappings() -> int:
    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            return sum(1 for _ in f)
    except OSError:          # not Linux: nothing to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after a test module once the process holds many memory
    mappings. Every XLA:CPU executable maps its code, and jit caches keep executables for the
    whole session: over the suite the process reached vm.max_map_count (65530), where the next
    compile or cache read segfaulted inside XLA. Clearing only past MAX_MAPPINGS keeps the
    in-memory programs that later modules reuse (clearing after every module cost minutes)."""
    yield
    if _mappings() > MAX_MAPPINGS:
        jax.clear_caches()
        gc.collect()
