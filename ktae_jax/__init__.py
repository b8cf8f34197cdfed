"""ktae_jax: GRPO / DAPO / KTAE reinforcement learning for math reasoning in JAX."""

__version__ = "0.1.0"
