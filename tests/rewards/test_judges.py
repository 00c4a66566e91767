"""In-process judges on tiny random models: the prefix-tree forward equals one forward pass over
the concatenated prompt (float32, atol 1e-5 on probabilities / 1e-4 on E), bucket padding and
chunking do not change answers, compiles are bounded, the vision tower runs once per image,
and decompose parses generated JSON lists."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from balcap_jax.models.decoder import CausalLM, DecoderConfig
from balcap_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl_vision import VisionConfig
from balcap_jax.processing import Qwen25VLProcessor, QwenImageProcessor, pad_batch
from balcap_jax.rewards import judges as J
from balcap_jax.rewards import prompts as P
from balcap_jax.rewards.balcap import BalCapScorer, Query
from balcap_jax.rewards.parsing import digit_expectation, yes_probability
from balcap_jax.tokenizers import train_tiny_bpe

CORPUS = [p.shared + p.item for p in P.PROMPTS.values()] + [
    "yes no Yes No yes. No. " * 40, "A red car is parked by a tree. The sky is blue. " * 5,
    '["A red car.", "A tree."] ' * 10]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_bpe(CORPUS, vocab_size=420)


def _random_model(build, seed):
    """build() with weights ~ N(0, 0.2) (norm scales 1 + N(0, 0.2)) so logits are far from
    flat. Built abstractly and filled from numpy: eager initialisation compiles one tiny program
    per parameter, which takes tens of seconds on a busy CPU."""
    model = nnx.eval_shape(build)
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten_with_path(state)
    new = []
    for path, x in leaves:
        noise = 0.2 * rng.standard_normal(x.shape).astype(np.float32)
        name = jax.tree_util.keystr(path)
        new.append(jnp.asarray(1.0 + noise if "norm" in name or "ln_q" in name else noise,
                               x.dtype))
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def _text_cfg(vocab, mrope=None):
    return DecoderConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, qkv_bias=True, mrope_section=mrope)


@pytest.fixture(scope="module")
def text_judge(tokenizer):
    model = _random_model(lambda: CausalLM(_text_cfg(len(tokenizer)), rngs=nnx.Rngs(0)), 1)
    return J.InProcessBackend(model, tokenizer, name="tiny-text", prefix_batch=2,
                              list_max_tokens=12, decode_batch=2)


@pytest.fixture(scope="module")
def vl_judge(tokenizer):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    cfg = Qwen2_5_VLConfig(
        text=_text_cfg(len(tokenizer), mrope=(2, 3, 3)),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                            out_hidden_size=64, window_size=56, fullatt_block_indexes=(1,)),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = _random_model(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)), 2)
    proc = Qwen25VLProcessor(tokenizer, QwenImageProcessor(min_pixels=56 * 56,
                                                          max_pixels=56 * 56 * 2))
    return J.InProcessBackend(model, tokenizer, name="tiny-vl", processor=proc, prefix_batch=2)


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (56, 56, 3), np.uint8),
            rng.integers(0, 255, (84, 56, 3), np.uint8),
            rng.integers(0, 255, (56, 84, 3), np.uint8)]


def _reference(judge, queries, reader):
    """Plain forwards over head + shared + item tokens (tokenized as the judge does), all
    queries in one left-padded batch -> answers [Q]."""
    rows, pixels, grids = [], [], []
    for q in queries:
        head, tail = judge._head_tail(q.image is not None)
        rest = judge._tok(q.shared) + judge._tok(q.item + tail)
        if q.image is None:
            rows.append(judge._tok(head) + rest)
        else:
            enc = judge.processor([head], images=[q.image])
            rows.append(list(enc["input_ids"][0]) + rest)
            pixels.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
    ids, mask = pad_batch(rows, judge.pad_id, padding_side="left")
    kw = {}
    if pixels:
        kw = dict(pixel_values=np.concatenate(pixels), image_grid_thw=np.concatenate(grids))
    last = judge.model(input_ids=ids, attention_mask=mask, **kw)[:, -1]
    if reader == "yes_no":
        return np.asarray(yes_probability(last, judge.yes_ids, judge.no_ids))
    return np.asarray(digit_expectation(last, np.asarray(judge.digit_ids)))


def _text_queries():
    caps = ["A red car.", "A red car is parked by a tree. The sky is blue."]
    units = ["There is a car.", "The sky is blue.", "A tree.", "The car is red and parked.",
             "Blue."]
    return [Query(*P.render("coverage", caption=c, unit=u)) for c in caps for u in units]


@pytest.mark.heavy
def test_text_yes_no_equals_full_forward(text_judge):
    qs = _text_queries()
    text_judge.stats.clear()
    answers = text_judge.yes_no(qs)
    got = np.asarray([a.value for a in answers])
    want = _reference(text_judge, qs, "yes_no")
    assert all(a.error is None for a in answers)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.ptp(want) > 1e-3                          # the queries are told apart
    # 1 text head (padded to 2 rows), 2 shared prefixes (one per caption, nothing in common
    # to split off: no second level), each caption's 5 items packed into one row of their own
    # read against that caption's row: one pass of 2 rows
    assert text_judge.stats["head_rows"] == 2 and text_judge.stats["prefix_rows"] == 2
    assert text_judge.stats["shared_rows"] == 0
    assert text_judge.stats["item_rows"] == 2


@pytest.mark.heavy
def test_items_spread_over_passes_when_a_row_is_full(text_judge):
    """With room for two items a row, each caption's 5 items take 3 passes (longest first);
    the answers do not change."""
    qs = _text_queries()
    want = [a.value for a in text_judge.yes_no(qs)]
    tail = text_judge._head_tail(False)[1]
    longest = max(len(text_judge._tok(q.item + tail)) for q in qs)
    text_judge.item_tokens, text_judge.stats = 2 * longest, J.collections.Counter()
    try:
        got = [a.value for a in text_judge.yes_no(qs)]
    finally:
        text_judge.item_tokens = 256
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert text_judge.stats["item_rows"] == 2 * 3


def _copies_of(jaxpr, shapes) -> list[str]:
    """Gathers, dynamic slices and concatenations in a jaxpr (nested ones too) that take an
    operand of one of `shapes`."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("gather", "dynamic_slice", "concatenate"):
            found += [eqn.primitive.name for v in eqn.invars
                      if tuple(getattr(v.aval, "shape", ())) in shapes]
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    found += _copies_of(getattr(inner, "jaxpr", inner), shapes)
    return found


