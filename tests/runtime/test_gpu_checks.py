"""benchmarks/gpu_checks.py's count of the weights a token multiplies through (the update's
FLOPs, the decode's weight bytes), checked against the model it builds, tied and untied."""
import jax
import pytest
from flax import nnx

from balcap_jax.models import random_init
from benchmarks import gpu_checks


@pytest.mark.parametrize("tied", [True, False])
def test_matmul_params_are_the_layers_kernels_and_the_lm_head(tied):
    cfgd = gpu_checks.hf_config(tiny=True)      # configs/tiny.py's Qwen2.5-VL shapes
    cfgd["tie_word_embeddings"] = tied
    model = random_init.from_config(cfgd)
    layers = head = embed = 0
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if "visual" in name:
            continue
        if "lm_head" in name:
            head += x.size
        elif "embedding" in name:
            embed += x.size
        elif "kernel" in name:
            layers += x.size
    assert (head == 0) == tied           # a tied model's LM head is its embedding table
    assert gpu_checks.matmul_params(cfgd) == (layers, head if not tied else embed)
