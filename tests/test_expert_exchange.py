"""Dropless expert parallelism moving exactly the routed rows (coe_jax.nn.expert_exchange).

Runs in a subprocess with 8 CPU devices (the device count is fixed when jax is imported):
this file as a script prints the comparison as JSON. On CPU the exchange is the padded
all_to_all stand-in of `ragged_all_to_all` (XLA:CPU lacks it); the layout is the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def _compare() -> dict:
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  from coe_jax.nn.dispatch import dispatch_to_experts
  from coe_jax.nn.experts import SwiGLUWeights

  rng = np.random.default_rng(0)
  t, d, f, n, k = 32, 16, 8, 8, 3
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  ids = np.stack([rng.permutation(n)[:k] for _ in range(t)]).astype(np.int32)
  ids[:12] = (0, 1, 2)  # skewed: device 0's experts take most rows
  ids = jnp.asarray(ids)
  cw = jnp.asarray(rng.uniform(0.1, 1, size=(t, k)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=t) > 0.2)
  shapes = ((n, d, f), (n, d, f), (n, f, d))
  w = SwiGLUWeights(*(jnp.asarray(0.3 * rng.normal(size=s), jnp.float32) for s in shapes))
  mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rows = P(("data", "expert"))

  def run(x_, ids_, cw_, w_, mask_, axis=None):
    return dispatch_to_experts(
      x_, ids_, cw_, w_, mode="dropless", capacity=0, token_mask=mask_, expert_axis=axis
    ).output

  def split(x_, cw_, w_):
    fn = lambda *a: run(*a, axis="expert")
    specs = (rows, rows, rows, P("expert"), rows)
    fn = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=rows)
    return jnp.sum(jnp.sin(fn(x_, ids, cw_, w_, mask)))

  def single(x_, cw_, w_):
    return jnp.sum(jnp.sin(run(x_, ids, cw_, w_, mask)))

  grad = lambda fn: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
  (value, grads), (want, want_grads) = grad(split)(x, cw, w), grad(single)(x, cw, w)
  errors = [
    float(jnp.max(jnp.abs(a - b))) for a, b in zip(*map(jax.tree.leaves, (grads, want_grads)))
  ]
  hlo = jax.jit(jax.grad(split)).lower(x, cw, w).compile().as_text()
  return dict(value=float(value), want=float(want), grad_errors=errors, a2a="all-to-all" in hlo)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
  out = tmp_path_factory.mktemp("exchange") / "out.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  repo = Path(__file__).resolve().parents[1]
  env["PYTHONPATH"] = os.pathsep.join([str(repo), str(repo / "tests"), env.get("PYTHONPATH", "")])
  subprocess.run([sys.executable, __file__, str(out)], env=env, check=True, timeout=600)
  return json.loads(out.read_text())


def test_split_experts_equal_one_device_forward_and_gradients(results):
  np.testing.assert_allclose(results["value"], results["want"], rtol=1e-5)
  assert max(results["grad_errors"]) < 1e-5, results["grad_errors"]
  assert results["a2a"]


if __name__ == "__main__":
  Path(sys.argv[1]).write_text(json.dumps(_compare()))