def test_items_read_their_row_in_place(text_judge):
    """The item pass reads its rows' cache in place: no gather, dynamic slice or concatenate in
    its program takes an operand of a cache layer's shape, where the inner levels' extension
    (a row per node, gathered from its parent) has them."""
    graphdef, state = nnx.split(text_judge.model)
    cache = text_judge.model.init_cache(2, 64)
    kv_mask, pos = jnp.ones((2, 64), jnp.int32), jnp.full((2,), 64, jnp.int32)
    ids = jnp.zeros((2, 16), jnp.int32)
    shapes = {tuple(x.shape[i:]) for x in (cache.k, cache.v) for i in (0, 1)}
    read = jax.make_jaxpr(J._read.__wrapped__, static_argnums=(0, 9, 10, 11, 12, 13))(
        graphdef, state, cache, kv_mask, pos, ids, ids, ids, jnp.zeros((2, 4), jnp.int32),
        False, ("yes_no",), text_judge.yes_ids, text_judge.no_ids, text_judge.digit_ids)
    assert _copies_of(read.jaxpr, shapes) == []
    extend = jax.make_jaxpr(J._extend.__wrapped__, static_argnums=(0, 9))(
        graphdef, state, cache, kv_mask, pos, jnp.zeros((2,), jnp.int32), ids,
        jnp.ones((2,), jnp.int32), jnp.int32(0), False)
    assert "gather" in _copies_of(extend.jaxpr, shapes)      # the check can see a copy


