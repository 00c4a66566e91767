"""Training: the RL trainer and its parts, and the supervised warm start.

- trainer.py   RunParts, TrainState, Trainer: rollout -> score -> advantages -> update
- step.py      RLStep: the jitted log-prob, gradient and update functions
- rollouts.py  length control, update widths, prompt rows, decoded captions
- optim.py     the optimiser, with an optional frozen vision tower
- sft.py       SFT: supervised cross-entropy on (prompt, caption) pairs
"""
from balcap_jax.rl import loss as loss_lib
from balcap_jax.train.optim import freeze_vision_tower, is_vision_path, make_optimizer
from balcap_jax.train.rollouts import (
                                       completion_text,
                                       gather_rows,
                                       rollout_rewards,
                                       update_width,
                                       word_count,
)
from balcap_jax.train.step import RLStep, _loss_fn  # noqa: F401  (tests differentiate it)
from balcap_jax.train.trainer import RunParts, Trainer, TrainState

__all__ = ["TrainState", "RunParts", "Trainer", "RLStep", "make_optimizer",
           "freeze_vision_tower", "is_vision_path", "word_count", "rollout_rewards",
           "update_width", "gather_rows", "completion_text", "loss_lib"]
