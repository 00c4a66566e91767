"""Judge-output parsing and the logit readers, on hand-written outputs and constructed logits."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from balcap_jax.rewards import parsing as R


@pytest.mark.parametrize("text,expected", [
    ('["A dog runs.", "The dog is brown."]', ["A dog runs.", "The dog is brown."]),
    ('```json\n["a",\n "b"]\n```', ["a", "b"]),
    ('```\n["a"]\n```\nThese are the assertions.', ["a"]),
    ('Here you go: ["a", " b "] Hope this helps [1].', ["a", "b"]),
    ('{"assertions": ["x", "y"]}', ["x", "y"]),
    ("['single', \"it's quoted\"]", ["single", "it's quoted"]),
    ('Note {not json} then ["a"]', ["a"]),
    ('["a", "", "  "]', ["a"]),                 # empty items dropped
    ("[]", []),                                  # a valid empty answer (caller: n = 0)
    ('["bracket ] inside", "b"]', ["bracket ] inside", "b"]),
])
def test_json_list_good(text, expected):
    assert R.parse_json_list(text) == (expected, None)


@pytest.mark.parametrize("text,reason", [
    ('["a", "b", "c', "truncated_list"),           # cut off by max_tokens: no partial credit
    ('```json\n["a", "b"', "truncated_list"),
    ('["a", ["nested"', "truncated_list"),
    ("I cannot help with that.", "no_list"),
    ("", "empty_output"),
    (None, "empty_output"),
    ('[1, null]', "bad_items"),
    ('[{"a": 1}]', "bad_items"),
    ('{"a": 1}', "bad_items"),
    ("[a, b]", "bad_json"),
])
def test_json_list_failures(text, reason):
    assert R.parse_json_list(text) == (None, reason)


@pytest.mark.parametrize("text,value,reason", [
    ("yes", 1.0, None), ("Yes.", 1.0, None), ("**No**, it is not", 0.0, None),
    ("  true", 1.0, None), ("False", 0.0, None), ("Maybe", None, "not_yes_no"),
    ("", None, "empty_output"), ("123", None, "not_yes_no"),
    ("Answer: yes", 1.0, None), ("**Final answer:** No", 0.0, None),
    ("Answering is hard", None, "not_yes_no"),
])
def test_yes_no_text(text, value, reason):
    assert R.parse_yes_no(text) == (value, reason)


@pytest.mark.parametrize("text,value,reason", [
    ("4", 4.0, None), ("Rating: 2/5", 2.0, None), ("5 - excellent", 5.0, None),
    ("0", None, "digit_out_of_range"), ("7", None, "digit_out_of_range"),
    ("3.5", None, "digit_out_of_range"), ("good", None, "no_digit"), (None, None, "empty_output"),
])
def test_digit_text(text, value, reason):
    assert R.parse_digit(text) == (value, reason)


def test_yes_probability_constructed_logits():
    v = 10
    logits = np.full((2, 3, v), -5.0, np.float32)
    logits[0, 0, [1, 2]] = [np.log(2.0), np.log(1.0)]      # yes spellings: 2 + 1
    logits[0, 0, 3] = np.log(1.0)                            # no: 1 -> p = 3/4
    logits[1, 2, 3] = 50.0                                   # only "no" matters
    logits[0, 0, 9] = 100.0                                  # a non-answer token is ignored
    p = R.yes_probability(jnp.asarray(logits), [1, 2], [3, 4])
    assert p.shape == (2, 3) and p.dtype == jnp.float32
    e = np.exp(-5.0)
    np.testing.assert_allclose(float(p[0, 0]), 3.0 / (3.0 + 1.0 + e), rtol=1e-6)
    np.testing.assert_allclose(float(p[0, 1]), 0.5, rtol=1e-6)       # all equal: 2 vs 2
    assert float(p[1, 2]) < 1e-20
    # jittable, bfloat16 logits, extreme values stay finite
    big = jnp.asarray(logits, jnp.bfloat16) * 100
    q = jax.jit(lambda x: R.yes_probability(x, (1, 2), (3, 4)))(big)
    assert bool(jnp.all(jnp.isfinite(q)))


def test_digit_expectation_constructed_logits():
    v = 12
    ids = [3, 4, 5, 6, 7]                                     # digits 1..5
    logits = np.full((3, v), -1e9, np.float32)
    logits[0, ids] = 0.0                                      # uniform -> E = 3
    logits[1, 6] = 0.0                                        # all on "4"
    logits[2, [3, 7]] = [np.log(3.0), np.log(1.0)]            # 1 w.p. 3/4, 5 w.p. 1/4 -> 2
    logits[:, 0] = 1e3                                        # a non-digit token is ignored
    e = jax.jit(lambda x: R.digit_expectation(x, ids))(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(e), [3.0, 4.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(R.digit_score(e)), [0.5, 0.75, 0.25], rtol=1e-6)
    # several spellings per digit are summed; -1 pads the ragged ones
    two = np.full((1, v), -1e9, np.float32)
    two[0, [1, 2, 8]] = 0.0                                   # "1" twice, "5" once -> E = 7/3
    e2 = R.digit_expectation(jnp.asarray(two), [[1, 2], [9, -1], [10, -1], [11, -1], [8, -1]])
    np.testing.assert_allclose(float(e2[0]), (1 + 1 + 5) / 3, rtol=1e-5)


def test_reader_bad_ids_are_errors():
    with pytest.raises(ValueError, match="vocabulary"):
        R.yes_probability(jnp.zeros((2, 5)), [7], [1])
    with pytest.raises(ValueError, match="K >= 2"):
        R.digit_expectation(jnp.zeros((2, 5)), [1])
    with pytest.raises(ValueError, match="K >= 2"):
        R.digit_expectation(jnp.zeros((2, 5)), [1, -1])


def _content(*tops, token=None):
    first = {"token": token or tops[0][0], "logprob": tops[0][1],
             "top_logprobs": [{"token": t, "logprob": lp} for t, lp in tops]}
    return [{"token": "\n", "logprob": -0.01, "top_logprobs": []}, first]


def test_top_logprob_readers():
    c = _content(("Yes", math.log(0.6)), (" yes", math.log(0.1)), ("No", math.log(0.2)),
                 ("Maybe", math.log(0.1)))
    p, err = R.yes_probability_from_top_logprobs(c)
    assert err is None and p == pytest.approx(0.7 / 0.9)
    assert R.yes_probability_from_top_logprobs(_content(("Hmm", -0.1))) == (None, "no_logprobs")
    assert R.yes_probability_from_top_logprobs(None) == (None, "no_logprobs")
    d = _content(("4", math.log(0.5)), ("5", math.log(0.25)), ("3", math.log(0.25)),
                 ("x", math.log(0.01)))
    e, err = R.digit_expectation_from_top_logprobs(d)
    assert err is None and e == pytest.approx(4 * 0.5 + 5 * 0.25 + 3 * 0.25)
    assert R.digit_expectation_from_top_logprobs(_content(("9", -0.1))) == (None, "no_logprobs")


def test_single_token_ids():
    class Tok:
        vocab = {"yes": [5], "Yes": [6], " yes": [7, 8], "no": [9]}

        def encode(self, s, add_special_tokens=False):
            return self.vocab.get(s, [1, 2])
    assert R.single_token_ids(Tok(), ["yes", "Yes", " yes", "yes"]) == [5, 6]
    with pytest.raises(ValueError, match="single token"):
        R.single_token_ids(Tok(), [" yes"])
