"""Evaluation metrics (host side). b-CapScore first; CaptionQA/DCScore/CapArena-style later."""
from balcap_jax.eval.capscore import CapScoreDetails, b_capscore, b_capscore_details

__all__ = ["CapScoreDetails", "b_capscore", "b_capscore_details"]
