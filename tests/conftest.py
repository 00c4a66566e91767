"""Test-wide setup: CPU only, 8 fake devices for sharding tests, offline hubs.

XLA_FLAGS must be set before JAX initialises its backend, so it is done at import time here.
Single-device tests are unaffected: jit places work on device 0 unless told otherwise.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Persistent XLA cache: tests that build equal models (e.g. several Trainers in one session)
# compile identical HLO; the cache is keyed by the HLO itself, so it can never return a stale
# program. It lives in .pytest_cache (ignored by git).
import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               ".pytest_cache", "jax_cc"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