@pytest.mark.heavy
def test_text_digits_equal_full_forward(text_judge):
    qs = [Query(*P.render(c, caption=cap)) for cap in ("A red car.", "The sky is blue, blue.")
          for c in P.LINGUISTIC_CRITERIA]
    got = np.asarray([a.value for a in text_judge.digits(qs)])
    want = _reference(text_judge, qs, "digits")
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert ((got >= 1) & (got <= 5)).all()


@pytest.mark.heavy
def test_coverage_and_linguistic_share_the_caption_node(text_judge):
    """Coverage (yes/no) and linguistic (digits) queries of the same captions in ONE tree:
    each caption's two prompts extend one common-prefix node holding the caption, and every
    answer still equals the full forward of that query's own tokens."""
    caps = ["A red car is parked by a tree.", "The sky is blue over the small green house."]
    cov = [Query(*P.render("coverage", caption=c, unit=u)) for c in caps
           for u in ("There is a car.", "The sky is blue.")]
    lin = [Query(*P.render(k, caption=c)) for c in caps for k in P.LINGUISTIC_CRITERIA]
    text_judge.stats.clear()
    text_judge.min_common_prefix = 8        # short test captions still share their node
    try:
        a_cov, a_lin = text_judge.answer_groups([("yes_no", cov), ("digits", lin)])
        seqs = [tuple(text_judge._tok(q.shared)) for q in (cov[0], lin[0], cov[2], lin[3])]
        cut = text_judge._prefix_groups(seqs)
    finally:
        text_judge.min_common_prefix = 64
    np.testing.assert_allclose([a.value for a in a_cov], _reference(text_judge, cov, "yes_no"),
                               atol=1e-5)
    np.testing.assert_allclose([a.value for a in a_lin], _reference(text_judge, lin, "digits"),
                               atol=1e-4)
    # 4 shared texts (2 captions x 2 prompts) under 2 prefix nodes, each holding its caption
    assert cut[0] == cut[1] and cut[2] == cut[3] and len(set(cut)) <= 2
    for c, k in zip(caps, (cut[0], cut[2])):
        assert k >= len(text_judge._tok(f"Here is a caption of an image:\n\n{c}")) - 1
    assert text_judge.stats["prefix_rows"] == 2 and text_judge.stats["shared_rows"] == 4


def test_buckets_bound_compiles_and_order_is_kept(text_judge):
    qs = _text_queries()
    first = [a.value for a in text_judge.yes_no(qs)]
    before = J.compile_count()
    # fewer items, same buckets (rows padded to 4, lengths to powers of two): no new compile
    sub = [qs[1], qs[7], qs[3]]
    again = [a.value for a in text_judge.yes_no(sub)]
    assert J.compile_count() == before
    np.testing.assert_allclose(again, [first[1], first[7], first[3]], atol=1e-6)


