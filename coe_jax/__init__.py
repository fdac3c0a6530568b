"""Chain-of-Experts in JAX/Flax."""

from coe_jax.model_config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig"]
__version__ = "0.1.0"
