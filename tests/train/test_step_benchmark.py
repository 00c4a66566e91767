"""benchmarks/step.py's FLOP count for the update (6 x matmul parameters x tokens), checked
against the parameters of the model it benchmarks."""
import jax
from flax import nnx

from balcap_jax.models import random_init
from benchmarks import step as bench


def test_update_flops_count_each_language_kernel_per_token_it_serves():
    model = random_init.from_config(bench.hf_config())
    layers = head = 0
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        # the layers' projections and the LM head; not the embedding table (a gather), the
        # norms, the biases or the vision tower
        if "kernel" in name and "visual" not in name:
            if "lm_head" in name:
                head += x.size
            else:
                layers += x.size
    completions = bench.PROMPTS * bench.G * bench.NEW
    assert bench.update_flops(0) == 6 * (layers + head) * completions
    # a prompt token runs through the layers, not the LM head (only completions are scored)
    assert bench.update_flops(80) - bench.update_flops(0) == 6 * layers * 80
