"""Chain-of-Experts (Wang et al. 2025) in JAX/Flax.

The layer, for your own Flax model: `CoEConfig`, `CoELayer` (+ `CoEAux`), and
optionally `ExpertParallel`. The paper's LM: `ModelConfig`, `CoECausalLM`.
Training, data, generation and analysis live in their modules
(`coe_jax.training.train`, `coe_jax.data`, `coe_jax.inference`, `coe_jax.eval_tasks`, `coe_jax.analysis`, ...).
"""

from coe_jax.errors import ConfigError, DataError
from coe_jax.nn.coe_config import CoEConfig
from coe_jax.nn.coe_layer import CoEAux, CoELayer
from coe_jax.nn.dispatch import DispatchOutput, dispatch_to_experts, expert_capacity
from coe_jax.nn.expert_parallel import ExpertParallel
from coe_jax.nn.experts import RoutedExperts, SharedExperts, SwiGLUWeights, swiglu
from coe_jax.nn.model import CoECausalLM, ModelAux
from coe_jax.nn.model_config import ModelConfig
from coe_jax.nn.router import RouterOutput, route

__all__ = [
  "CoEAux",
  "CoECausalLM",
  "CoEConfig",
  "CoELayer",
  "ConfigError",
  "DataError",
  "DispatchOutput",
  "ExpertParallel",
  "ModelAux",
  "ModelConfig",
  "RoutedExperts",
  "RouterOutput",
  "SharedExperts",
  "SwiGLUWeights",
  "dispatch_to_experts",
  "expert_capacity",
  "route",
  "swiglu",
]
__version__ = "0.1.0"
