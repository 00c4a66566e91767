"""Sampler and recomputed log-probabilities.

Model-independent pieces (filters, keys, bucketing, the decode loop's bookkeeping) run on a tiny
hand-built attention model that follows the decoder protocol; parity with transformers' greedy
`generate` runs on the real decoders against tiny random HF models.
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from balcap_jax import sampling


class FakeLM(nnx.Module):
    """One attention layer with a KV cache and sinusoidal positions: enough to make the output
    depend on the cache contents, positions and kv_mask, as a real decoder's does."""

    def __init__(self, vocab=97, dim=32, *, seed=0):
        k = jax.random.split(jax.random.key(seed), 5)
        init = lambda key, shape, s: nnx.Param(s * jax.random.normal(key, shape))
        self.emb = init(k[0], (vocab, dim), 1.0)
        self.wq, self.wk, self.wv = (init(k[i], (dim, dim), dim ** -0.5) for i in (1, 2, 3))
        self.head = init(k[4], (dim, vocab), 3 * dim ** -0.5)
        self.dim = dim

    def embed(self, ids):
        return self.emb[...][ids]

    def init_cache(self, batch, max_len, dtype):
        z = jnp.zeros((batch, max_len, self.dim), dtype)
        return {"k": z, "v": z}

    def forward_embeds(self, x, positions, kv_mask, cache, cache_index):
        freqs = 1.0 / (10.0 ** (jnp.arange(self.dim) / self.dim))
        h = x + jnp.sin(positions[..., None] * freqs)
        q, k, v = h @ self.wq[...], h @ self.wk[...], h @ self.wv[...]
        t = x.shape[1]
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache["k"], k, (0, cache_index, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v, (0, cache_index, 0))
            cache = {"k": k, "v": v}
        q_slot = cache_index + jnp.arange(t)
        allowed = ((jnp.arange(k.shape[1])[None, :] <= q_slot[:, None])[None]
                   & (kv_mask[:, None, :] > 0))
        att = jax.nn.softmax(jnp.where(allowed, q @ k.transpose(0, 2, 1) / self.dim ** 0.5, -1e30))
        return h + jnp.tanh(att @ v), cache

    def logits(self, hidden):
        return (hidden @ self.head[...]).astype(jnp.float32)


@pytest.fixture(scope="module")
def fake():
    return FakeLM()


