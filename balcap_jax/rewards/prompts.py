"""Judge prompt templates for the BalCapRL rewards (SPEC.md section 2), each with a version.

Every prompt is split into a *shared* part and an *item* part, rendered in that order into one
user turn (an image, where the role has one, comes before both):

    [image] shared  item        e.g.  [image] "Is this assertion true ...\\n\\n" "Assertion: ..."

The shared part is the same for every item of one rollout (or one image), so an in-process
judge encodes it once as a KV-cache prefix and runs each item as a short continuation; a remote
judge simply sends shared + item. The answer formats are "json_list" (a JSON list of strings),
"yes_no" (one word) and "digit" (one digit 1..5).

Change a template -> bump its version: versions key the reference-unit cache and are recorded in
the run's metrics (`prompt_versions()`), and tests/rewards/test_prompts.py pins a hash of every
template to its version so an edit without a bump fails.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

__all__ = ["JudgePrompt", "PROMPTS", "LINGUISTIC_CRITERIA", "get_prompt", "prompt_versions",
           "render"]


@dataclasses.dataclass(frozen=True)
class JudgePrompt:
    role: str
    version: str
    shared: str              # str.format template; ends where the per-item text begins
    item: str                # str.format template of the per-item part ("" for none)
    answer: str              # "json_list" | "yes_no" | "digit"
    needs_image: bool = False

    def render(self, **fields: str) -> tuple[str, str]:
        """(shared text, item text) with `fields` filled in; a missing field is an error that
        names it."""
        try:
            return self.shared.format(**fields), self.item.format(**fields)
        except KeyError as e:
            raise KeyError(f"prompt {self.role!r} needs field {e.args[0]!r}; got "
                           f"{sorted(fields)}") from None


_JSON_RULE = ("Answer with a JSON list of strings and nothing else, for example "
              '["A red car is parked.", "The car is on a street."].')
_YES_NO_RULE = "Answer with one word: yes or no."
_DIGIT_RULE = "Answer with a single digit from 1 to 5 and nothing else."

# SPEC.md section 2's definition of "pointable", spelled out for the judge.
POINTABLE_DEFINITION = (
    "An assertion is pointable if it refers to something concretely visible in the image that "
    "one could point to: an object, an attribute of it (colour, material, shape, size, state), "
    "a count, text written in the image, a spatial relation, or visible evidence for an "
    "inference (for example \"the pavement is wet, suggesting recent rain\"). An assertion is "
    "NOT pointable if it states a mood or atmosphere, aesthetics or the effect of the "
    "composition (\"adds depth\", \"creates a sense of calm\"), a purpose or intention, a "
    "narrative or story beyond what is shown, or a comment about the image itself (\"this is a "
    "beautiful photo\", \"the image captures ...\").")

LINGUISTIC_CRITERIA = {
    "clarity": ("Clarity: the caption is easy to read and unambiguous, and it does not repeat "
                "itself or pad its sentences with redundant phrases."),
    "fluency": ("Fluency: the caption is grammatical and reads like natural, well-written "
                "English."),
    "coherence": ("Coherence: the caption keeps a consistent point of view and a logical order; "
                  "each sentence follows sensibly from the one before."),
}


def _linguistic(criterion: str) -> JudgePrompt:
    return JudgePrompt(
        role=criterion, version=f"{criterion}-v1",
        shared="Here is a caption of an image:\n\n{caption}\n\n",
        item=(f"Rate the {criterion} of this caption on a scale from 1 (very poor) to 5 "
              f"(excellent). {LINGUISTIC_CRITERIA[criterion]} Judge only the writing, not "
              f"whether the caption is accurate or complete. {_DIGIT_RULE}"),
        answer="digit")


PROMPTS: dict[str, JudgePrompt] = {p.role: p for p in [
    JudgePrompt(
        role="decompose_caption", version="decompose_caption-v1",
        shared=("Split the following image caption into atomic assertions: short, "
                "self-contained statements that each make exactly one claim (about one object, "
                "one attribute, one count, one piece of text, one spatial relation, or one "
                "interpretation). Replace pronouns by what they refer to so that every assertion "
                "stands on its own. Keep every claim the caption makes, including subjective or "
                "interpretive ones, and add nothing. If the caption makes no claim, answer []. "
                f"{_JSON_RULE}\n\n"),
        item="Caption: {caption}", answer="json_list"),
    JudgePrompt(
        role="verify", version="verify-v1", needs_image=True,
        shared=("Is the following assertion true of this image? Answer yes if the image shows "
                "it or clearly supports it; answer no if the image contradicts it or does not "
                f"show it. {_YES_NO_RULE}\n\n"),
        item="Assertion: {assertion}", answer="yes_no"),
    JudgePrompt(
        role="pointable", version="pointable-v1", needs_image=True,
        shared=(f"{POINTABLE_DEFINITION} Whether the assertion is true does not matter here, "
                f"only what kind of statement it is. Is the following assertion pointable? "
                f"{_YES_NO_RULE}\n\n"),
        item="Assertion: {assertion}", answer="yes_no"),
    JudgePrompt(
        role="decompose_reference", version="decompose_reference-v1",
        shared=("Split the following reference description of an image into units of "
                "information: short, self-contained statements that each hold one fact about "
                "the image (an object, an attribute, a count, text in the image, a spatial "
                "relation, or the setting). Replace pronouns by what they refer to so that "
                "every unit stands on its own. Do not add, merge or drop facts. "
                f"{_JSON_RULE}\n\n"),
        item="Reference: {reference}", answer="json_list"),
    JudgePrompt(
        role="coverage", version="coverage-v1",
        shared=("Here is a caption of an image:\n\n{caption}\n\nDoes the caption state the "
                "piece of information below? A paraphrase or a synonym counts; information that "
                f"the caption leaves out or contradicts does not. {_YES_NO_RULE}\n\n"),
        item="Information: {unit}", answer="yes_no"),
    *[_linguistic(c) for c in LINGUISTIC_CRITERIA],
]}

# Which prompts each reward uses (for the run's metrics).
REWARD_ROLES = {
    "precision": ("decompose_caption", "verify", "pointable"),
    "recall": ("decompose_reference", "coverage"),
    "linguistic": tuple(LINGUISTIC_CRITERIA),
}


def get_prompt(role: str) -> JudgePrompt:
    if role not in PROMPTS:
        raise KeyError(f"no judge prompt for role {role!r}; known: {sorted(PROMPTS)}")
    return PROMPTS[role]


def render(role: str, **fields: str) -> tuple[str, str]:
    """(shared, item) texts of `role`'s prompt."""
    return get_prompt(role).render(**fields)


def prompt_versions(rewards: Iterable[str] = tuple(REWARD_ROLES)) -> dict[str, str]:
    """{role: version} of every prompt the given rewards use, for the run's metrics/config."""
    out = {}
    for r in rewards:
        if r not in REWARD_ROLES:
            raise KeyError(f"unknown reward {r!r}; known: {sorted(REWARD_ROLES)}")
        out.update({role: PROMPTS[role].version for role in REWARD_ROLES[r]})
    return out
