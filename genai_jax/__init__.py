"""genai-jax: pretraining, SFT, reward modelling and PPO for decoder-only transformers in JAX."""

__version__ = "0.1.0"
