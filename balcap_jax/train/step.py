"""The jitted pieces of an RL step: per-token log-probs, the accumulated policy-gradient of a
micro-batch, and the optimiser update through the master weights (balcap_jax.precision)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from balcap_jax import precision, sampling
from balcap_jax.models import layers
from balcap_jax.rl import loss as loss_lib

__all__ = ["RLStep"]


def _loss_fn(params, graphdef, rest, batch, adv, old_logp, ref_logp, normalizer, *, rl,
             temperature, max_len, frozen=None, dropout_key=None, lora_dropout=0.0):
    """(loss, (metrics, logp)). old_logp None: the parameters are the pre-update ones (the
    first pass of a step), so old_logp is stop_gradient(logp), exactly SPEC.md section 5.
    `frozen(path)`: leaves the optimiser never updates; no gradient is computed for them (a
    frozen vision tower then runs no backward pass and keeps no activations for one).
    `dropout_key`: LoRA dropout of rate `lora_dropout` on the adapters' inputs in this forward
    (the first pass's old_logp then carries the same masks, so its ratio is exactly 1)."""
    if frozen is not None:
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.lax.stop_gradient(x) if frozen(p) else x, params)
    model = nnx.merge(graphdef, params, rest)
    with layers.lora_dropout(dropout_key, lora_dropout if dropout_key is not None else 0.0):
        logp = sampling.token_logprobs_fn(model, batch, temperature=temperature)
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    loss, metrics = loss_lib.policy_loss(
        logp, old_logp, adv, batch["mask"], ref_logp=ref_logp, eps_low=rl.eps_low,
        eps_high=rl.eps_high, beta=rl.beta, aggregation=rl.aggregation,
        max_completion_length=max_len, normalizer=normalizer)
    return loss, (metrics, jax.lax.stop_gradient(logp))


class RLStep:
    """Jitted pieces of one step, built once per run: log-probs, gradient, update.

    Each is a jax.jit with the graphdef static and the state as an argument (DESIGN.md); the
    update donates the parameters and optimiser state.

    With ``params`` on a mesh, the gradient accumulator, the optimiser state and the updated
    parameters are pinned to the parameters' shardings (moments like their parameter, counters
    replicated): the accumulator is sharded, not built on one device, and every call sees the
    shardings of the first, so nothing recompiles on the second micro-batch or step.
    """

    def __init__(self, graphdef, rest, optimizer, rl, *, temperature: float, max_len: int,
                 params=None, frozen=None, lora_dropout: float = 0.0):
        self.graphdef, self.rest, self.opt = graphdef, rest, optimizer
        loss = functools.partial(_loss_fn, rl=rl, temperature=temperature, max_len=max_len,
                                 frozen=frozen, lora_dropout=lora_dropout)
        gd = graphdef

        def init_opt(p, master=None):
            # optimiser moments in float32 whatever the parameter dtype: init from the float32
            # view the updates are computed against (the master weights for bf16 params)
            return self.opt.init(precision.optimizer_view(p, master))

        psh, osh, rep = self._shardings(params, init_opt)
        self.frozen = frozen
        # the master tree's shape: MaskedNode where no master is kept (float32 or frozen leaves)
        master_like = None if params is None else jax.eval_shape(
            lambda p: precision.init_master(p, frozen), params)
        msh = None if psh is None or master_like is None else jax.tree.map(
            lambda m, s: m if precision.is_masked(m) else s, master_like, psh,
            is_leaf=precision.is_masked)

        def jit(f, out=None, **kw):
            return jax.jit(f, **kw) if out is None else jax.jit(f, out_shardings=out, **kw)

        @jax.jit
        def logprobs(params, rest, batch):
            model = nnx.merge(gd, params, rest)
            return sampling.token_logprobs_fn(model, batch, temperature=temperature)

        @functools.partial(jit, out=None if psh is None else (psh, rep, rep, None, rep),
                           donate_argnums=(0,))
        def grad(acc, params, rest, batch, adv, old_logp, ref_logp, normalizer, key=None):
            """Adds this micro-batch's gradient into ``acc`` (donated, updated in place);
            returns (acc, loss, metrics, logp, None). ``acc`` None: this micro-batch is the
            whole step, and its float32 gradient comes back as the accumulator with its global
            norm in place of None (no zero-filled accumulator to add into, and no second pass
            over the gradient for the norm). ``old_logp`` None on the first pass; ``key``
            draws the LoRA dropout masks (None: no dropout)."""
            (l, (m, logp)), g = jax.value_and_grad(loss, has_aux=True)(
                params, gd, rest, batch, adv, old_logp, ref_logp, normalizer, dropout_key=key)
            if acc is None:
                g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
                return g, l, m, logp, optax.global_norm(g)
            # accumulate in float32 whatever the parameter dtype (bf16 sums lose small grads)
            return jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc, g), l, m, logp, None

        @functools.partial(jit, donate_argnums=(0, 1, 2),
                           out=None if osh is None else (psh, msh, osh))
        def apply(params, master, opt_state, grads, scale, grad_norm=None):
            # params, master and optimiser state are donated: the update happens in place, no
            # second copy of the optimiser state (a where()-based skip would keep both alive).
            # Low-precision params are updated through their float32 master (precision.py).
            # grad_norm: the global norm of grads when known (the optimiser's clip then does
            # not compute it again)
            grads = jax.tree.map(lambda x: x * scale, grads)
            extra = {} if grad_norm is None or not isinstance(
                self.opt, optax.GradientTransformationExtraArgs) else {
                    "grad_norm": grad_norm * scale}
            updates, opt_state = self.opt.update(grads, opt_state,
                                                 precision.optimizer_view(params, master), **extra)
            params, master = precision.apply_updates(params, master, updates)
            return params, master, opt_state

        self.grad_norm = jax.jit(lambda g, scale: optax.global_norm(g) * scale)
        self.logprobs, self.grad, self.apply = logprobs, grad, apply
        self.zeros = jit(lambda p: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p),
                         out=psh)
        self.init_opt = jit(init_opt, out=osh)

    def init_master(self, params):
        """The float32 master copy of `params` (None for float32 params); eager casts keep
        each leaf's sharding."""
        return precision.init_master(params, self.frozen)

    def _shardings(self, params, init_opt):
        """(param shardings, optimiser-state shardings, replicated) or Nones off a mesh."""
        leaves = [] if params is None else jax.tree.leaves(params)
        if not leaves or not all(isinstance(x, jax.Array) and
                                 isinstance(x.sharding, jax.sharding.NamedSharding)
                                 for x in leaves):
            return None, None, None
        mesh = leaves[0].sharding.mesh
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        psh = jax.tree.map(lambda x: x.sharding, params)
        masked = lambda v: isinstance(v, optax.MaskedNode)   # frozen leaves keep no state
        osh = optax.tree_map_params(
            self.opt, lambda v, s: v if masked(v) else s,
            jax.eval_shape(init_opt, params),
            psh, transform_non_params=lambda _: rep, is_leaf=masked)
        return psh, osh, rep
