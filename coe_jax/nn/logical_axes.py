"""Logical axis names of every parameter and key activation (DESIGN.md 11).

Params are created boxed with their names (`param_init`), the way flax's
`nn.with_logical_partitioning` does, so a host codebase lays our layer out with
its own rules: `nn.get_partition_spec(jax.eval_shape(model.init, ...))` gives
each param's names and `nn.logical_to_mesh_sharding(specs, mesh, rules)` its
sharding (MaxText's `logical_axis_rules`, flax lm1b). Modules read plain arrays
(`self.param` unboxes); code that keeps a param tree (the train state,
checkpoints, export) unboxes it once with `nn.meta.unbox`. Our own layouts
(data, fsdp, expert) are rules over these names in `coe_jax.training.sharding`.

Names (a rank-1 or flattened axis takes the name of what it indexes):

  batch, length   rows and positions of activations
  embed           the model width (hidden_size): residual stream, weights' hidden axis
  mlp             an expert's intermediate axis (routed and shared experts)
  expert          the stacked routed experts [N_routed, ...] and per-expert buffers
  heads           attention heads; in q_proj / kv_b_proj / o_proj the flattened
                  head-major [heads x head_dim] axis (a split into n | H parts keeps whole heads)
  kv              per-head query / key / value features of attention activations
  kv_lora         MLA's compressed key-value latent (kv_lora_rank [+ rope])
  vocab           the vocabulary (embedding rows, head columns, logits)
  norm            RMSNorm scales (MaxText's name; replicated by our rules)
  chain           the router's [C] axis (one router per CoE iteration)
  expert_logits   the router's per-expert rows (kept whole: each device routes every expert)
  layers          scan_layers' stacked leading [num_layers] axis

`constrain` marks activations; it does nothing unless the caller set rules
(`nn.logical_axis_rules`) and a mesh, so the layer computes as plain JAX under
any host mesh, and nothing inside `shard_map`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

BATCH, LENGTH, EMBED, MLP, EXPERT = "batch", "length", "embed", "mlp", "expert"
HEADS, KV, KV_LORA, VOCAB, NORM = "heads", "kv", "kv_lora", "vocab", "norm"
CHAIN, EXPERT_LOGITS, LAYERS = "chain", "expert_logits", "layers"

Names = Sequence[str | None]


class LogicalAxes(nn.LogicallyPartitioned):
  """`nn.LogicallyPartitioned` whose NNX form is never sharded at creation.

  NNX (e.g. through `nnx.bridge.ToNNX`) shards a variable as soon as it is made
  when its metadata names axes; with logical names and no rules for every one
  of them that fails. Linen never places an array at creation, and neither do
  we: the names stay in the NNX metadata (`out_sharding`), placing is the host's.
  """

  def to_nnx_metadata(self) -> dict[str, Any]:
    metadata = dict(vars(self))
    metadata["out_sharding"] = metadata.pop("names")
    metadata["sharding_rules"] = metadata.pop("rules")
    metadata["eager_sharding"] = False
    return metadata


def param_init(init: Callable[..., jax.Array], names: Names) -> Callable[..., LogicalAxes]:
  """`init` whose result is boxed with the logical `names` of its axes (one per axis)."""

  def boxed(*args, **kwargs) -> LogicalAxes:
    return LogicalAxes(init(*args, **kwargs), tuple(names))

  return boxed


def constrain(x: jax.Array, names: Names) -> jax.Array:
  """`nn.with_logical_constraint(x, names)` where the caller set rules and a mesh; else `x`.

  Skipped inside `shard_map` (manual mesh axes: the arrays there are per device).
  """
  if not nn.get_logical_axis_rules():
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return x
  return nn.with_logical_constraint(x, tuple(names))
