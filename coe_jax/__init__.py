"""Chain-of-Experts (Wang et al. 2025) in JAX/Flax.

The layer, for your own Flax model: `CoEConfig`, `CoELayer` (+ `CoEAux`), and
optionally `ExpertParallel`. The paper's LM: `ModelConfig`, `CoECausalLM`.
Training, data, generation and analysis live in their modules
(`coe_jax.train`, `coe_jax.data`, `coe_jax.inference`, `coe_jax.evaluation`, `coe_jax.analysis`, ...).
"""

from coe_jax.coe_config import CoEConfig
from coe_jax.coe_layer import CoEAux, CoELayer
from coe_jax.dispatch import DispatchOutput, dispatch_to_experts, expert_capacity
from coe_jax.errors import ConfigError, DataError
from coe_jax.expert_parallel import ExpertParallel
from coe_jax.experts import RoutedExperts, SharedExperts, SwiGLUWeights, swiglu
from coe_jax.model import CoECausalLM, ModelAux
from coe_jax.model_config import ModelConfig
from coe_jax.router import RouterOutput, route

__all__ = [
    "CoEAux", "CoECausalLM", "CoEConfig", "CoELayer", "ConfigError", "DataError",
    "DispatchOutput", "ExpertParallel", "ModelAux", "ModelConfig", "RoutedExperts",
    "RouterOutput", "SharedExperts", "SwiGLUWeights", "dispatch_to_experts", "expert_capacity",
    "route", "swiglu",
]
__version__ = "0.1.0"
