"""Pure, jittable RL math: advantages, length control, the policy loss. No I/O, no models."""