@pytest.mark.heavy
def test_vl_yes_no_shares_the_image_prefix(vl_judge):
    images = _images()
    asserts = ["A red car.", "The sky is blue.", "A tree is parked."]
    qs = [Query(*P.render(role, assertion=a), image=im) for im in images
          for role in ("verify", "pointable") for a in asserts]
    vl_judge.stats.clear()
    answers = vl_judge.yes_no(qs)
    got = np.asarray([a.value for a in answers])
    want = _reference(vl_judge, qs, "yes_no")
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the vision tower ran once per image for 18 questions; heads in chunks of 2 (the last
    # padded with a text-only head); 6 (image, instruction) prefixes
    assert vl_judge.stats["images_encoded"] == 3 and vl_judge.stats["head_rows"] == 4
    assert vl_judge.stats["prefix_rows"] == 6 and vl_judge.stats["shared_rows"] == 0


@pytest.mark.heavy
def test_vl_unshared_baseline_gives_the_same_answers(vl_judge):
    """share_prefix=False (every question a full prompt, the image encoded per question) is the
    benchmark baseline: same answers, one vision-tower run per question."""
    images = _images()[:2]
    qs = [Query(*P.render(role, assertion=a), image=im) for im in images
          for role in ("verify", "pointable") for a in ("A red car.", "A tree.")]
    shared = [a.value for a in vl_judge.yes_no(qs)]
    base = J.InProcessBackend(vl_judge.model, vl_judge.tokenizer, name="tiny-vl",
                              processor=vl_judge.processor, item_batch=8, share_prefix=False)
    np.testing.assert_allclose([a.value for a in base.yes_no(qs)], shared, atol=1e-5)
    assert base.stats["images_encoded"] == len(qs) and base.stats["full_rows"] == 8


@pytest.mark.heavy
def test_vl_judge_text_queries_use_mrope_text_positions(vl_judge):
    qs = _text_queries()[:3]
    got = np.asarray([a.value for a in vl_judge.yes_no(qs)])
    want = _reference(vl_judge, qs, "yes_no")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_decode_lists_parses_generated_json(tokenizer):
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    good = tokenizer.encode('["A red car.", "A tree."]', add_special_tokens=False) + [stop]
    cut = tokenizer.encode('["A red car.", "A tr', add_special_tokens=False)
    junk = tokenizer.encode("no list here", add_special_tokens=False) + [stop]
    width = max(map(len, (good, cut, junk)))
    toks = np.zeros((3, width), np.int32)
    for r, t in enumerate((good, cut, junk)):
        toks[r, :len(t)] = t
    out = J.decode_lists(tokenizer, toks, np.asarray([len(good), len(cut), len(junk)]),
                         np.asarray([False, True, False]), (stop,))
    assert out[0].value == ["A red car.", "A tree."] and out[0].error is None
    assert out[1] == (None, "truncated_list")
    assert out[2] == (None, "no_list")


@pytest.mark.heavy
def test_decompose_runs_greedy_generation(text_judge, monkeypatch):
    qs = [Query(*P.render("decompose_caption", caption=c)) for c in ("A car.", "A tree.", "X")]
    text_judge.stats.clear()
    answers = text_judge.decompose(qs)
    assert len(answers) == 3
    # a random judge rarely writes a JSON list: each answer is a list or a parse reason
    for a in answers:
        assert (a.error is None and isinstance(a.value, list)) or a.error in {
            "no_list", "truncated_list", "bad_json", "bad_items", "empty_output"}
    assert text_judge.stats["decompose_rows"] == 2 + 2    # chunks of 2, the last one padded
    # one decode batch (decode_batch 4: 3 rows padded to 4) generates the same greedy tokens
    seen = []

    def record(tok, toks, lens, cut, stop):
        seen.append([list(r[:n]) for r, n in zip(np.asarray(toks), np.asarray(lens))])
        return J.decode_lists.__wrapped__(tok, toks, lens, cut, stop)
    record.__wrapped__ = J.decode_lists
    monkeypatch.setattr(J, "decode_lists", record)
    text_judge.decompose(qs)
    chunked = [r for rows in seen for r in rows]
    seen.clear()
    text_judge.decode_batch = 4
    try:
        text_judge.stats.clear()
        assert text_judge.decompose(qs) == answers
        assert text_judge.stats["decompose_rows"] == 4 and len(seen) == 1
    finally:
        text_judge.decode_batch = 2
    assert seen[0] == chunked and sum(map(len, chunked)) > 3      # tokens, not just verdicts


@pytest.mark.heavy
def test_scorer_runs_end_to_end_on_in_process_judges(vl_judge, text_judge):
    img = _images()[0]
    res = BalCapScorer(vl_judge, text_backend=text_judge)(
        images=[img, img], captions=["A red car.", ""], references=[["A red car."]] * 2)
    for name in ("precision", "recall", "linguistic"):
        r = res.rewards[name]
        assert r.shape == (2,) and r[1] == 0.0          # empty caption: caption-side zero
        assert np.isnan(r[0]) or 0.0 <= r[0] <= 1.0
    assert 0.0 <= res.rewards["linguistic"][0] <= 1.0    # digits never fail in-process
    # coverage and linguistic in one tree (answer_groups) = one call per role
    class PerRole:
        name = text_judge.name
        decompose, yes_no, digits = text_judge.decompose, text_judge.yes_no, text_judge.digits
    from balcap_jax.rewards.balcap import ReferenceUnitCache
    caps, ref = ["A red car.", "A red car is by a tree."], "A red car by a tree."
    version = P.get_prompt("decompose_reference").version
    results = []
    for backend in (text_judge, PerRole()):
        scorer = BalCapScorer(vl_judge, text_backend=backend, rewards=("recall", "linguistic"))
        # units known (a random judge rarely writes a list), so coverage queries exist
        scorer.cache.put([(ReferenceUnitCache.key(ref, text_judge.name, version),
                           ["There is a car.", "The car is red.", "A tree."],
                           text_judge.name, version, ref)])
        results.append(scorer(images=[img, img], captions=caps, references=[[ref]] * 2))
    one, two = results
    assert "time_s/coverage_linguistic" in one.diagnostics and np.isfinite(
        one.rewards["recall"]).all()
    assert "time_s/coverage" in two.diagnostics
    for k in ("recall", "linguistic"):
        np.testing.assert_allclose(one.rewards[k], two.rewards[k], atol=1e-5)


def test_image_query_needs_a_processor(text_judge):
    img = _images()[0]
    with pytest.raises(ValueError, match="processor"):
        text_judge.yes_no([Query("Is it? ", "Assertion: x", image=img)])


@pytest.fixture(scope="module")
def saved_text_judge(text_judge, tokenizer, tmp_path_factory):
    from balcap_jax.models import save_pretrained
    path = tmp_path_factory.mktemp("judges") / "tiny-judge"
    save_pretrained(text_judge.model, str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.mark.heavy
def test_load_backend_from_a_saved_checkpoint(text_judge, saved_text_judge, tmp_path):
    loaded = J.load_backend(saved_text_judge, dtype="float32", prefix_batch=2)
    assert loaded.name == "tiny-judge" and loaded.processor is None
    # the same weights ...
    ids = np.arange(1, 40, dtype=np.int32)[None]
    np.testing.assert_allclose(loaded.model(input_ids=ids), text_judge.model(input_ids=ids),
                               atol=1e-5)
    # ... and a working judge (transformers loads the tokenizer as Qwen2's, whose pre-tokenizer
    # splits " 1" into two tokens, so the answer ids may differ from the fixture's)
    assert loaded.yes_ids and len(loaded.digit_ids) == 5
    qs = _text_queries()[:4]
    np.testing.assert_allclose([a.value for a in loaded.yes_no(qs)],
                               _reference(loaded, qs, "yes_no"), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="local Hugging Face checkpoint"):
        J.load_backend(str(tmp_path / "missing"))


@pytest.mark.heavy
def test_sharded_judge_equals_single_device(saved_text_judge):
    """The judge on its own (data, fsdp, tensor) = (2, 2, 2) mesh of the 8 fake CPU devices
    gives the same answers (float32, atol 1e-5)."""
    from jax.sharding import AxisType
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3)
    single = J.load_backend(saved_text_judge, dtype="float32", prefix_batch=2, item_tokens=64)
    sharded = J.load_backend(saved_text_judge, dtype="float32", mesh=mesh, prefix_batch=2,
                             item_tokens=64)
    qs = _text_queries()
    np.testing.assert_allclose([a.value for a in sharded.yes_no(qs)],
                               [a.value for a in single.yes_no(qs)], atol=1e-5)


QWEN25_TEXT_TEMPLATE = (   # the shape of Qwen2.5-Instruct's template: content rendered as is
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_prompt_segments_from_the_chat_template(tokenizer):
    judge = J.InProcessBackend(None, tokenizer, name="t", chat_template=QWEN25_TEXT_TEMPLATE)
    head, tail = judge._head_tail(False)
    assert head == "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n"
    assert tail == "<|im_end|>\n<|im_start|>assistant\n"
    vl = J.InProcessBackend(None, tokenizer, name="v", system_prompt="Judge.")
    head, tail = vl._head_tail(True)
    assert head == ("<|im_start|>system\nJudge.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>")
    assert tail == "<|im_end|>\n<|im_start|>assistant\n"
    # answer ids: single-token spellings only, digits padded with -1
    assert len(judge.yes_ids) >= 1 and len(judge.digit_ids) == 5
    assert all(len(d) == len(judge.digit_ids[0]) for d in judge.digit_ids)


@pytest.mark.heavy
def test_judges_on_devices_of_their_own(saved_text_judge, tmp_path):
    """judges.devices=2: the policy's mesh takes the first 6 of the 8 devices, the judge's
    weights live only on the last 2, and its answers equal a single-device judge's."""
    from flax import nnx

    from balcap_jax import build
    from balcap_jax.config import base_config, validate
    cfg = base_config()
    cfg.workdir = str(tmp_path)
    cfg.model.preset = "qwen2_5_vl_3b"
    cfg.scorer.name = "judges"
    cfg.judges.multimodal_path = saved_text_judge
    cfg.judges.dtype = "float32"
    cfg.judges.devices = 2
    cfg.judges.prefix_batch, cfg.judges.item_tokens = 2, 64
    cfg.train.batch_size, cfg.train.micro_batch_size = 6, 6
    sizes = validate(cfg, jax.device_count())
    assert sizes == {"data": 1, "fsdp": 6, "tensor": 1}
    mesh, rules = build.mesh_and_rules(cfg, sizes)
    judge_mesh = build.judge_mesh(cfg, mesh)
    own = set(jax.devices()[-2:])
    assert set(judge_mesh.devices.flat) == own and not own & set(mesh.devices.flat)
    scorer = build.build_scorer(cfg, None, mesh=judge_mesh, rules=rules)
    leaves = jax.tree.leaves(nnx.state(scorer.backend.model))
    assert leaves and all(set(x.sharding.device_set) <= own for x in leaves)
    single = J.load_backend(saved_text_judge, dtype="float32", prefix_batch=2, item_tokens=64)
    qs = _text_queries()
    np.testing.assert_allclose([a.value for a in scorer.backend.yes_no(qs)],
                               [a.value for a in single.yes_no(qs)], atol=1e-5)


@pytest.mark.heavy
def test_judge_on_a_lora_policys_base_loads_no_second_copy(saved_text_judge, tmp_path,
                                                          monkeypatch):
    """judges.multimodal_path == model.path with a LoRA policy: the judge runs on the policy's
    frozen base arrays themselves (adapters off, trained adapters notwithstanding), loads
    nothing, and answers as a separately loaded judge does (float32, atol 1e-5)."""
    from flax import nnx

    from balcap_jax import build
    from balcap_jax.config import base_config
    from balcap_jax.models import from_pretrained, lora
    cfg = base_config()
    cfg.workdir = str(tmp_path)
    cfg.model.path = cfg.judges.multimodal_path = saved_text_judge
    cfg.model.lora.rank = 4
    cfg.scorer.name = "judges"
    cfg.judges.dtype = "float32"
    cfg.judges.prefix_batch, cfg.judges.item_tokens = 2, 64
    policy = from_pretrained(saved_text_judge)
    lora.apply_lora(policy, rank=4, alpha=8)
    for _, node in lora.adapted(policy):           # trained adapters: they must stay off
        node.lora_b.set_value(node.lora_b.get_value() + 0.1)
    single = J.load_backend(saved_text_judge, dtype="float32", prefix_batch=2, item_tokens=64)
    monkeypatch.setattr("balcap_jax.models.from_pretrained",
                        lambda *a, **k: pytest.fail("the shared judge loaded a second copy"))
    scorer = build.build_scorer(cfg, None, policy=policy)
    judge = scorer.backend.model
    assert not lora.has_lora(judge)
    base = {id(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(policy, nnx.Param))}
    assert all(id(v.get_value()) in base
               for _, v in nnx.to_flat_state(nnx.state(judge, nnx.Param)))
    qs = _text_queries()
    np.testing.assert_allclose([a.value for a in scorer.backend.yes_no(qs)],
                               [a.value for a in single.yes_no(qs)], atol=1e-5)
