"""Judge prompts: rendering, fields, versions pinned to template hashes."""
import hashlib

import pytest

from balcap_jax.rewards import prompts as P

# role -> (version, hash of the template). Editing a template without bumping its version fails
# here: bump the version (it keys the reference-unit cache) and update the hash.
PINNED = {
    "decompose_caption": ("decompose_caption-v1", "04be818bb965"),
    "verify": ("verify-v1", "9bb35934b0d5"),
    "pointable": ("pointable-v1", "0537860e460c"),
    "decompose_reference": ("decompose_reference-v1", "51fbbb8d1900"),
    "coverage": ("coverage-v1", "a818e3b91335"),
    "clarity": ("clarity-v1", "db55a0570834"),
    "fluency": ("fluency-v1", "c65aa771557b"),
    "coherence": ("coherence-v1", "efdb55c7d0c4"),
}


def _hash(p):
    raw = p.shared + "\x00" + p.item + "\x00" + p.answer + "\x00" + str(p.needs_image)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


@pytest.mark.parametrize("role", sorted(PINNED))
def test_version_pinned_to_template(role):
    p = P.get_prompt(role)
    assert (p.version, _hash(p)) == PINNED[role], (
        f"prompt {role!r} changed: bump its version and update PINNED")


def test_every_role_pinned_and_rendered():
    assert set(P.PROMPTS) == set(PINNED)
    fields = {"caption": "A {red} car.", "assertion": "A car.", "reference": "A car.",
              "unit": "There is a car."}
    for p in P.PROMPTS.values():
        shared, item = p.render(**fields)
        assert "{" not in (shared + item).replace("A {red} car.", "")  # every field filled
        assert p.answer in ("json_list", "yes_no", "digit")
    # the per-item text comes last, the shared part carries the caption for coverage/linguistic
    shared, item = P.render("coverage", caption="CAP", unit="UNIT")
    assert "CAP" in shared and item.endswith("UNIT")
    shared, item = P.render("verify", assertion="ASSERT")
    assert "ASSERT" not in shared and item.endswith("ASSERT")
    assert P.get_prompt("verify").needs_image and not P.get_prompt("coverage").needs_image


def test_pointable_prompt_carries_spec_definition():
    text = P.get_prompt("pointable").shared.lower()
    for word in ("object", "attribute", "text", "spatial relation", "evidence", "mood",
                 "aesthetic", "purpose", "narrative", "image itself"):
        assert word in text, word


def test_missing_field_and_unknown_role_name_the_problem():
    with pytest.raises(KeyError, match="assertion"):
        P.render("verify", caption="x")
    with pytest.raises(KeyError, match="known"):
        P.get_prompt("nope")


def test_prompt_versions():
    v = P.prompt_versions()
    assert v == {r: PINNED[r][0] for r in PINNED}
    assert set(P.prompt_versions(["recall"])) == {"decompose_reference", "coverage"}
    with pytest.raises(KeyError, match="unknown reward"):
        P.prompt_versions(["style"])
