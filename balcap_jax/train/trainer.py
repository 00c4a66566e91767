"""The BalCapRL loop: rollout -> score -> length control -> advantages -> update -> log -> save.

The Trainer is where the parts meet (it takes them as objects, built by balcap_jax.build).
One step:
  1. a batch of B prompts (image, references, instruction) from the loader;
  2. ``generate`` G rollouts per prompt (rows prompt-major: row i*G + j);
  3. decode, score with the scorer -> rewards [B, G, K];
  4. length-conditional masking of the linguistic channel (or a linear r_len channel);
  5. advantages (c-GDPO or GRPO), optionally 0 for truncated rollouts;
  6. old_logp from the trainer's own forward pass before the first update (SPEC.md section 5):
     the first pass's gradient computation is that forward pass (its parameters are the
     pre-update ones), so it uses stop_gradient(logp) and keeps logp for any later pass; no
     separate forward over the rollouts;
  7. ``ppo_epochs`` passes over micro-batches with exact gradient accumulation (the loss of each
     micro-batch is divided by the global denominator, so the summed gradient is the full
     batch's), then one AdamW update. A step whose loss or gradient is not finite is skipped.

Multi-host (several processes, ``jax.distributed``; see ``balcap_jax.distributed``): each host
brings its own examples; the prompt batch is gathered so every host holds the global batch and
places it on the global mesh; each host decodes and scores only its own rollouts; rewards are
gathered before the advantages, so group and batch statistics are over the whole batch and the
hosts compute identical advantages and updates. One process is the special case P = 1.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax import distributed as dist
from balcap_jax import sampling
from balcap_jax import sharding as shd
from balcap_jax import workdir as wd
from balcap_jax.models import lora
from balcap_jax.rl import advantages as adv_lib
from balcap_jax.rl import loss as loss_lib
from balcap_jax.train.optim import is_vision_path, make_optimizer
from balcap_jax.train.rollouts import (
    completion_text,
    gather_rows,
    merge_scores,
    rollout_rewards,
    update_width,
    word_count,
)
from balcap_jax.train.step import RLStep

__all__ = ["TrainState", "RunParts", "Trainer"]


@dataclasses.dataclass
class TrainState:
    params: Any          # nnx.State of the trainable-or-not Params (the working copy)
    opt_state: Any
    step: int
    rng: jax.Array       # raw uint32 key data (checkpoint friendly)
    master: Any = None   # float32 master weights of low-precision params (balcap_jax.precision)

    def tree(self) -> dict:
        # step and rng as host numpy: equal on every process, saved once (orbax refuses
        # process-local jax.Arrays in a multi-host checkpoint)
        out = {"params": self.params, "opt_state": self.opt_state,
               "step": np.asarray(self.step, np.int32), "rng": np.asarray(self.rng)}
        if self.master is not None:   # exact resume in bf16 needs the float32 values
            out["master"] = self.master
        return out


@dataclasses.dataclass
class RunParts:
    """Everything a run needs, built by ``balcap_jax.build.build_run`` (or by a test)."""
    model: Any                  # the policy (nnx.Module)
    tokenizer: Any
    processor: Any              # prompts + images -> model inputs
    scorer: Any                 # balcap_jax.rewards.types.Scorer
    loader: Any                 # iterator of example batches with get_state / set_state
    eval_examples: list         # fixed held-out examples
    eos_token_ids: tuple
    pad_id: int
    # fixed prompt lengths (data.max_prompt_tokens / data.prompt_buckets); None: the next power
    # of two of each batch's longest prompt, fine for inputs of one size
    prompt_buckets: tuple | None = None
    # "replicated": rollouts decode on a copy of the weights gathered over fsdp once per step
    # (not at every token); "fsdp": on the training layout
    rollout_layout: str = "fsdp"


class Trainer:
    """Owns the train state and runs steps; ``main.py`` adds checkpoints, logging and export."""

    def __init__(self, cfg, parts: RunParts):
        self.cfg, self.p = cfg, parts
        # the trainable parameters: all of them, or a LoRA policy's adapters alone (the frozen
        # base then rides in `rest`: no gradient, no optimiser state, not checkpointed)
        graphdef, params, rest = nnx.split(parts.model, lora.trainable(parts.model), ...)
        self.graphdef, self.rest = graphdef, rest
        self.optimizer = make_optimizer(cfg.train, params)
        self.fn = RLStep(graphdef, rest, self.optimizer, cfg.rl,
                         temperature=cfg.sampling.temperature,
                         max_len=cfg.sampling.max_new_tokens, params=params,
                         frozen=is_vision_path if cfg.train.freeze_vision else None,
                         lora_dropout=float(cfg.model.lora.dropout))
        # the reference model is a frozen copy: apply() donates the live params
        self.ref_params = jax.tree.map(jnp.copy, params) if cfg.rl.beta > 0 else None
        master = self.fn.init_master(params)
        self.state = TrainState(params, self.fn.init_opt(params, master), 0,
                                jax.random.key_data(jax.random.key(cfg.seed)), master)
        self.skipped = 0
        self._rollout_shardings = None
        self._merged = None      # (params, rest, model): model() for the current parameters
        self._check_hosts_agree(parts)
        kw = {"batch_norm": cfg.rl.batch_norm} if cfg.rl.advantage == "cgdpo" else {}
        # one compiled program instead of dozens of eager ops (each its own compile)
        self._write_scorer_metadata(cfg, parts.scorer)
        self.estimator = jax.jit(functools.partial(
            adv_lib.get_advantage_estimator(cfg.rl.advantage), eps=cfg.rl.adv_eps, **kw))

    @staticmethod
    def _check_hosts_agree(parts) -> None:
        """Several processes: every host must tokenise alike (prompts are gathered as ids and
        each host decodes its own rollouts), so a tokenizer built from host-local data fails
        here rather than training on garbage."""
        if not dist.is_multiprocess():
            return
        vocab = sorted(parts.tokenizer.get_vocab().items())
        digest = hashlib.sha256(json.dumps([vocab, list(parts.eos_token_ids), parts.pad_id])
                                .encode()).hexdigest()
        seen = dist.allgather_json(digest)
        if len(set(seen)) > 1:
            raise ValueError(f"the {len(seen)} processes built different tokenizers (vocabulary "
                             f"/ stop / pad ids; digests {seen}); build the tokenizer from data "
                             "every host sees alike, e.g. the unsharded stream or a directory")

    @staticmethod
    def _write_scorer_metadata(cfg, scorer) -> None:
        """Judge prompt versions and judge names, once per run, beside config.json (strings:
        metrics.jsonl holds floats only)."""
        meta = getattr(scorer, "metadata", None)
        if callable(meta) and cfg.workdir and jax.process_index() == 0:
            wd.write_text(wd.join(cfg.workdir, "scorer_metadata.json"),
                          json.dumps(meta(), indent=1, sort_keys=True))

    # -- helpers ---------------------------------------------------------------------------
    def model(self):
        """The policy on the current parameters. Merged once per parameter update (a step
        asks for it three times; the update replaces state.params, which renews it)."""
        m = self._merged
        if m is None or m[0] is not self.state.params or m[1] is not self.rest:
            m = self._merged = (self.state.params, self.rest,
                                nnx.merge(self.graphdef, self.state.params, self.rest))
        return m[2]

    def reset_params(self, params) -> None:
        """Starts training from (a copy of) `params`, with a fresh master copy and optimiser
        state (e.g. from a warm start)."""
        st = self.state
        st.params = jax.tree.map(jnp.copy, params)
        st.master = self.fn.init_master(st.params)
        st.opt_state = self.fn.init_opt(st.params, st.master)

    def _inputs(self, examples) -> dict:
        from balcap_jax.processing import build_caption_prompt
        texts = [build_caption_prompt(e["prompt"], self.p.tokenizer) for e in examples]
        return self.p.processor(texts, images=[[e["image"]] for e in examples])

    def _next_key(self) -> jax.Array:
        key = jax.random.wrap_key_data(jnp.asarray(self.state.rng))
        key, sub = jax.random.split(key)
        self.state.rng = jax.random.key_data(key)
        return sub

    def rollout_model(self):
        """The policy the sampler runs: on the training layout, or (rollout_layout
        "replicated") on weights gathered over fsdp once here, so the decode loop reads local
        weights instead of gathering them at every token. The copy lives for one generate."""
        model = self.p.model
        mesh = getattr(model, "mesh", None)
        if self.p.rollout_layout != "replicated" or mesh is None or mesh.shape["fsdp"] == 1:
            return self.model()
        if self._rollout_shardings is None:
            rules = (getattr(model, "rules", None) or shd.Rules()).without("fsdp")
            self._rollout_shardings = shd.param_shardings(self.state.params, mesh, rules)
        params = jax.device_put(self.state.params, self._rollout_shardings)
        return nnx.merge(self.graphdef, params, self.rest)

    def _generate(self, inputs, *, greedy: bool, num_samples: int):
        s = self.cfg.sampling
        return sampling.generate(
            self.rollout_model(), inputs, max_new_tokens=s.max_new_tokens,
            num_samples=num_samples,
            temperature=0.0 if greedy else s.temperature, top_p=1.0 if greedy else s.top_p,
            top_k=0 if greedy else s.top_k, eos_token_ids=self.p.eos_token_ids,
            # greedy evaluation draws no randomness: it must not advance the training stream,
            # or a run that evaluated at a different step would not resume identically
            rng=jax.random.key(0) if greedy else self._next_key(), pad_id=self.p.pad_id,
            prompt_buckets=self.p.prompt_buckets, cache_windows=s.get("cache_windows", 4))

    @staticmethod
    def _host_samples(samples) -> dict:
        """Samples as numpy on this host (gathered from the devices of every process)."""
        out = {k: dist.to_host(getattr(samples, k))
               for k in ("tokens", "logprobs", "lengths", "truncated")}
        steps = np.arange(out["tokens"].shape[1])[None, :]
        out["mask"] = (steps < out["lengths"][:, None]).astype(np.float32)
        return out

    def _score(self, examples, rows, tokens, lengths, trunc):
        """Decodes and scores rollouts ``rows`` (indices into ``examples``) of this host."""
        captions = completion_text(self.p.tokenizer, tokens, lengths, trunc)
        refs = [examples[i]["references"] for i in rows]
        context = {"image_ids": [examples[i].get("image_id") for i in rows]}
        if all("scene" in examples[i] for i in rows):   # synthetic worlds carry ground truth
            context["scenes"] = [examples[i]["scene"] for i in rows]
        result = self.p.scorer([examples[i]["image"] for i in rows], captions, refs,
                               token_ids=tokens, lengths=lengths, **context)
        return captions, refs, result

    # -- one RL step -----------------------------------------------------------------------
    def _round(self, examples: list[dict]) -> dict:
        """G rollouts of each prompt, this host's scored: the global prompt batch, the samples
        (every host holds all rows), the global rewards [B, G, K] after length control.

        With train.rollout_chunks = S > 1 each host's prompts are sampled in S chunks (one
        generate each, a key each); with train.overlap_scoring the rollouts of a finished
        chunk are scored in a thread while the next chunk decodes (remote judges, or judges on
        devices of their own, work during the decode). Same chunks, same keys: the overlapped
        and the sequential paths give the same rollouts, rewards and update."""
        rl, g = self.cfg.rl, self.cfg.sampling.num_samples
        chunks = int(self.cfg.train.get("rollout_chunks", 1) or 1)
        overlap = bool(self.cfg.train.get("overlap_scoring", False))
        t0 = time.perf_counter()
        n = len(examples)
        if n % chunks:
            raise ValueError(f"train.rollout_chunks={chunks} must divide each host's "
                             f"{n} prompts")
        pool = concurrent.futures.ThreadPoolExecutor(1) if overlap else None
        parts, jobs, scoring = [], [], [0.0]

        def score(ex, smp_c, mine):
            t = time.perf_counter()
            out = self._score(ex, np.repeat(np.arange(len(ex)), g), smp_c["tokens"][mine],
                              smp_c["lengths"][mine], smp_c["truncated"][mine])
            scoring[0] += time.perf_counter() - t
            return out
        try:
            for c in range(chunks):
                ex = examples[c * n // chunks:(c + 1) * n // chunks]
                inputs_c, (off, n_c) = dist.gather_inputs(self._inputs(ex))
                smp_c = self._host_samples(self._generate(inputs_c, greedy=False,
                                                          num_samples=g))
                parts.append((inputs_c, smp_c))
                args = (ex, smp_c, dist.host_slice(off, n_c, g))
                jobs.append(pool.submit(score, *args) if pool else score(*args))
            t1 = time.perf_counter()
            done = [j.result() for j in jobs] if pool else jobs
        finally:
            if pool:
                pool.shutdown(wait=True)
        t2 = time.perf_counter()
        if chunks == 1:
            inputs, smp = parts[0]
        else:   # process-major again: host p's chunks in order
            inputs, _ = dist.gather_inputs(self._inputs(examples))
            hosts, per = jax.process_count(), n // chunks * g
            smp = {k: np.concatenate([parts[c][1][k][p * per:(p + 1) * per]
                                      for p in range(hosts) for c in range(chunks)])
                   for k in parts[0][1]}
        captions = [x for cap, _, _ in done for x in cap]
        refs = [x for _, ref, _ in done for x in ref]
        result = merge_scores([res for _, _, res in done])
        rewards, names, weights, ldiag = rollout_rewards(result, rl, captions, refs, n, g)
        rewards, _ = dist.allgather_rows(rewards)      # [B, G, K]: global statistics below
        return {"examples": examples, "inputs": inputs, "smp": smp, "rewards": rewards,
                "names": names, "weights": weights, "n": n,
                "ldiag": dist.mean_over_hosts(ldiag),
                "sdiag": dist.mean_over_hosts(result.diagnostics),
                # decode time; scoring: all of it; exposed: what the step waited for after the
                # last decode (all of scoring on the sequential path)
                "time/rollout": t1 - t0 - (0.0 if pool else scoring[0]),
                "time/scoring": scoring[0],
                "time/scoring_exposed": (t2 - t1) if pool else scoring[0]}

    @staticmethod
    def _signal(rewards: np.ndarray) -> np.ndarray:
        """[B] True for groups whose rewards differ in some channel (a group with no spread
        in any channel gets zero advantages: no gradient)."""
        with np.errstate(invalid="ignore"):
            spread = np.nanstd(rewards, axis=1)
        return np.any(spread > 0, axis=-1)

    def _sampled(self, examples: list[dict], more) -> tuple[dict, dict]:
        """The step's groups: one round, or with rl.dynamic_sampling (DAPO) up to that many
        extra rounds of prompts from `more()` until every host has its n groups with signal;
        each host keeps its own first n with signal (then, if short, its earliest without).
        Returns the selected round-like dict and the dynamic-sampling metrics."""
        rounds = [self._round(examples)]
        extra = int(self.cfg.rl.get("dynamic_sampling", 0) or 0)
        if extra <= 0 or more is None:
            return rounds[0], {}
        n, hosts = rounds[0]["n"], jax.process_count()

        signal = [self._signal(rounds[0]["rewards"])]     # [B] per round, computed once

        def chosen():
            sel = []
            for p in range(hosts):
                cand = [(r, j) for r in range(len(rounds)) for j in range(n)]
                sig = [c for c in cand if signal[c[0]][p * n + c[1]]][:n]
                rest = [c for c in cand if not signal[c[0]][p * n + c[1]]]
                sel.append(sorted(sig + rest[:n - len(sig)]))
            return sel, min(sum(int(sg[p * n:(p + 1) * n].sum()) for sg in signal)
                            for p in range(hosts))
        sel, fewest = chosen()
        while fewest < n and len(rounds) <= extra:     # the same decision on every host
            rounds.append(self._round(more()))
            signal.append(self._signal(rounds[-1]["rewards"]))
            sel, fewest = chosen()
        first = signal[0]
        dyn = {"dynamic/rounds": float(len(rounds)),
               "dynamic/signal_groups_first_round": float(first.mean()),
               "dynamic/extra_prompts": float((len(rounds) - 1) * len(first))}
        if len(rounds) == 1:          # every host's groups all have signal: nothing to pick
            return rounds[0], {**dyn, "dynamic/signal_groups": float(first.mean())}
        me, g = jax.process_index(), self.cfg.sampling.num_samples
        groups = [(r, p * n + j) for p in range(hosts) for r, j in sel[p]]
        smp = {k: np.concatenate([rounds[r]["smp"][k][gid * g:(gid + 1) * g]
                                  for r, gid in groups]) for k in rounds[0]["smp"]}
        rewards = np.stack([rounds[r]["rewards"][gid] for r, gid in groups])
        mine = [rounds[r]["examples"][j] for r, j in sel[me]]
        inputs, _ = dist.gather_inputs(self._inputs(mine))
        out = {"inputs": inputs, "smp": smp, "rewards": rewards, "names": rounds[0]["names"],
               "weights": rounds[0]["weights"], "n": n,
               "ldiag": {k: float(np.mean([rd["ldiag"][k] for rd in rounds]))
                         for k in rounds[0]["ldiag"]},
               "sdiag": {k: float(np.mean([rd["sdiag"].get(k, np.nan) for rd in rounds]))
                         for k in rounds[0]["sdiag"]}}
        for k in ("time/rollout", "time/scoring", "time/scoring_exposed"):
            out[k] = sum(rd[k] for rd in rounds)
        return out, {**dyn, "dynamic/signal_groups": float(self._signal(rewards).mean())}

    def train_step(self, examples: list[dict], more=None) -> dict:
        """One RL step on this host's ``examples`` (all of the batch with one process).
        ``more()``: this host's next prompts, for rl.dynamic_sampling's extra rounds."""
        cfg, rl = self.cfg, self.cfg.rl
        g = cfg.sampling.num_samples
        rd, dyn = self._sampled(examples, more)
        inputs, smp, rewards = rd["inputs"], rd["smp"], rd["rewards"]
        names, weights, ldiag, sdiag = rd["names"], rd["weights"], rd["ldiag"], rd["sdiag"]
        tokens, mask, truncated = smp["tokens"], smp["mask"], smp["truncated"]
        b = len(rewards)
        adv = np.asarray(self.estimator(rewards, weights)).reshape(-1)
        if rl.mask_truncated:
            adv = np.where(truncated, 0.0, adv)
        t2 = time.perf_counter()

        rows = np.repeat(np.arange(b), g)
        w = update_width(smp["lengths"], tokens.shape[1]) if cfg.train.trim_completions \
            else tokens.shape[1]
        metrics = self._update(inputs, rows, tokens[:, :w], mask[:, :w], adv,
                               smp["logprobs"][:, :w])
        t3 = time.perf_counter()
        self.state.step += 1

        n_tok = float(mask.sum())
        for k, name in enumerate(names):
            col = rewards[..., k]
            metrics[f"reward/{name}"] = float(np.nanmean(col)) if np.isfinite(col).any() else \
                float("nan")
            metrics[f"reward/{name}_std"] = float(np.nanstd(col)) if np.isfinite(col).any() \
                else float("nan")
            metrics[f"reward/{name}_nan"] = float(np.isnan(col).mean())
            metrics[f"zero_std_groups/{name}"] = float(np.mean(np.nanstd(col, axis=1) == 0))
        metrics.update({f"length/{k}": v for k, v in ldiag.items()})
        metrics.update({f"scorer/{k}": v for k, v in sdiag.items()})
        metrics.update(dyn)
        metrics.update({
            "length/tokens": n_tok / len(mask), "truncated": float(truncated.mean()),
            "advantage_abs": float(np.abs(adv).mean()), "skipped_steps": float(self.skipped),
            "time/rollout": rd["time/rollout"], "time/scoring": rd["time/scoring"],
            "time/scoring_exposed": rd["time/scoring_exposed"],
            "time/update": t3 - t2, "tokens_per_s": n_tok / max(rd["time/rollout"], 1e-9),
        })
        return metrics

    def _micro_batches(self, inputs, rows, tokens, mask):
        """Placed log-prob batches of micro_batch_size rollouts. Rows are prompt-major, so each
        run of gcd(micro_batch_size, G) rows shares one prompt: with train.share_prompts that
        prompt (and its image) is forwarded once and read as a shared prefix."""
        m = self.cfg.train.micro_batch_size
        model = self.model()
        gs = math.gcd(m, self.cfg.sampling.num_samples) if self.cfg.train.share_prompts and \
            sampling.shares_prefix(model) else 1
        for s in range(0, len(rows), m):
            sl = slice(s, s + m)
            yield sl, sampling.place_batch(model, sampling.prepare_logprob_batch(
                model, gather_rows(inputs, rows[sl][::gs]), tokens[sl], mask[sl],
                pad_id=self.p.pad_id, prompt_buckets=self.p.prompt_buckets, group_size=gs))

    def _update(self, inputs, rows, tokens, mask, adv, sampler_logp) -> dict:
        rl, fn, st = self.cfg.rl, self.fn, self.state
        mbs = list(self._micro_batches(inputs, rows, tokens, mask))
        ref = ([fn.logprobs(self.ref_params, self.rest, mb) for _, mb in mbs]
               if self.ref_params is not None else [None] * len(mbs))
        norm = None if rl.aggregation == "bnpo" else loss_lib.loss_normalizer(
            mask, aggregation=rl.aggregation,
            max_completion_length=self.cfg.sampling.max_new_tokens)   # dr_grpo: not the cut
        model = self.model()
        advs = [sampling.place_batch(model, np.asarray(adv[sl], np.float32)) for sl, _ in mbs]
        old = [None] * len(mbs)      # filled by the first pass (pre-update parameters)
        out = {}
        for epoch in range(rl.ppo_epochs):
            # one micro-batch: its gradient is the step's (and comes with its norm)
            grads, acc, loss = None if len(mbs) == 1 else fn.zeros(st.params), None, 0.0
            for i, ((_, mb), a, r) in enumerate(zip(mbs, advs, ref)):
                key = self._next_key() if self.cfg.model.lora.dropout > 0 else None
                grads, l, m, logp, gnorm = fn.grad(grads, st.params, self.rest, mb, a, old[i],
                                                   r, norm, key)
                if epoch == 0:
                    old[i] = logp
                acc = loss_lib.accumulate_metrics(acc, m)
                loss += float(l)
            if epoch == 0:
                old_all = np.concatenate([dist.to_host(o) for o in old])
                out["logp_gap_sampler_trainer"] = float(
                    (np.abs(old_all - sampler_logp) * mask).sum() / max(mask.sum(), 1))
                out["entropy_est"] = float(-(old_all * mask).sum() / max(mask.sum(), 1))
            # bnpo: each micro-batch is its own mean, so the step is their average
            scale = 1.0 / len(mbs) if rl.aggregation == "bnpo" else 1.0
            loss *= scale
            known = gnorm      # the gradient pass's norm (one micro-batch), or None
            gnorm = float(fn.grad_norm(grads, jnp.float32(scale)) if gnorm is None else gnorm)
            # the metrics' (num, den) sums are ready: reduce them here, on the host, so that
            # reading them does not wait behind the update dispatched next
            reduced = {k: float(v) for k, v in
                       loss_lib.reduce_metrics(jax.device_get(acc)).items()}
            if np.isfinite(loss) and np.isfinite(gnorm):
                extra = {} if known is None else {"grad_norm": known}
                st.params, st.master, st.opt_state = fn.apply(st.params, st.master, st.opt_state,
                                                              grads, jnp.float32(scale), **extra)
            else:  # never apply a step built on a non-finite loss or gradient
                self.skipped += 1
            out.update({"loss": loss, "grad_norm": gnorm, **reduced})
        return out

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, examples: list[dict] | None = None, *, num_samples_logged: int = 4):
        """Greedy captions on the fixed held-out set: mean rewards (+ b-CapScore when the three
        BalCapRL channels are present) and a few (prompt, caption, rewards) records."""
        from balcap_jax.eval import b_capscore
        examples = self.p.eval_examples if examples is None else examples
        if not examples:
            return {}, []
        b = self.cfg.train.batch_size
        captions, rewards = [], {}
        for s in range(0, len(examples), b):
            chunk = examples[s:s + b]
            # a short last chunk is filled with copies of its last example (dropped below), so
            # evaluation reuses the one compiled prompt batch shape
            full = chunk + [chunk[-1]] * (b - len(chunk))
            # the held-out examples are the same on every host: every host generates the whole
            # chunk, scores its own share of it (the judges see each example once overall),
            # and the shares are gathered in process order
            smp = self._host_samples(self._generate(self._inputs(full), greedy=True,
                                                    num_samples=1))
            smp = {k: v[:len(chunk)] for k, v in smp.items()}
            mine = np.array_split(np.arange(len(chunk)), jax.process_count())[
                jax.process_index()]
            captions += completion_text(self.p.tokenizer, smp["tokens"], smp["lengths"],
                                        smp["truncated"])
            part = {}
            if len(mine):
                _, _, res = self._score(chunk, mine, smp["tokens"][mine], smp["lengths"][mine],
                                        smp["truncated"][mine])
                part = {k: np.asarray(v, np.float32).tolist() for k, v in res.rewards.items()}
            for share in dist.allgather_json(part):    # NaN (a judge failure) survives JSON
                for k, v in share.items():
                    rewards.setdefault(k, []).append(np.asarray(v, np.float32))
        rewards = {k: np.concatenate(v) for k, v in rewards.items()}
        out = {f"eval/{k}": float(np.nanmean(v)) for k, v in rewards.items()}
        out["eval/words"] = float(np.mean([word_count(c) for c in captions]))
        if all(k in rewards for k in ("precision", "recall", "linguistic")):
            out["eval/b_capscore"] = float(b_capscore(rewards["precision"], rewards["recall"],
                                                      rewards["linguistic"]))
        records = [{"image_id": str(e.get("image_id")), "prompt": e["prompt"], "caption": c,
                    "references": e["references"],
                    "rewards": {k: float(v[i]) for k, v in rewards.items()}}
                   for i, (e, c) in enumerate(zip(examples, captions))][:num_samples_logged]
        return out, records

    # -- checkpoint glue -------------------------------------------------------------------
    def meta(self) -> dict:
        """The JSON side of a checkpoint: data position and counters. Each host reads its own
        shard of the data, so with several processes every host's position is kept
        (``data_by_process``; process 0 writes the record). Collective: call on every host."""
        data = self.p.loader.get_state()
        out = {"data": data, "skipped": self.skipped}
        if dist.is_multiprocess():
            out["data_by_process"] = dist.allgather_json(data)
        return out

    def load_tree(self, tree: dict, meta: dict) -> None:
        self.state = TrainState(tree["params"], tree["opt_state"], int(tree["step"]),
                                np.asarray(tree["rng"]), tree.get("master"))
        self.skipped = int(meta.get("skipped", 0))
        by_process = meta.get("data_by_process")
        if by_process is not None and len(by_process) != jax.process_count():
            raise ValueError(f"the checkpoint holds the data positions of {len(by_process)} "
                             f"processes but this run has {jax.process_count()}; resume with "
                             "the same number of hosts")
        self.p.loader.set_state(meta["data"] if by_process is None
                                else by_process[jax.process_index()])
