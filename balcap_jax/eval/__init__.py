"""Evaluation metrics (host side): b-CapScore (capscore.py); with a pluggable judge
(judges.py: an LLM through the rewards' judge backends, or ShapesWorld's exact judge)
CaptionQA-style QA accuracy (qa.py), DCScore-style fact P/R/F1 (facts.py) and CapArena-style
pairwise scores (pairwise.py); the HTML report (report.py). balcap_jax.evaluate runs them."""
from balcap_jax.eval.capscore import CapScoreDetails, b_capscore, b_capscore_details

__all__ = ["CapScoreDetails", "b_capscore", "b_capscore_details"]
