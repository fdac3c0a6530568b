"""experiments/tile_matmuls.py: the forms it times are the tile's products, and its table."""

import json

import jax.numpy as jnp
import numpy as np
from run_helpers import run_cli

from experiments import tile_matmuls


def _product(name, arrays):
  spec, names = {f[0]: f[1:] for f in tile_matmuls.FORMS}[name]
  return np.asarray(jnp.einsum(spec, *(arrays[n] for n in names)))


def test_feature_major_forms_are_the_same_products_transposed():
  arrays = tile_matmuls.operands(experts=2, hidden=8, inter=6, rows=5)
  for rows_form, feature_form in [
    ("bwd d_h = dy @ down^T", "feature-major d_h^T = down @ dy^T"),
    ("bwd d_x = d_g @ gate^T", "feature-major d_x^T = gate @ d_g^T"),
    ("fwd x @ gate", "feature-major fwd h^T = gate^T @ x^T"),
  ]:
    np.testing.assert_allclose(
      _product(feature_form, arrays),
      np.swapaxes(_product(rows_form, arrays), 1, 2),
      rtol=1e-5,
      atol=1e-4,
    )


def test_the_tile_loop_computes_the_batched_product():
  arrays = tile_matmuls.operands(experts=3, hidden=8, inter=6, rows=5)
  for _, spec, names in tile_matmuls.FORMS:
    args = [arrays[n] for n in names]
    np.testing.assert_allclose(
      tile_matmuls._tile_loop(spec, *args), tile_matmuls._batched(spec, *args), rtol=1e-5, atol=1e-4
    )


def test_the_command_times_every_form_at_every_height(tmp_path, cli_env):
  out = tmp_path / "tiles.json"
  args = ["--experts=2", "--hidden=16", "--inter=8", "--rows=4,8", "--probe=32"]
  proc = run_cli(
    "experiments.tile_matmuls", *args, "--steps=1", "--warmup=0", f"--json={out}", env=cli_env
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert [(r["form"], r["rows"], r["batched"]) for r in results["table"]] == [
    (name, rows, batched)
    for rows in (4, 8)
    for name, _, _ in tile_matmuls.FORMS
    for batched in (True, False)
  ]
  assert all(r["gflops"] > 0 for r in results["table"]) and results["probe_gflops"] > 0
  assert "| tile loop: bwd d_gate = x^T @ d_g |" in proc.stdout
