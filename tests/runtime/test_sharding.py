"""balcap_jax.sharding: mesh construction, logical -> mesh axis rules, divisibility fallback,
activation constraints (no-op without a mesh, real shardings under one)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from balcap_jax import sharding as shd


def test_make_mesh_auto_axes():
    mesh = shd.make_mesh((2, 2, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(shd.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="product"):
        shd.make_mesh((3, 1, 1))


def test_logical_to_spec_rules_and_fallback():
    mesh = shd.make_mesh((2, 2, 2))
    rules = shd.Rules()
    assert shd.logical_to_spec(("embed", "heads", "head_dim"), rules) == P("fsdp", "tensor", None)
    # 1 kv head cannot split over tensor=2 -> replicated; 2 can
    assert shd.logical_to_spec(("embed", "kv_heads", "head_dim"), rules, (64, 1, 16), mesh) == \
        P("fsdp", None, None)
    assert shd.logical_to_spec(("embed", "kv_heads", "head_dim"), rules, (64, 2, 16), mesh) == \
        P("fsdp", "tensor", None)
    # batch over (data, fsdp): 4 divides 2*2; 2 only keeps "data"; 3 keeps nothing
    assert shd.logical_to_spec(("batch", "seq"), rules, (4, 5), mesh) == P(("data", "fsdp"), None)
    assert shd.logical_to_spec(("batch", "seq"), rules, (2, 5), mesh) == P("data", None)
    assert shd.logical_to_spec(("batch", "seq"), rules, (3, 5), mesh) == P(None, None)
    # a mesh axis is used once per spec: batch takes fsdp, so "embed" stays replicated
    assert (shd.logical_to_spec(("batch", "embed"), rules, (4, 64), mesh)
            == P(("data", "fsdp"), None))
    custom = shd.Rules.create({"embed": None, "mlp": ("fsdp", "tensor")})
    assert (shd.logical_to_spec(("embed", "mlp"), custom, (64, 128), mesh)
            == P(None, ("fsdp", "tensor")))
    assert shd.logical_to_spec(("unknown_name",), rules) == P(None)
    with pytest.raises(ValueError, match="shape"):
        shd.logical_to_spec(("embed",), rules, (4, 4), mesh)


def test_constrain_is_noop_without_mesh_and_shards_with_one():
    x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    assert shd.constrain(x, ("batch", "act_mlp")) is x
    mesh = shd.make_mesh((2, 2, 2))

    @jax.jit
    def f(x):
        with shd.use_sharding(mesh):
            return shd.constrain(x * 2, ("batch", "act_mlp"))

    y = f(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")
    assert shd.active_sharding() is None


def test_param_shardings_from_logical_metadata():
    from balcap_jax.models.layers import Attention
    mesh = shd.make_mesh((2, 2, 2))
    abstract = nnx.eval_shape(lambda: Attention(64, 4, 1, 16, qkv_bias=True, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    sh = shd.param_shardings(state, mesh)
    assert sh["q_proj"]["kernel"].spec == P("fsdp", "tensor", None)
    assert sh["k_proj"]["kernel"].spec == P("fsdp", None, None)     # 1 kv head: replicated
    assert sh["o_proj"]["kernel"].spec == P("tensor", None, "fsdp")