def _prompts(rng=0, lengths=(5, 3, 7), vocab=97):
    """Left-padded batch with different lengths."""
    r = np.random.default_rng(rng)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = r.integers(3, vocab, n)
        mask[i, t - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _reference_greedy(model, inputs, steps, width=32):
    """Greedy by full recomputation, one row at a time, no left padding, no cache (sequences
    right-padded to a fixed width: causal attention never looks right)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, seq, n):
        m = nnx.merge(graphdef, state)
        h, _ = m.forward_embeds(m.embed(seq), jnp.arange(width)[None],
                                jnp.ones((1, width), jnp.int32), None, 0)
        return jnp.argmax(m.logits(h)[0, n - 1])

    out = []
    for ids, msk in zip(inputs["input_ids"], inputs["attention_mask"]):
        seq = np.zeros((1, width), np.int32)
        n = int(msk.sum())
        seq[0, :n] = ids[msk > 0]
        for _ in range(steps):
            seq[0, n] = int(next_token(state, seq, n))
            n += 1
        out.append(seq[0, n - steps:n])
    return np.array(out)


# ---------------------------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------------------------

def test_inverse_cdf_matches_the_row_search_and_stays_on_the_support():
    """The two-level inverse CDF picks the first index whose cumulative weight exceeds u * total
    (a numpy search over the whole row, float64) and, at u at or just below 1 (where rounding
    runs past the end), the last nonzero entry: never a zero-weight one. Rows have zero runs
    inside blocks, whole zero blocks, and a zero tail."""
    r = np.random.default_rng(0)
    v = 1024                                                   # 8 blocks of 128
    w = r.random((6, v)).astype(np.float32)
    w[r.random((6, v)) < 0.5] = 0.0
    w[1, 384:] = 0.0                                           # zero blocks at the end
    w[2, 130:] = 0.0                                           # last nonzero inside block 1
    w[3, :900] = 0.0                                           # one short run of weight
    w[4, ::2] = 0.0
    w[5, 1000:] = 0.0
    # 1.0: the target at the total, as when u * total rounds up to it
    us = np.concatenate([r.random(40), [0.0, 0.5, np.nextafter(np.float32(1), np.float32(0)), 1.0]])
    f = jax.jit(sampling._inverse_cdf)
    for u in us.astype(np.float32):
        got = np.asarray(f(jnp.asarray(w), jnp.full((6,), u)))
        assert (w[np.arange(6), got] > 0).all(), (u, got)
        c = np.cumsum(w.astype(np.float64), axis=1)
        want = np.minimum((c <= u * c[:, -1:]).sum(1), v - 1 - np.argmax(w[:, ::-1] > 0, 1))
        # away from block and entry boundaries (float32 against float64 sums) the two agree
        near = np.abs(c[np.arange(6), want] - u * c[:, -1]) < 1e-4 * c[:, -1]
        np.testing.assert_array_equal(got[~near], want[~near])


def test_greedy_and_logprob_under_scaled_distribution():
    logits = jax.random.normal(jax.random.key(1), (4, 300)) * 3
    keys = sampling.row_keys(jax.random.key(0), 4)
    tok, lp = sampling.sample_logits(logits, keys, temperature=0)
    np.testing.assert_array_equal(tok, np.argmax(logits, -1))
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[jnp.arange(4), tok], atol=1e-6)
    tok, lp = sampling.sample_logits(logits, keys, temperature=0.7)
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits / 0.7)[jnp.arange(4), tok], atol=1e-5)
    tok1, lp1 = sampling.sample_logits(logits, keys, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(tok1, np.argmax(logits, -1))


@pytest.mark.parametrize("vocab", [10, 512])  # one-level and two-level inverse CDF
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.6), (5, 0.8)])
def test_sampling_frequencies_match_filtered_distribution(vocab, top_k, top_p):
    n = 20000
    base = np.random.default_rng(3).normal(size=vocab) * 2
    base[:6] += 4  # a few dominant tokens so top-p cuts somewhere interesting
    logits = jnp.broadcast_to(jnp.asarray(base, jnp.float32), (n, vocab))
    keys = sampling.row_keys(jax.random.key(7), n)
    tok, _ = jax.jit(lambda l, k: sampling.sample_logits(l, k, temperature=1.3, top_k=top_k,
                                                         top_p=top_p))(logits, keys)
    # expected: HF order (temperature, top-k, then top-p on the renormalised top-k distribution)
    p = np.exp(base / 1.3 - np.max(base / 1.3))
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(vocab, bool)
    kk = top_k if top_k else vocab
    keep[order[:kk]] = True
    q = np.where(keep, p, 0)
    q /= q.sum()
    if top_p < 1:
        qs = q[order]
        above = np.cumsum(qs) - qs
        drop = order[above >= top_p]
        q[drop] = 0
        q /= q.sum()
    freq = np.bincount(np.asarray(tok), minlength=vocab) / n
    assert freq[q == 0].sum() == 0, "a filtered-out token was sampled"
    np.testing.assert_allclose(freq, q, atol=0.015)  # ~5 sigma at n = 20k


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_nucleus_without_sort_equals_sorted_rule(top_p):
    logits = (jax.random.normal(jax.random.key(2), (6, 1000))
              * jnp.array([0.1, 1, 2, 4, 8, 16])[:, None])
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    order = np.argsort(-p, axis=-1, kind="stable")
    ps = np.take_along_axis(p, order, -1)
    above_sorted = np.cumsum(ps, -1) - ps
    expected = np.zeros_like(p, bool)
    np.put_along_axis(expected, order, above_sorted < top_p, -1)
    got = np.asarray(sampling._nucleus(jax.nn.softmax(logits), top_p))
    # float32 vs float64 mass may differ at the boundary token only
    assert (got != expected).sum(-1).max() <= 1
    assert got[np.arange(6), order[:, 0]].all()   # the top token is always kept


def test_bucket_length_and_left_align():
    assert [sampling.bucket_length(n) for n in (1, 8, 9, 100)] == [8, 8, 16, 128]
    assert sampling.bucket_length(20, [16, 32, 64]) == 32
    with pytest.raises(ValueError, match="largest prompt bucket"):
        sampling.bucket_length(65, [16, 32, 64])
    right = {"input_ids": np.array([[5, 6, 0], [7, 8, 9]]),
             "attention_mask": np.array([[1, 1, 0], [1, 1, 1]])}
    out = sampling.left_align(right, 4, pad_id=2)
    np.testing.assert_array_equal(out["input_ids"], [[2, 2, 5, 6], [2, 7, 8, 9]])
    np.testing.assert_array_equal(out["attention_mask"], [[0, 0, 1, 1], [0, 1, 1, 1]])


# ---------------------------------------------------------------------------------------------
# generate on the fake model
# ---------------------------------------------------------------------------------------------

def test_greedy_matches_recomputation_and_padding_invariance(fake):
    inputs = _prompts()
    s = sampling.generate(fake, inputs, max_new_tokens=6, temperature=0, eos_token_ids=[-1],
                          rng=jax.random.key(0))
    np.testing.assert_array_equal(s.tokens, _reference_greedy(fake, inputs, 6))
    assert s.truncated.all() and (s.lengths == 6).all()


def test_fixed_rng_reproducible_and_logprobs_match_recompute(fake):
    inputs = _prompts()
    kw = dict(max_new_tokens=8, temperature=0.9, top_p=0.95, top_k=20, eos_token_ids=[3, 4],
              rng=jax.random.key(42))
    a = sampling.generate(fake, inputs, **kw)
    b = sampling.generate(fake, inputs, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    c = sampling.generate(fake, inputs, **{**kw, "rng": jax.random.key(43)})
    assert not np.array_equal(a.tokens, c.tokens)
    lp = sampling.token_logprobs(fake, inputs, a.tokens, a.mask, temperature=0.9)
    np.testing.assert_allclose(lp, a.logprobs, atol=1e-4)
    assert (np.asarray(a.logprobs)[np.asarray(a.mask) == 0] == 0).all()


def test_stop_tokens_lengths_truncation_and_padding(fake):
    inputs = _prompts(lengths=(4, 6, 2, 5))
    g = sampling.generate(fake, inputs, max_new_tokens=8, temperature=0, eos_token_ids=[-1],
                          rng=jax.random.key(0))
    toks = np.asarray(g.tokens)
    # pick as stop tokens the 3rd greedy token of row 0 and the 1st of row 1
    stops = [int(toks[0, 2]), int(toks[1, 0])]
    s = sampling.generate(fake, inputs, max_new_tokens=8, temperature=0, eos_token_ids=stops,
                          rng=jax.random.key(0), pad_id=-7)
    t = np.asarray(s.tokens)
    for r in range(len(t)):
        hits = np.nonzero(np.isin(toks[r], stops))[0]
        n = hits[0] + 1 if len(hits) else 8
        assert s.lengths[r] == n and bool(s.truncated[r]) == (not len(hits))
        np.testing.assert_array_equal(t[r, :n], toks[r, :n])
        assert (t[r, n:] == -7).all() and (np.asarray(s.logprobs)[r, n:] == 0).all()
    assert s.lengths[0] <= 3 and s.lengths[1] == 1


def test_top_k_1_equals_greedy(fake):
    inputs = _prompts()
    g = sampling.generate(fake, inputs, max_new_tokens=5, temperature=0, eos_token_ids=[-1],
                          rng=jax.random.key(0))
    k1 = sampling.generate(fake, inputs, max_new_tokens=5, temperature=1.0, top_k=1,
                           eos_token_ids=[-1], rng=jax.random.key(5))
    np.testing.assert_array_equal(g.tokens, k1.tokens)
    np.testing.assert_allclose(g.logprobs, k1.logprobs, atol=1e-6)


def test_num_samples_share_prefill_equal_repeated_prompts(fake):
    inputs = _prompts()
    kw = dict(max_new_tokens=6, temperature=1.0, eos_token_ids=[3], rng=jax.random.key(9))
    grouped = sampling.generate(fake, inputs, num_samples=3, **kw)
    repeated = {k: np.repeat(v, 3, axis=0) for k, v in inputs.items()}
    separate = sampling.generate(fake, repeated, **kw)
    np.testing.assert_array_equal(grouped.tokens, separate.tokens)
    np.testing.assert_allclose(grouped.logprobs, separate.logprobs, atol=1e-5)
    assert grouped.tokens.shape == (9, 6)
    assert len({tuple(r) for r in np.asarray(grouped.tokens)[:3]}) > 1  # samples differ


@pytest.fixture(scope="module")
def tiny_lm():
    from balcap_jax.models.decoder import CausalLM, DecoderConfig
    cfg = DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3,
                        num_heads=4, num_kv_heads=2, qkv_bias=True)
    return CausalLM(cfg, rngs=nnx.Rngs(0))


def test_one_sample_kept_prompt_equals_one_cache_and_a_full_forward(tiny_lm, monkeypatch):
    """At G = 1 a model that shares_prefix keeps the prompt's cache apart and grows a
    generation cache window by window. It samples the tokens of the one-cache path (prompt +
    max_new_tokens slots, taken when the model reports no prefix support) under the same key,
    with rows that stop early, and its log-probabilities equal a full forward's."""
    inputs = _prompts(rng=3, lengths=(5, 3, 7, 6))
    kw = dict(max_new_tokens=30, temperature=1.0, eos_token_ids=[3, 4], rng=jax.random.key(6))
    kept = sampling.generate(tiny_lm, inputs, **kw)
    with monkeypatch.context() as m:
        m.setattr(sampling, "shares_prefix", lambda model: False)
        one_cache = sampling.generate(tiny_lm, inputs, **kw)
    np.testing.assert_array_equal(kept.tokens, one_cache.tokens)
    np.testing.assert_array_equal(kept.lengths, one_cache.lengths)
    np.testing.assert_allclose(kept.logprobs, one_cache.logprobs, atol=1e-5)
    lengths = np.asarray(kept.lengths)
    assert lengths.min() < 20 and lengths.max() == 30     # one row stops in a later window
    full = sampling.token_logprobs(tiny_lm, inputs, kept.tokens, kept.mask)
    np.testing.assert_allclose(full, kept.logprobs, atol=1e-5)


@pytest.mark.parametrize("every", [3, 8])
def test_early_exit_tested_every_few_steps_gives_the_same_samples(tiny_lm, monkeypatch, every):
    """With the loop's "every row done?" test made every few steps (CPU rows split over
    devices), the samples are those of the per-step test, and the loop still stops early: at
    most every - 1 steps after the last row's stop."""
    inputs = _prompts(rng=4, lengths=(5, 3, 7, 6))
    # rows stop at 10, 4, 17 and 11: across the first window's end (11), all before 30
    kw = dict(max_new_tokens=30, temperature=1.0, eos_token_ids=list(range(3, 10)),
              rng=jax.random.key(1))
    steps = []
    jit = sampling._jit

    def spy(name):
        fn = jit(name)
        if name != "decode":
            return fn

        def run(*a, **k):
            out = fn(*a, **k)
            steps.append(int(out[1].step))
            return out
        return run
    monkeypatch.setattr(sampling, "_jit", spy)
    each = sampling.generate(tiny_lm, inputs, **kw)
    monkeypatch.setattr(sampling, "_done_every", lambda model: every)
    chunked = sampling.generate(tiny_lm, inputs, **kw)
    np.testing.assert_array_equal(each.tokens, chunked.tokens)
    np.testing.assert_array_equal(each.lengths, chunked.lengths)
    np.testing.assert_array_equal(each.logprobs, chunked.logprobs)
    last = int(np.max(each.lengths))
    first_end = sampling._step_windows(sampling._Config(30, 1, 1.0, 0, 1.0, 0, 4))[0][1]
    assert first_end < last < 30 - every, "rows must stop in a later window, all before the end"
    assert steps[0] == last and last <= steps[1] < last + every


def test_done_every_is_8_only_for_cpu_rows_split_over_devices(tiny_lm, monkeypatch):
    from balcap_jax import sharding
    assert sampling._done_every(tiny_lm) == 1
    monkeypatch.setattr(tiny_lm, "mesh", sharding.make_mesh((2, 1, 1), jax.devices()[:2]),
                        raising=False)
    assert sampling._done_every(tiny_lm) == (8 if jax.default_backend() == "cpu" else 1)
    monkeypatch.setattr(tiny_lm, "mesh", sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    assert sampling._done_every(tiny_lm) == 1
    # tensor-parallel only: every device holds every row, the test is no all-reduce
    monkeypatch.setattr(tiny_lm, "mesh", sharding.make_mesh((1, 1, 2), jax.devices()[:2]))
    assert sampling._done_every(tiny_lm) == 1


def test_decode_loop_reads_the_prompt_cache_without_copies(tiny_lm, monkeypatch):
    """The kept prompt cache reaches the decode loop as one buffer per layer: the compiled
    decode holds nothing of the prompt cache's stacked [layers, ...] shape, whose per-layer
    slices XLA would copy out of the stack at every token (it does not hoist them)."""
    lowered, real = [], sampling._jit

    def spy(name):
        f = real(name)
        if name != "decode":
            return f

        def run(*args):
            prefix = inspect.signature(sampling._decode).bind(*args).arguments["prefix"]
            lowered.append((prefix, f.lower(*args).compile().as_text()))
            return f(*args)
        return run
    monkeypatch.setattr(sampling, "_jit", spy)
    sampling.generate(tiny_lm, _prompts(), max_new_tokens=9, temperature=1.0, eos_token_ids=[3],
                      rng=jax.random.key(0), num_samples=2)
    (prefix, hlo), = lowered
    layers = tiny_lm.model.layers.num
    for leaf in (prefix[0].k, prefix[0].v):      # leaf[0]: layer 0's buffer, either layout
        stacked = (layers, *np.shape(leaf[0]))
        assert f"f32[{','.join(map(str, stacked))}]" not in hlo, stacked
    assert prefix[0].is_per_layer and len(prefix[0].k) == layers


@pytest.mark.parametrize("num_samples", [1, 3])
def test_decode_layers_scan_equals_unroll(tiny_lm, num_samples):
    """The decode step over per-layer caches (a Python loop, the default) and over the stacked
    cache (lax.scan) sample the same tokens with the same log-probabilities."""
    kw = dict(max_new_tokens=6, temperature=1.0, eos_token_ids=[3], rng=jax.random.key(4),
              num_samples=num_samples)
    assert tiny_lm.model.decode_layers == "unroll"
    unrolled = sampling.generate(tiny_lm, _prompts(), **kw)
    try:
        tiny_lm.set_decode_layers("scan")
        scanned = sampling.generate(tiny_lm, _prompts(), **kw)
    finally:
        tiny_lm.set_decode_layers("unroll")
    np.testing.assert_array_equal(unrolled.tokens, scanned.tokens)
    np.testing.assert_allclose(unrolled.logprobs, scanned.logprobs, atol=1e-6)
    with pytest.raises(ValueError, match="decode_layers"):
        tiny_lm.set_decode_layers("loop")


def test_cpu_decode_runs_its_matmuls_on_one_thread_on_two_cores(monkeypatch):
    """XLA options per jitted function: on a CPU of at most 2 cores the decode's matmuls run on
    one thread; the decode keeps its reductions whole (no tree-reduction rewrite); YNNPACK
    fusions are off for every CPU executable; other backends get XLA's defaults. XLA accepts
    the options, and `_jit` passes them. Every CPU executable prefers 512-bit vectors."""
    opts = sampling._compiler_options
    ynn_off = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_prefer_vector_width": 512}
    decode = {**ynn_off, "xla_disable_hlo_passes": "tree_reduction_rewriter"}
    assert opts("decode", "gpu", 2) is None and opts("prefill", "tpu", 1) is None
    for cores in (1, 2):
        assert opts("decode", "cpu", cores) == {**decode, "xla_cpu_multi_thread_eigen": False}
    assert opts("decode", "cpu", 3) == opts("decode", "cpu", 64) == decode
    for name in ("prefill", "token_logprobs"):
        assert opts(name, "cpu", 2) == ynn_off
    x = jnp.arange(16.0).reshape(4, 4)
    y = jax.jit(lambda a: a @ a, compiler_options=opts("decode", "cpu", 2))(x)
    np.testing.assert_allclose(y, np.asarray(x) @ np.asarray(x))
    # the pass is named as XLA names it: a max over a vocabulary-sized row compiles to a
    # reduce-window without the option (the prefill's options) and to a plain reduce with it
    logits = jax.ShapeDtypeStruct((16, 8192), jnp.float32)
    default, decode_hlo = (
        jax.jit(lambda a: a.max(-1), compiler_options=o).lower(logits).compile().as_text()
        for o in (opts("prefill", "cpu", 2), opts("decode", "cpu", 2)))
    if jax.default_backend() == "cpu":
        assert "reduce-window" in default and "reduce-window" not in decode_hlo
    seen = {}
    monkeypatch.setattr(sampling, "_cpu_cores", lambda: 2)
    monkeypatch.setattr(sampling.jax, "jit", lambda fn, **kw: seen.setdefault(fn.__name__, kw))
    sampling._jit.__wrapped__("decode")
    sampling._jit.__wrapped__("prefill")
    assert seen["_decode"]["compiler_options"] == opts("decode", "cpu", 2)
    assert seen["_prefill"]["compiler_options"] == ynn_off


@pytest.mark.parametrize("max_new,windows", [(96, 4), (64, 4), (20, 4), (16, 4), (1, 4),
                                             (40, 1)])
def test_step_windows_cover_the_steps_and_their_slots(max_new, windows):
    cfg = sampling._Config(max_new, 1, 1.0, 0, 1.0, 0, windows)
    w = sampling._step_windows(cfg)
    if max_new == 1:
        assert w == []          # the prefill draws the only token
        return
    assert [a for a, _, _ in w] == [1] + [e for _, e, _ in w[:-1]]      # contiguous, in order
    assert w[-1][1] == max_new
    assert len(w) == max(1, min(windows, (max_new - 1) // 8))
    assert all(e - a >= 8 for a, e, _ in w) or len(w) == 1
    # a step s writes and reads slot s - 1: the window's last step reaches its last slot
    assert [slots for _, _, slots in w] == [e - 1 for _, e, _ in w]


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("decode_layers", ["unroll", "scan"])
def test_cache_windows_equal_one_window_and_grow_the_cache(tiny_lm, num_samples, decode_layers,
                                                           monkeypatch):
    """Decoding in windows (a generation cache grown per window, read whole, after the prompt's
    cache kept once) samples the same tokens as one loop over the whole cache, over per-layer
    and stacked caches, with rows that stop inside a window; each window's steps run on a
    cache of exactly the slots that window can reach. That holds with one sample per prompt
    too (nothing shared, the windows alone) and with a shared prompt (num_samples 3)."""
    from balcap_jax.models.decoder import CausalLM
    seen = []
    forward = CausalLM.forward_embeds

    def spy(self, x, positions, kv_mask, cache=None, cache_index=0, prefix=None,
            prefix_mask=None):                               # (the signature shares_prefix reads)
        if cache is not None and x.shape[1] == 1:            # a decode step (traced once)
            seen.append((kv_mask.shape[1], cache.max_len))
        return forward(self, x, positions, kv_mask, cache, cache_index, prefix, prefix_mask)
    monkeypatch.setattr(CausalLM, "forward_embeds", spy)
    inputs = _prompts(lengths=(5, 3, 7))
    kw = dict(max_new_tokens=33 + num_samples, temperature=1.0, eos_token_ids=[3, 4, 5],
              rng=jax.random.key(2), num_samples=num_samples)
    try:
        tiny_lm.set_decode_layers(decode_layers)
        one = sampling.generate(tiny_lm, inputs, cache_windows=1, **kw)
        seen.clear()
        four = sampling.generate(tiny_lm, inputs, cache_windows=4, **kw)
    finally:
        tiny_lm.set_decode_layers("unroll")
    np.testing.assert_array_equal(one.tokens, four.tokens)
    np.testing.assert_allclose(one.logprobs, four.logprobs, atol=1e-5)
    np.testing.assert_array_equal(one.lengths, four.lengths)
    lengths = np.asarray(four.lengths)
    assert lengths.min() < kw["max_new_tokens"] - 8 and lengths.max() > 9   # stops mid-way
    cfg = sampling._Config(kw["max_new_tokens"], num_samples, 1.0, 0, 1.0, 0, 4)
    want = [(slots, slots) for _, _, slots in sampling._step_windows(cfg)]
    assert len(want) == 4
    assert seen == want
    with pytest.raises(ValueError, match="cache_windows"):
        sampling.generate(tiny_lm, inputs, cache_windows=0, **kw)


def test_compiles_bounded_by_buckets(fake):
    kw = dict(max_new_tokens=4, temperature=1.0, eos_token_ids=[3], rng=jax.random.key(1))
    sampling.generate(fake, _prompts(lengths=(9, 10, 11)), **kw)
    before = sampling.compile_count()
    for lengths in [(12, 9, 16), (13, 14, 10)]:  # all in the 16 bucket
        sampling.generate(fake, _prompts(lengths=lengths), **kw)
    # a trainer re-merges the model with new parameters every step: no retrace either
    graphdef, params, rest = nnx.split(fake, nnx.Param, ...)
    updated = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.01, params), rest)
    sampling.generate(updated, _prompts(lengths=(12, 9, 16)),
                      **{**kw, "eos_token_ids": [4]})  # other stop id, same count
    assert sampling.compile_count() == before
    sampling.generate(fake, _prompts(lengths=(17, 3, 5)), **kw)  # the 32 bucket
    assert sampling.compile_count() == before + 2  # one prefill + one decode


@pytest.mark.heavy
def test_token_logprobs_is_differentiable(fake):
    inputs = _prompts()
    comp = np.array([[5, 6, 7], [8, 9, 3], [10, 11, 12]])
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    batch = sampling.prepare_logprob_batch(fake, inputs, comp, mask)
    graphdef, params = nnx.split(fake)

    def loss(p):
        return -sampling.token_logprobs_fn(nnx.merge(graphdef, p), batch, temperature=1.0).sum()

    grads = jax.grad(loss)(params)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and all(n > 0 for n in norms)


# ---------------------------------------------------------------------------------------------
# parity with transformers' greedy generate (tiny random models, float32)
# ---------------------------------------------------------------------------------------------

TIE_GAP = 1e-4   # compare tokens only before the first step whose HF top-2 logits are this close
LP_ATOL = 1e-4   # float32 log-probabilities


def _hf_greedy(hf, inputs, steps, eos, pad, suppress=()):
    """transformers' greedy generate -> (tokens [B, steps] padded with pad, logits [B, S, V]).
    `suppress`: ids transformers' suppress_tokens processor masks, as our sampler masks a
    policy's vision tokens (their logits come back as -inf)."""
    import torch
    kw = {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}
    extra = {"suppress_tokens": list(suppress)} if suppress else {}
    with torch.no_grad():
        out = hf.generate(**kw, max_new_tokens=steps, do_sample=False, eos_token_id=eos,
                          pad_token_id=pad, output_logits=True, return_dict_in_generate=True,
                          **extra)
    t = inputs["input_ids"].shape[1]
    toks = out.sequences[:, t:].numpy()
    toks = np.pad(toks, ((0, 0), (0, steps - toks.shape[1])), constant_values=pad)
    logits = torch.stack(out.logits, 1).float().numpy()
    if suppress:
        logits[..., list(suppress)] = -np.inf
    return toks, logits


def _compare_greedy(ours_samples, hf_toks, hf_logits, eos):
    """Tokens equal up to the first near-tie; greedy log-probs equal log_softmax(HF logits)."""
    toks = np.asarray(ours_samples.tokens)
    lps = np.asarray(ours_samples.logprobs)
    compared, max_lp_err = 0, 0.0
    for r in range(toks.shape[0]):
        top2 = np.sort(hf_logits[r], axis=-1)[:, -2:]
        ties = np.nonzero(top2[:, 1] - top2[:, 0] < TIE_GAP)[0]
        upto = ties[0] if len(ties) else hf_toks.shape[1]
        np.testing.assert_array_equal(toks[r, :upto], hf_toks[r, :upto], err_msg=f"row {r}")
        stop = np.nonzero(np.isin(hf_toks[r, :upto], eos))[0]
        live = min(upto, stop[0] + 1 if len(stop) else upto, hf_logits.shape[1])
        ref = jax.nn.log_softmax(hf_logits[r, :live], -1)[np.arange(live), hf_toks[r, :live]]
        max_lp_err = max(max_lp_err, float(np.abs(lps[r, :live] - np.asarray(ref)).max(initial=0)))
        compared += upto
    assert max_lp_err < LP_ATOL, max_lp_err
    return compared, max_lp_err


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    from balcap_jax.models import from_pretrained
    from tests.models.conftest import CONFIGS, build_hf
    hf = build_hf(*CONFIGS["qwen2_gqa"])
    d = tmp_path_factory.mktemp("qwen2_sampling")
    hf.save_pretrained(d)
    return hf, from_pretrained(str(d))


@pytest.mark.heavy
def test_greedy_equals_transformers_text(text_pair):
    hf, ours = text_pair
    inputs = _prompts(lengths=(9, 4, 12, 6), vocab=160)
    steps, eos = 12, [2, 7]
    _check_greedy_parity(hf, ours, inputs, steps, eos)


def _check_greedy_parity(hf, ours, inputs, steps, eos, suppress=()):
    """Our greedy tokens equal transformers' (up to near ties), and the recomputed
    log-probabilities of the greedy completion equal the sampler's."""
    hf_toks, hf_logits = _hf_greedy(hf, inputs, steps, eos, pad=0, suppress=suppress)
    s = sampling.generate(ours, inputs, max_new_tokens=steps, temperature=0, eos_token_ids=eos,
                          rng=jax.random.key(0), pad_id=0)
    compared, err = _compare_greedy(s, hf_toks, hf_logits, eos)
    assert compared >= 0.75 * hf_toks.size
    lp = sampling.token_logprobs(ours, inputs, s.tokens, s.mask, temperature=0)
    np.testing.assert_allclose(lp, s.logprobs, atol=LP_ATOL)


@pytest.fixture(scope="module")
def vl_pair(tmp_path_factory):
    from tests.models import qwen_vl_fixtures as F
    hf, ours, path = F.hf_and_ours("win56_full1", tmp_path_factory.mktemp("qwen25vl_sampling"))
    return hf, ours, path


def _vl_batch():
    from tests.models import qwen_vl_fixtures as F
    # left padded; row 0: one 4x6 image, row 1: 6x10 and 4x4 images, row 2: text only
    return F.make_batch(F.MIXED_ROWS)


@pytest.mark.heavy
def test_greedy_equals_transformers_qwen2_5_vl(vl_pair):
    hf, ours, _ = vl_pair
    inputs = _vl_batch()   # includes mm_token_type_ids: v5 needs it for 3-D M-RoPE positions
    steps, eos = 10, [2]
    # transformers masks the vision tokens our sampler never samples (suppress_tokens)
    _check_greedy_parity(hf, ours, inputs, steps, eos, suppress=ours.vision_token_ids)


def _repeat_vl(batch, g):
    """Each prompt (and its images) repeated g times, prompt-major: G separate prefills."""
    grid = batch["image_grid_thw"]
    per_image = np.split(batch["pixel_values"], np.cumsum([t * h * w for t, h, w in grid])[:-1])
    images_per_row = [int((np.diff(np.r_[0, mm == 1].astype(int)) == 1).sum())  # image-token runs
                      for mm in batch["mm_token_type_ids"]]
    first = np.cumsum([0] + images_per_row)
    pix, grids = [], []
    for r, n in enumerate(images_per_row):
        for _ in range(g):
            pix += per_image[first[r]:first[r] + n]
            grids += list(grid[first[r]:first[r] + n])
    out = {k: np.repeat(batch[k], g, axis=0)
           for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out["pixel_values"], out["image_grid_thw"] = np.concatenate(pix), np.asarray(grids)
    return out


@pytest.mark.heavy
def test_vl_num_samples_share_prefill_equal_repeated_prompts(vl_pair):
    _, ours, _ = vl_pair
    inputs = _vl_batch()
    kw = dict(max_new_tokens=18, temperature=1.0, top_p=0.9, eos_token_ids=[2],
              rng=jax.random.key(3))
    grouped = sampling.generate(ours, inputs, num_samples=2, **kw)   # two cache windows
    separate = sampling.generate(ours, _repeat_vl(inputs, 2), cache_windows=1, **kw)
    np.testing.assert_array_equal(grouped.tokens, separate.tokens)
    np.testing.assert_allclose(grouped.logprobs, separate.logprobs, atol=LP_ATOL)
    lp = sampling.token_logprobs(ours, _repeat_vl(inputs, 2), grouped.tokens, grouped.mask,
                                 temperature=1.0)
    np.testing.assert_allclose(lp, grouped.logprobs, atol=LP_ATOL)


def _same_rollouts(ours, sharded, inputs, kw):
    """Rollouts of the unsharded model and of its 8-device copy: equal tokens and log-probs."""
    a = sampling.generate(ours, inputs, **kw)
    b = sampling.generate(sharded, inputs, **kw)
    assert len(b.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=LP_ATOL)
    return a, b


@pytest.mark.heavy
def test_sharded_on_8_devices_equals_unsharded(text_pair, tmp_path):
    from balcap_jax import sharding
    from balcap_jax.models import from_pretrained, save_pretrained
    _, ours = text_pair
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
    save_pretrained(ours, str(tmp_path))
    mesh = sharding.make_mesh((2, 2, 2))
    sharded = from_pretrained(str(tmp_path), mesh=mesh)
    inputs = _prompts(lengths=(9, 4, 12, 6), vocab=160)
    kw = dict(max_new_tokens=25, num_samples=2, temperature=1.0, top_k=50, eos_token_ids=[2],
              rng=jax.random.key(11))      # 25 tokens: three cache windows, grown sharded
    a, b = _same_rollouts(ours, sharded, inputs, kw)
    lp = sampling.token_logprobs(sharded, {k: np.repeat(v, 2, 0) for k, v in inputs.items()},
                                 b.tokens, b.mask, temperature=1.0)
    np.testing.assert_allclose(lp, a.logprobs, atol=LP_ATOL)


@pytest.mark.heavy
def test_vl_sharded_on_8_devices_equals_unsharded(vl_pair):
    from balcap_jax import sharding
    from balcap_jax.models import from_pretrained
    from tests.models import qwen_vl_fixtures as F
    _, ours, path = vl_pair
    sharded = from_pretrained(path, mesh=sharding.make_mesh((2, 2, 2)))
    inputs = F.make_batch(F.MIXED_ROWS + [[1, (1, 4, 4), 30, 31]])   # 4 prompts: batch divides 4
    kw = dict(max_new_tokens=6, num_samples=2, temperature=1.0, eos_token_ids=[2],
              rng=jax.random.key(5))
    _same_rollouts(ours, sharded, inputs, kw)


# ---------------------------------------------------------------------------------------------
# vision special tokens are never sampled
# ---------------------------------------------------------------------------------------------

VISION_IDS = (5, 6, 7, 8)


class VisionBiasedLM(FakeLM):
    """A policy whose head strongly prefers four "vision" tokens (+8 on their logits)."""

    def __init__(self, masked: bool):
        super().__init__()
        self.masked = masked

    @property
    def vision_token_ids(self):
        return VISION_IDS if self.masked else ()

    def logits(self, hidden):
        bias = jnp.zeros(self.head.shape[-1]).at[np.asarray(VISION_IDS)].set(8.0)
        return super().logits(hidden) + bias


def test_vision_tokens_are_never_sampled_and_logprobs_agree():
    """Unmasked, the biased policy samples its vision tokens most of the time; with
    vision_token_ids set, neither sampling nor greedy decoding ever emits one, and the loss's
    log-probabilities are those of the distribution sampled from (the same mask)."""
    inputs = _prompts(lengths=(5, 3, 7, 6))
    kw = dict(max_new_tokens=12, num_samples=4, temperature=1.0, eos_token_ids=[-1],
              rng=jax.random.key(0))
    free = sampling.generate(VisionBiasedLM(masked=False), inputs, **kw)
    assert np.isin(np.asarray(free.tokens), VISION_IDS).mean() > 0.5
    model = VisionBiasedLM(masked=True)
    for temperature in (1.0, 0.0):
        s = sampling.generate(model, inputs, **{**kw, "temperature": temperature})
        assert not np.isin(np.asarray(s.tokens), VISION_IDS).any()
        rows = {k: np.repeat(v, 4, axis=0) for k, v in inputs.items()}
        lp = sampling.token_logprobs(model, rows, s.tokens, s.mask, temperature=temperature)
        np.testing.assert_allclose(lp, s.logprobs, atol=1e-5)


def test_policies_name_their_vision_tokens(vl_pair):
    """Qwen2.5-VL: image pad, video pad, vision start, vision end (from its config)."""
    from tests.models import qwen_vl_fixtures as F
    _, ours, _ = vl_pair
    assert ours.vision_token_ids == (F.IMG, F.VID, F.VSTART, F.VEND)
