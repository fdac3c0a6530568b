"""The README's "use the layer in your own model" snippets run exactly as printed.

They run in a subprocess with 4 CPU devices. The linen and NNX snippets run
three times: with no mesh, inside `jax.set_mesh` of a mesh whose axes have
other names, and inside one named like ours (`data`, `fsdp`, `expert`); the
layer must compute the same thing every time (no ambient-mesh detection). The
expert-parallel snippet (its own mesh, experts split over 4 devices) must equal
the same layer without `expert_parallel`, also inside a host's logical axis
rules (whose activation marks must stay out of shard_map); the host-rules snippet (its own
2 x 2 mesh and logical axis rules, the experts' `mlp` axis tensor-parallel) the
plain layer on the same params.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Using the CoE layer in your own Flax model"


def readme_snippets() -> list[str]:
  text = (REPO / "README.md").read_text(encoding="utf-8")
  section = text[text.index(SECTION) :]
  section = section[: section.index("\n## ", len(SECTION))]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_worker(out_path: str) -> None:
  import flax.linen as nn
  import jax

  auto = jax.sharding.AxisType.Auto
  meshes = {
    "none": None,
    "other_names": jax.make_mesh((2, 2), ("rows", "cols"), axis_types=(auto,) * 2),
    "our_names": jax.make_mesh((2, 1, 2), ("data", "fsdp", "expert"), axis_types=(auto,) * 3),
  }
  host_rules = (("batch", "devices"), ("mlp", "devices"))  # a host's rules around shard_map
  results = {}
  for i, code in enumerate(readme_snippets()):
    if "ExpertParallel" in code:  # its own mesh; also inside a host's logical axis rules
      settings = {"none": None, "host_rules": lambda: nn.logical_axis_rules(host_rules)}
    elif "jax.make_mesh" in code:  # its own mesh and rules
      settings = {"none": None}
    else:  # under every host mesh
      settings = {n: m and (lambda m=m: jax.set_mesh(m)) for n, m in meshes.items()}
    for name, context in settings.items():
      namespace: dict = {}
      with context() if context else contextlib.nullcontext():
        exec(code, namespace)
      results[f"{i}/{name}"] = _row(namespace)
  Path(out_path).write_text(json.dumps(results))


def _row(namespace: dict) -> dict:
  """A snippet's output `y`, and the plain layer's output where the snippet sharded it."""
  import flax.linen as nn
  import jax

  from coe_jax import CoELayer

  row = {"y": np.asarray(namespace["y"]).tolist()}
  if "parallel" in namespace:  # the same layer without expert parallelism
    plain, _ = CoELayer(namespace["cfg"]).apply(namespace["params"], namespace["x"], train=True)
    row["plain"] = np.asarray(plain).tolist()
  if "rules" in namespace:  # the plain layer on the host's params, copied to the host
    params = jax.tree.map(np.asarray, namespace["params"])
    x = np.asarray(namespace["x"])
    plain, _ = CoELayer(namespace["cfg"]).apply({"params": params}, x, train=True)
    row["plain"] = np.asarray(plain).tolist()
    boxes = nn.get_partition_spec(namespace["variables"])["params"]["coe"]
    shardings = jax.tree.map(lambda a: a.sharding.spec, namespace["params"])
    row["mlp_split"] = [  # each param with an `mlp` axis: is that axis split over `tensor`?
      spec[names.index("mlp")] == "tensor"
      for names, spec in zip(jax.tree.leaves(boxes), jax.tree.leaves(shardings))
      if "mlp" in names
    ]
  return row


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("readme") / "results.json"
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    # 4 devices; compiled without XLA's slow passes: the snippets' values, not their speed, count
    XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    " --xla_llvm_disable_expensive_passes=true",
    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
  )
  proc = subprocess.run(
    [sys.executable, __file__, str(out)],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return {
    k: {n: np.asarray(v) for n, v in row.items()} for k, row in json.loads(out.read_text()).items()
  }


def test_readme_has_the_four_snippets():
  snippets = readme_snippets()
  assert len(snippets) == 4
  assert "nn.compact" in snippets[0] and "nnx.bridge" in snippets[1]
  assert "ExpertParallel" in snippets[2]
  assert "nn.logical_axis_rules" in snippets[3] and '("mlp", "tensor")' in snippets[3]


@pytest.mark.parametrize("snippet", [0, 1])
@pytest.mark.parametrize("mesh", ["other_names", "our_names"])
def test_a_host_mesh_does_not_change_what_the_layer_computes(results, snippet, mesh):
  np.testing.assert_array_equal(results[f"{snippet}/{mesh}"]["y"], results[f"{snippet}/none"]["y"])


@pytest.mark.parametrize("context", ["none", "host_rules"])
def test_expert_parallel_equals_the_plain_layer(results, context):
  # host_rules: inside a host's `nn.logical_axis_rules`, whose marks stay out of shard_map
  row = results[f"2/{context}"]
  assert np.abs(row["y"]).max() > 0
  np.testing.assert_allclose(row["y"], row["plain"], rtol=1e-5, atol=1e-6)


def test_a_host_with_its_own_rules_gets_the_plain_layers_output(results):
  row = results["3/none"]
  # routed gate/up/down and shared gate/up/down: all six split on `mlp` over `tensor`
  assert row["mlp_split"].tolist() == [True] * 6
  assert np.abs(row["y"]).max() > 0
  np.testing.assert_allclose(row["y"], row["plain"], rtol=1e-5, atol=1e-6)


def test_expert_parallel_rejects_unknown_and_explicit_axes():
  import jax

  from coe_jax import ExpertParallel

  auto = jax.make_mesh((1,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match=r"axes \['expert'\] are not in the mesh's \['devices'\]"):
    ExpertParallel(auto, batch_axes=("devices",), expert_axis="expert")
  explicit = jax.make_mesh((1,), ("devices",), axis_types=(jax.sharding.AxisType.Explicit,))
  with pytest.raises(ValueError, match="AxisType.Explicit"):
    ExpertParallel(explicit, batch_axes=("devices",))


if __name__ == "__main__":
  run_worker(sys.argv[1])
