"""In-process judges on our own models: the backend protocol of balcap.py, jitted.

    judge = InProcessBackend(model, tokenizer, name="Qwen2.5-VL-7B-Instruct",
                             processor=Qwen25VLProcessor(tokenizer))      # multimodal roles
    text = InProcessBackend(text_model, text_tokenizer, name="Qwen2.5-7B-Instruct")
    scorer = BalCapScorer(judge, text_backend=text, cache_dir=...)

The judge keeps its own parameters (and mesh); the policy never shares weights with it.

decompose: greedy generation with balcap_jax.sampling.generate, the text parsed by
    parsing.parse_json_list (a list cut off at `list_max_tokens` is "truncated_list"); a call's
    queries decode as one batch of up to `decode_batch` rows (the scorer sends a step's
    captions and uncached references in one call).
yes_no / digits: no generation. p(yes) (softmax over the yes and no spellings' ids) or E[digit]
    (softmax over the ids of 1..5) is read from the logits at the answer position of one
    forward pass. Every query is a chat prompt in three segments,

        head   = system turn + "<|im_start|>user\\n" [+ image]     shared by all queries of an image
        shared = the prompt's shared text                          (instruction, caption)
        item   = the item text + "<|im_end|>\\n<|im_start|>assistant\\n"

    and the forward pass runs as a prefix tree over the KV cache: each distinct head is
    prefilled once (the vision tower runs once per image and call, never per assertion); shared
    texts of a head that begin alike (a caption's coverage and linguistic prompts, both
    starting with the caption) extend one common-prefix node, each distinct (head, shared)
    then extends that node's rows by its own tokens, and the items read their (head, shared)
    row in place: a row's items are packed one after another into a row of their own tokens
    (up to `item_tokens`), each seeing the row's cache as a prefix plus its own earlier
    tokens (a segment mask), so no row of the cache is copied per item; only each item's last
    hidden state goes through the LM head, and only for the answers' token ids.
    `answer_groups` puts several readers' queries (yes/no and digits) in one tree. Rows are
    batched in padded buckets (powers of two from 8, in chunks of at most `prefix_batch`
    rows), lengths bucketed to powers of two (shared texts sorted by length, each chunk
    padded to its own longest), so a run compiles a bounded number of times
    (`compile_count()`). Each segment is right-padded inside its bucket; the padded slots are
    masked out of the KV mask, and positions continue from each row's real length, so the
    answer equals one forward pass over the concatenated tokens (tested).
"""
from __future__ import annotations

import collections
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax import sampling
from balcap_jax.padding import next_pow2
from balcap_jax.processing.prompts import apply_chat_template, caption_messages, pad_batch
from balcap_jax.rewards.parsing import (
    NO_SPELLINGS,
    YES_SPELLINGS,
    digit_expectation,
    parse_json_list,
    single_token_ids,
    yes_probability,
)
from balcap_jax.rewards.types import Answer, Query

__all__ = ["InProcessBackend", "compile_count", "decode_lists", "load_backend"]

_TRACES: collections.Counter = collections.Counter()
_SHARED, _ITEM = "\ue000SHARED\ue000", "\ue000ITEM\ue000"   # private-use sentinels


def compile_count(name: str | None = None) -> int:
    """Traces of the judge's jitted functions ("prefill", "extend", "read", "full"); None = all."""
    return sum(_TRACES.values()) if name is None else _TRACES[name]


_pow2 = next_pow2   # row and length buckets


def _rows(n: int, cap: int) -> int:
    """Row bucket of a chunk of n <= cap rows: a power of two, at least min(8, cap), so the
    ragged last chunks of a call reuse a few compiled shapes."""
    return min(_pow2(cap), _pow2(n, min(8, _pow2(cap))))


