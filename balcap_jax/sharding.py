"""Meshes and logical axis names.

Modules name the axes of every parameter and activation with *logical* names ("embed", "heads",
"batch", ...). One `Rules` object maps those names to the physical mesh axes ``data``, ``fsdp``,
``tensor``; a single GPU, a CPU and a TPU pod differ only in the rules and the mesh shape.

- `make_mesh(shape=(data, fsdp, tensor), devices=None)`: a mesh with Auto axis types (jax 0.10
  defaults to Explicit axes, with which `with_sharding_constraint` fails).
- `Rules`: logical name -> mesh axis (str), tuple of axes, or None (replicated).
- `logical_to_spec(names, rules, shape=None, mesh=None)`: a PartitionSpec. With `shape` and `mesh`
  a dim that does not divide by its mesh axes' size is replicated instead (tiny test models), and
  a mesh axis is used at most once per spec.
- `named_sharding(names, shape, mesh, rules)`: NamedSharding from logical names.
- `use_sharding(mesh, rules)`: context manager that activates `constrain` (below); everything
  traced inside it gets the activation constraints.
- `constrain(x, names)`: `with_sharding_constraint` through the active rules; a no-op when no
  mesh is active, so models run unchanged on one device.
- `param_shardings(state, mesh, rules)`: NamedShardings for an nnx State whose Params carry
  logical names in their ``out_sharding`` metadata (layers.py creates them that way).

Parameters keep their logical names in the standard NNX ``out_sharding`` metadata with
``eager_sharding=False``, so creating a model never needs a mesh; `param_shardings` maps them.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "cache_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "qkv": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
}


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis name -> mesh axes. Unknown names are replicated."""

    mapping: tuple[tuple[str, MeshAxes], ...] = tuple(DEFAULT_RULES.items())

    @classmethod
    def create(cls, overrides: Mapping[str, MeshAxes] | None = None) -> "Rules":
        m = dict(DEFAULT_RULES)
        m.update(overrides or {})
        return cls(tuple(m.items()))

    def __getitem__(self, name: str | None) -> MeshAxes:
        if name is None:
            return None
        return dict(self.mapping).get(name)

    def without(self, axis: str) -> "Rules":
        """These rules with mesh axis `axis` removed everywhere (e.g. the rollout layout:
        weights replicated over fsdp, still split over tensor)."""
        def drop(v):
            if v == axis:
                return None
            if isinstance(v, tuple):
                v = tuple(a for a in v if a != axis)
                return v[0] if len(v) == 1 else (v or None)
            return v
        return Rules(tuple((k, drop(v)) for k, v in self.mapping))


def make_mesh(shape: Sequence[int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes; default shape puts all devices on fsdp."""
    devices = list(jax.devices() if devices is None else devices)
    shape = (1, len(devices), 1) if shape is None else tuple(int(s) for s in shape)
    if len(shape) != 3 or math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {shape} must be (data, fsdp, tensor) with product "
                         f"{len(devices)} (the number of devices); pass devices= or fix shape")
    arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical `names`; replicates dims that do not divide (needs shape+mesh)."""
    rules = rules or Rules()
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        axes = tuple(a for a in _axes_tuple(rules[name])
                     if a not in used and (mesh is None or a in mesh.shape))
        if shape is not None and mesh is not None:
            # Keep the longest prefix of axes whose size divides the dim.
            keep = []
            size = 1
            for a in axes:
                if shape[i] % (size * mesh.shape[a]) == 0:
                    keep.append(a)
                    size *= mesh.shape[a]
                else:
                    break
            axes = tuple(keep)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def named_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Rules | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules, shape, mesh))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "balcap_sharding", default=None)


@contextlib.contextmanager
def use_sharding(mesh: Mesh | None, rules: Rules | None = None) -> Iterator[None]:
    """Activate `constrain` for code traced inside; `mesh=None` deactivates it."""
    token = _ACTIVE.set(None if mesh is None else (mesh, rules or Rules()))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_sharding() -> tuple[Mesh, Rules] | None:
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names under `use_sharding`; identity otherwise."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    if x.ndim != len(names):
        raise ValueError(f"constrain: array of shape {x.shape} got {len(names)} names {names}")
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, named_sharding(names, x.shape, mesh, rules))


def param_names(var: Any) -> tuple[str | None, ...] | None:
    """Logical axis names stored on an nnx Variable (None if it has none)."""
    names = var.get_metadata().get("out_sharding")
    return None if names is None else tuple(names)


def param_shardings(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Tree of NamedShardings matching an nnx State (abstract or concrete)."""
    from flax import nnx

    def f(v):
        names = param_names(v)
        shape = v.get_value().shape
        names = (None,) * len(shape) if names is None else names
        return named_sharding(names, shape, mesh, rules)

    return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
