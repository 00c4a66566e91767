"""balcap_jax: BalCapRL (balanced-reward RL for image captioners) in JAX/Flax."""

__version__ = "0.1.0"