def _chunks(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


# ----------------------------------------------------------------------------------------------
# Jitted pieces
# ----------------------------------------------------------------------------------------------

def _embed(model, embed_inputs):
    if hasattr(model, "embed_prompt"):
        return model.embed_prompt(embed_inputs)     # Qwen2.5-VL: vision tower + image tokens
    return model.embed(embed_inputs["input_ids"])


@functools.partial(jax.jit, static_argnames=("graphdef", "total_len"))
def _prefill(graphdef, state, prompt: sampling.Prompt, total_len: int):
    """Heads [B, T] (left padded) into a cache of total_len slots -> (cache, kv_mask [B, S],
    next position [B])."""
    _TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    x = _embed(model, prompt.embed_inputs)
    b, t = prompt.mask.shape
    kv_mask = jnp.concatenate([prompt.mask.astype(jnp.int32),
                               jnp.zeros((b, total_len - t), jnp.int32)], axis=1)
    _, cache = model.forward_embeds(x, prompt.positions, kv_mask,
                                    model.init_cache(b, total_len, x.dtype), jnp.int32(0))
    return cache, kv_mask, (t + prompt.deltas).astype(jnp.int32)


def _text_positions(pos, mrope: bool):
    """Positions [B, L] of text after the head; with M-RoPE (Qwen2.5-VL) all three axes
    advance together -> [3, B, L]."""
    return jnp.broadcast_to(pos[None], (3, *pos.shape)) if mrope else pos


@functools.partial(jax.jit, static_argnames=("graphdef", "mrope"))
def _extend(graphdef, state, cache, kv_mask, next_pos, parent, ids, lens, start, mrope: bool):
    """A prefix-tree level (a row per node, few rows): gathers the parents' cache rows and
    runs `ids` [B, L] (right padded to lens) at slots start..start+L-1 -> (cache, kv_mask,
    next_pos + lens)."""
    _TRACES["extend"] += 1
    model = nnx.merge(graphdef, state)
    cache = jax.tree.map(lambda x: jnp.take(x, parent, axis=1), cache)   # [layers, rows, ...]
    kv_mask = jnp.take(kv_mask, parent, axis=0)
    next_pos = jnp.take(next_pos, parent, axis=0)
    steps = jnp.arange(ids.shape[1], dtype=jnp.int32)[None, :]
    valid = (steps < lens[:, None]).astype(jnp.int32)
    kv_mask = jax.lax.dynamic_update_slice(kv_mask, valid, (jnp.int32(0), start))
    pos = _text_positions(next_pos[:, None] + steps, mrope)
    _, cache = model.forward_embeds(model.embed(ids), pos, kv_mask, cache, start)
    return cache, kv_mask, next_pos + lens


@functools.partial(jax.jit, static_argnames=("graphdef", "mrope", "readers", "yes", "no",
                                             "digits"))
def _read(graphdef, state, cache, kv_mask, next_pos, ids, segs, offs, last, mrope: bool,
          readers: tuple, yes: tuple, no: tuple, digits: tuple):
    """The items, packed: row p of ids [P, T] holds items of cache row p one after another
    (segs [P, T]: the item's slot in the row, -1 = padding; offs: the token's place in its
    item). Each item reads its row's cache in place, as a prefix (never a copy of the row),
    and its own earlier tokens. Reads p(yes) and/or E[digit] (`readers`) at each item's last
    token (last [P, M]) -> float32 [len(readers), P, M]."""
    _TRACES["read"] += 1
    model = nnx.merge(graphdef, state)
    pos = _text_positions(next_pos[:, None] + offs, mrope)
    hidden, _ = model.forward_embeds(model.embed(ids), pos, (segs >= 0).astype(jnp.int32),
                                     prefix=cache, prefix_mask=kv_mask, segment_ids=segs)
    # the LM head over the answers' ids only (yes/no spellings, digits), not the vocabulary:
    # the readers look at nothing else, and [P, M, V] float32 logits would dwarf the pass
    sel = sorted({i for i in (*yes, *no, *np.ravel(digits).tolist()) if i >= 0})
    at = {t: k for k, t in enumerate(sel)}
    h = jnp.take_along_axis(hidden, last[..., None], axis=1)                    # [P, M, D]
    w = jnp.take(model.lm_head_weight(), np.asarray(sel, np.int32), axis=1)      # [D, K]
    logits = jnp.einsum("pmd,dk->pmk", h, w.astype(h.dtype),
                        preferred_element_type=jnp.float32)
    digit_at = np.asarray([[at[i] if i >= 0 else -1 for i in row] for row in digits])
    return jnp.stack([yes_probability(logits, tuple(at[i] for i in yes),
                                      tuple(at[i] for i in no)) if r == "yes_no" else
                      digit_expectation(logits, digit_at) for r in readers])


@functools.partial(jax.jit, static_argnames=("graphdef", "reader", "ids_a", "ids_b"))
def _full(graphdef, state, prompt: sampling.Prompt, reader: str, ids_a: tuple, ids_b: tuple):
    """share_prefix=False: one causal forward over whole left-padded prompts; reads the last
    position -> float32 [B]."""
    _TRACES["full"] += 1
    model = nnx.merge(graphdef, state)
    x = _embed(model, prompt.embed_inputs)
    hidden, _ = model.forward_embeds(x, prompt.positions, prompt.mask.astype(jnp.int32))
    logits = model.logits(hidden[:, -1:])[:, 0]
    if reader == "yes_no":
        return yes_probability(logits, ids_a, ids_b)
    return digit_expectation(logits, np.asarray(ids_a))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def decode_lists(tokenizer, tokens: np.ndarray, lengths: np.ndarray, truncated: np.ndarray,
                 stop_ids: Sequence[int]) -> list[Answer]:
    """Generated rows -> parsed JSON lists (Answer per row); the stop token is dropped."""
    out = []
    for row, n, cut in zip(np.asarray(tokens), np.asarray(lengths), np.asarray(truncated)):
        ids = [int(t) for t in row[:int(n)] if int(t) not in stop_ids]
        items, reason = parse_json_list(tokenizer.decode(ids, skip_special_tokens=True))
        if items is None and cut:
            reason = "truncated_list"
        out.append(Answer(items, reason))
    return out


class InProcessBackend:
    """See the module docstring.

    model: a CausalLM (text judge) or Qwen2_5_VL (multimodal judge) with the low-level API.
    tokenizer: its tokenizer (chat template set); processor: a Qwen25VLProcessor for image
    queries (None for a text judge). name: the judge checkpoint id (keys the reference-unit
    cache). system_prompt None keeps the chat template's default. share_prefix=False runs every
    yes/no or digit query as its own full prompt (one forward each, the image encoded per
    query): the baseline the prefix tree is measured against, same answers; it runs
    `item_batch` queries per pass. `item_tokens`: the tokens of items packed into one row of
    a pass (a longer item gets a row of its own).
    """

    def __init__(self, model, tokenizer, *, name: str, processor=None,
                 chat_template: str | None = None, system_prompt: str | None = None,
                 list_max_tokens: int = 512, decode_batch: int = 64, prefix_batch: int = 16,
                 item_tokens: int = 256, item_batch: int = 64,
                 eos_token_ids: Sequence[int] | None = None,
                 pad_id: int | None = None, seed: int = 0, share_prefix: bool = True,
                 min_common_prefix: int = 64):
        self.share_prefix = bool(share_prefix)
        self.min_common_prefix = int(min_common_prefix)
        self.model, self.tokenizer, self.processor, self.name = model, tokenizer, processor, name
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.list_max_tokens = int(list_max_tokens)
        self.decode_batch, self.prefix_batch = int(decode_batch), int(prefix_batch)
        self.item_tokens, self.item_batch = int(item_tokens), _pow2(item_batch)
        self.pad_id = int(tokenizer.pad_token_id if pad_id is None else pad_id)
        if eos_token_ids is None:
            from balcap_jax.tokenizers import stop_token_ids
            eos_token_ids = stop_token_ids(tokenizer)
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.yes_ids = tuple(single_token_ids(tokenizer, YES_SPELLINGS))
        self.no_ids = tuple(single_token_ids(tokenizer, NO_SPELLINGS))
        spellings = [single_token_ids(tokenizer, [str(d), f" {d}"]) for d in range(1, 6)]
        width = max(len(s) for s in spellings)
        self.digit_ids = tuple(tuple(s + [-1] * (width - len(s))) for s in spellings)
        self.rng = jax.random.key(seed)
        self.stats: collections.Counter = collections.Counter()   # rows run per stage
        self.times: collections.Counter = collections.Counter()
        self._templates: dict[bool, tuple[str, str]] = {}

    # -- prompt pieces ----------------------------------------------------------------------
    def _head_tail(self, has_image: bool) -> tuple[str, str]:
        """The chat text before the user text and after it (generation prompt included)."""
        if has_image not in self._templates:
            if has_image:
                messages = caption_messages(_SHARED + _ITEM, num_images=1,
                                            system_prompt=self.system_prompt)
            else:   # plain string content: text-only templates (Qwen2.5-Instruct) expect it
                messages = [{"role": "user", "content": _SHARED + _ITEM}]
                if self.system_prompt is not None:
                    messages.insert(0, {"role": "system", "content": self.system_prompt})
            text = apply_chat_template(messages, self.tokenizer,
                                       chat_template=self.chat_template)
            i, j = text.index(_SHARED), text.index(_ITEM)
            if j != i + len(_SHARED):
                raise ValueError("the chat template put text between the prompt's parts")
            self._templates[has_image] = text[:i], text[j + len(_ITEM):]
        return self._templates[has_image]

    def _encode(self, texts: list[str], images: list[Any]) -> dict:
        """Templated texts (+ one image per row or None) -> processor-style numpy inputs."""
        if any(im is not None for im in images):
            if self.processor is None:
                raise ValueError(f"judge {self.name!r} got an image query but has no processor; "
                                 "pass processor=Qwen25VLProcessor(...) for a multimodal judge")
            return self.processor(texts, images=[im for im in images])
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        input_ids, mask = pad_batch(ids, self.pad_id, padding_side="left")
        return {"input_ids": input_ids, "attention_mask": mask}

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- decompose: greedy generation ------------------------------------------------------
    def decompose(self, queries: Sequence[Query]) -> list[Answer]:
        out: list[Answer] = []
        for chunk in _chunks(list(queries), self.decode_batch):
            texts, images = [], []
            for q in chunk:
                head, tail = self._head_tail(q.image is not None)
                texts.append(head + q.shared + q.item + tail)
                images.append(q.image)
            n = len(chunk)
            rows = _rows(n, self.decode_batch)   # padded with copies of the first row
            texts += [texts[0]] * (rows - n)
            images += [images[0]] * (rows - n)
            start = time.perf_counter()
            samples = sampling.generate(
                self.model, self._encode(texts, images), max_new_tokens=self.list_max_tokens,
                temperature=0.0, eos_token_ids=self.eos_token_ids, rng=self.rng,
                pad_id=self.pad_id)
            tokens, lengths, trunc = (np.asarray(x)[:n] for x in
                                      (samples.tokens, samples.lengths, samples.truncated))
            self.times["decompose"] += time.perf_counter() - start
            self.stats["decompose_rows"] += rows
            out += decode_lists(self.tokenizer, tokens, lengths, trunc, self.eos_token_ids)
        return out

    # -- yes/no and digits: one forward over a prefix tree ---------------------------------
    def yes_no(self, queries: Sequence[Query]) -> list[Answer]:
        return self.answer_groups([("yes_no", queries)])[0]

    def digits(self, queries: Sequence[Query]) -> list[Answer]:
        return self.answer_groups([("digits", queries)])[0]

    def _reader_ids(self, reader: str) -> tuple:
        return (self.yes_ids, self.no_ids) if reader == "yes_no" else (self.digit_ids, ())

    def _prefix_groups(self, seqs: list[tuple]) -> list[int]:
        """Per shared token sequence (distinct, one head), the length of the prefix it shares
        with its group: sequences sorted, neighbours whose common prefix covers at least half
        of the shorter one and `min_common_prefix` tokens chained into a group (a caption's
        coverage and linguistic prompts: the caption), the group's prefix their common one,
        always leaving each member at least one token of its own; a sequence alone is its own
        node (cut = its length). A short common prefix is not split off: the extra pass would
        cost more than the tokens it saves (benchmarks/judges.py)."""
        order = sorted(range(len(seqs)), key=lambda i: seqs[i])

        def lcp(a, b):
            n = 0
            for x, y in zip(a, b):
                if x != y:
                    break
                n += 1
            return n
        groups, cur = [], [order[0]] if order else []
        for a, b in zip(order, order[1:]):
            n = lcp(seqs[a], seqs[b])
            if n >= max(self.min_common_prefix, min(len(seqs[a]), len(seqs[b])) // 2, 1):
                cur.append(b)
            else:
                groups.append(cur)
                cur = [b]
        if cur:
            groups.append(cur)
        out = [0] * len(seqs)
        for g in groups:
            if len(g) == 1:      # nothing shared: the whole text is the node (no extra level)
                out[g[0]] = len(seqs[g[0]])
                continue
            common = min(lcp(seqs[g[0]], seqs[g[-1]]), min(len(seqs[i]) for i in g) - 1)
            for i in g:
                out[i] = common
        return out

    def answer_groups(self, groups: Sequence[tuple[str, Sequence[Query]]]
                      ) -> list[list[Answer]]:
        """Several readers' queries ("yes_no", "digits") through ONE prefix tree:

            head (system + image) -> common prefix -> rest of the shared text -> item

        Shared texts of one head that begin alike (a caption's coverage and linguistic
        prompts both begin with the caption) extend one common-prefix node; each shared text
        then extends that node by the tokens of its own, and each item continues its shared
        text's rows. The prefix split is made on the tokens of the whole shared text, so every
        query runs exactly the tokens it ran before, in the same positions."""
        queries = [(r, q) for r, qs in groups for q in qs]
        if not queries:
            return [[] for _ in groups]
        if not self.share_prefix:
            out = []
            for r, qs in groups:
                out.append(self._answers_unshared(qs, r, *self._reader_ids(r)) if qs else [])
            return out
        start_time = time.perf_counter()
        heads: dict[tuple, int] = {}           # image id (None: text) -> head index
        head_image: list[Any] = []
        shareds: dict[tuple, int] = {}         # (head, shared text) -> shared index
        shared_head, shared_ids = [], []
        item_shared, item_ids, item_reader = [], [], []
        for reader, q in queries:
            hk = (id(q.image) if q.image is not None else None,)
            if hk not in heads:
                heads[hk] = len(head_image)
                head_image.append(q.image)
            h = heads[hk]
            sk = (h, q.shared)
            if sk not in shareds:
                shareds[sk] = len(shared_head)
                shared_head.append(h)
                shared_ids.append(tuple(self._tok(q.shared)))
            _, tail = self._head_tail(q.image is not None)
            item_shared.append(shareds[sk])
            item_ids.append(self._tok(q.item + tail))
            item_reader.append(reader)
        if any(len(s) < 2 for s in shared_ids) or any(len(i) == 0 for i in item_ids):
            raise ValueError("a judge query has a shared part under 2 tokens or an empty item "
                             "part; every prompt's parts must be non-empty text")
        # the common-prefix nodes: (head, prefix tokens) -> node; each shared -> node, rest
        by_head_s = collections.defaultdict(list)
        for sid, h in enumerate(shared_head):
            by_head_s[h].append(sid)
        prefixes: dict[tuple, int] = {}
        prefix_head, prefix_ids = [], []
        shared_prefix, shared_rest = [0] * len(shared_ids), [()] * len(shared_ids)
        for h, sids in by_head_s.items():
            cut = self._prefix_groups([shared_ids[s] for s in sids])
            for s, c in zip(sids, cut):
                key = (h, shared_ids[s][:c])
                if key not in prefixes:
                    prefixes[key] = len(prefix_head)
                    prefix_head.append(h)
                    prefix_ids.append(list(shared_ids[s][:c]))
                shared_prefix[s], shared_rest[s] = prefixes[key], shared_ids[s][c:]
        len1 = _pow2(max(len(p) for p in prefix_ids), 8)
        rests = [len(r) for r in shared_rest if r]
        len2 = _pow2(max(rests), 8) if rests else 0
        values = np.full(len(queries), np.nan, np.float32)
        graphdef, state = nnx.split(self.model)
        prefixes_of = collections.defaultdict(list)
        for u, h in enumerate(prefix_head):
            prefixes_of[h].append(u)
        shareds_of = collections.defaultdict(list)
        for s, u in enumerate(shared_prefix):
            shareds_of[u].append(s)
        items_of = collections.defaultdict(list)
        for k, s in enumerate(item_shared):
            items_of[s].append(k)

        def bucket(seqs):
            return _pow2(max(len(x) for x in seqs), 8)

        def run_items(cache_rows, row_of: dict, shared: list) -> None:
            """The items of `shared`, packed into their own rows of `cache_rows` (row_of[s]):
            each row's items, longest first, fill packs of up to `item_tokens` tokens; pass j
            runs every row's j-th pack (a row without one is padding). No row is copied."""
            rows = int(np.shape(cache_rows[1])[0])
            packs: list[list[list[int]]] = [[] for _ in range(rows)]    # row -> its packs
            used: list[list[int]] = [[] for _ in range(rows)]           # their token counts
            for s in shared:
                r = row_of[s]
                for k in sorted(items_of[s], key=lambda k: -len(item_ids[k])):
                    n = len(item_ids[k])
                    at = next((i for i, u in enumerate(used[r]) if u + n <= self.item_tokens),
                              None)
                    if at is None:
                        packs[r].append([k])
                        used[r].append(n)
                    else:
                        packs[r][at].append(k)
                        used[r][at] += n
            for j in range(max(len(p) for p in packs)):
                mine = [p[j] if j < len(p) else [] for p in packs]
                width = _pow2(max(u[j] if j < len(u) else 0 for u in used), 8)
                m = _pow2(max(len(p) for p in mine), 4)
                ids = np.full((rows, width), self.pad_id, np.int32)
                segs = np.full((rows, width), -1, np.int32)
                offs = np.zeros((rows, width), np.int32)
                last = np.zeros((rows, m), np.int32)
                readers = tuple(sorted({item_reader[k] for p in mine for k in p}))
                for r, p in enumerate(mine):
                    at = 0
                    for slot, k in enumerate(p):
                        n = len(item_ids[k])
                        ids[r, at:at + n] = item_ids[k]
                        segs[r, at:at + n] = slot
                        offs[r, at:at + n] = np.arange(n)
                        last[r, slot] = at + n - 1
                        at += n
                out = np.asarray(_read(graphdef, state, *cache_rows, ids, segs, offs, last,
                                       mrope=mrope, readers=readers, yes=self.yes_ids,
                                       no=self.no_ids, digits=self.digit_ids))
                for r, p in enumerate(mine):
                    for slot, k in enumerate(p):
                        values[k] = out[readers.index(item_reader[k]), r, slot]
                self.stats["item_rows"] += rows
                self.stats["item_tokens"] += rows * width
        for head_chunk in _chunks(list(range(len(head_image))), self.prefix_batch):
            cache, kv_mask, next_pos, mrope, head_len = self._prefill_heads(
                graphdef, state, [head_image[h] for h in head_chunk], len1 + len2)
            head_row = {h: r for r, h in enumerate(head_chunk)}
            for u_chunk in _chunks([u for h in head_chunk for u in prefixes_of[h]],
                                   self.prefix_batch):
                rows = _rows(len(u_chunk), self.prefix_batch)
                parent = np.zeros(rows, np.int32)
                parent[:len(u_chunk)] = [head_row[prefix_head[u]] for u in u_chunk]
                b1 = bucket([prefix_ids[u] for u in u_chunk])
                ids, lens = self._pad([prefix_ids[u] for u in u_chunk], rows, b1)
                c1 = _extend(graphdef, state, cache, kv_mask, next_pos, parent, ids, lens,
                             jnp.int32(head_len), mrope=mrope)
                self.stats["prefix_rows"] += rows
                prefix_row = {u: r for r, u in enumerate(u_chunk)}
                under = [s for u in u_chunk for s in shareds_of[u]]
                # a shared text alone is its prefix node: its items read those rows
                direct = [s for s in under if not shared_rest[s]]
                run_items(c1, {s: prefix_row[shared_prefix[s]] for s in direct}, direct)
                # rests sorted by length: a chunk is padded to its own longest
                for s_chunk in _chunks(sorted((s for s in under if shared_rest[s]),
                                              key=lambda s: len(shared_rest[s])),
                                       self.prefix_batch):
                    rows = _rows(len(s_chunk), self.prefix_batch)
                    parent = np.zeros(rows, np.int32)
                    parent[:len(s_chunk)] = [prefix_row[shared_prefix[s]] for s in s_chunk]
                    b2 = bucket([shared_rest[s] for s in s_chunk])
                    ids, lens = self._pad([list(shared_rest[s]) for s in s_chunk], rows, b2)
                    c2 = _extend(graphdef, state, *c1, parent, ids, lens,
                                 jnp.int32(head_len + b1), mrope=mrope)
                    self.stats["shared_rows"] += rows
                    run_items(c2, {s: r for r, s in enumerate(s_chunk)}, s_chunk)
        for reader in dict.fromkeys(item_reader):
            self.times[reader] += (time.perf_counter() - start_time) / len(set(item_reader))
        answers = [Answer(float(v)) if np.isfinite(v) else Answer(None, "non_finite")
                   for v in values]
        out, at = [], 0
        for _, qs in groups:
            out.append(answers[at:at + len(qs)])
            at += len(qs)
        return out

    def _answers_unshared(self, queries: Sequence[Query], reader: str, ids_a, ids_b
                          ) -> list[Answer]:
        start_time = time.perf_counter()
        graphdef, state = nnx.split(self.model)
        values = []
        for chunk in _chunks(list(queries), self.item_batch):
            n = len(chunk)
            rows = _rows(n, self.item_batch)
            texts, images = [], []
            for q in chunk:
                head, tail = self._head_tail(q.image is not None)
                texts.append(head + q.shared + q.item + tail)
                images.append(q.image)
            head, tail = self._head_tail(False)       # padding rows: text only
            texts += [head + chunk[0].shared + chunk[0].item + tail] * (rows - n)
            images += [None] * (rows - n)
            prompt = sampling.prepare_prompt(self.model, self._encode(texts, images),
                                             pad_id=self.pad_id)
            out = _full(graphdef, state, prompt, reader=reader, ids_a=tuple(ids_a),
                        ids_b=tuple(ids_b))
            values.append(np.asarray(out)[:n])
            self.stats["full_rows"] += rows
            self.stats["images_encoded"] += sum(im is not None for im in images[:n])
        self.times[reader] += time.perf_counter() - start_time
        return [Answer(float(v)) if np.isfinite(v) else Answer(None, "non_finite")
                for v in np.concatenate(values)]

    def _prefill_heads(self, graphdef, state, images: list[Any], tail_len: int):
        """Prefill the distinct heads (one per image; one for text queries), padded to a
        bucket of rows with text-only heads (so padding never runs the vision tower)."""
        n = len(images)
        rows = _rows(n, self.prefix_batch)
        images = images + [None] * (rows - n)
        texts = [self._head_tail(im is not None)[0] for im in images]
        prompt = sampling.prepare_prompt(self.model, self._encode(texts, images),
                                         pad_id=self.pad_id)
        head_len = int(np.shape(prompt.mask)[1])
        cache, kv_mask, next_pos = _prefill(graphdef, state, prompt,
                                            total_len=head_len + tail_len)
        self.stats["head_rows"] += rows
        self.stats["images_encoded"] += sum(im is not None for im in images[:n])
        return cache, kv_mask, next_pos, np.ndim(prompt.positions) == 3, head_len

    def _pad(self, seqs: list[list[int]], rows: int, length: int):
        ids = np.full((rows, length), self.pad_id, np.int32)
        lens = np.ones(rows, np.int32)          # dummy rows: one pad token, never read
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = s
            lens[r] = len(s)
        return ids, lens


def load_backend(path: str, *, name: str | None = None, dtype: Any = "bfloat16", mesh=None,
                 rules=None, max_image_tokens: int = 0, model=None,
                 **kwargs: Any) -> InProcessBackend:
    """An in-process judge from a local HF checkpoint directory (config.json, safetensors,
    tokenizer files; preprocessor_config.json for Qwen2.5-VL). `name` defaults to the
    directory's base name; `max_image_tokens` (> 0) bounds the tokens of each image the judge
    sees, so its memory is bounded (the checkpoints' own bound is 16384); `model`: weights
    already in memory for this checkpoint (a LoRA policy's frozen base, adapters off) instead
    of loading them again; kwargs go to InProcessBackend."""
    import json
    import os

    from transformers import AutoTokenizer

    from balcap_jax.models import from_pretrained
    from balcap_jax.processing import QWEN25_VL_CHAT_TEMPLATE, Qwen25VLProcessor, QwenImageProcessor
    if not os.path.isdir(path):
        raise FileNotFoundError(f"judge checkpoint {path!r} is not a directory; point "
                                "judges.*_path at a local Hugging Face checkpoint")
    if model is None:
        model = from_pretrained(path, dtype=dtype, mesh=mesh, rules=rules)
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = None
    if hasattr(model, "prepare_prompt"):          # multimodal (Qwen2.5-VL)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = QWEN25_VL_CHAT_TEMPLATE
        pre = os.path.join(path, "preprocessor_config.json")
        image_processor = QwenImageProcessor()
        if os.path.exists(pre):
            with open(pre) as f:
                image_processor = QwenImageProcessor.from_config(json.load(f))
        processor = Qwen25VLProcessor(tokenizer, image_processor.with_max_tokens(max_image_tokens))
    elif not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer in {path} has no chat template; a judge needs one")
    return InProcessBackend(model, tokenizer, processor=processor,
                            name=name or os.path.basename(os.path.normpath(path)), **kwargs)
