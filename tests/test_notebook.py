"""The gating notebook executes headless from a clean checkout (trains its own tiny models)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "gating.ipynb"
KERNEL_NAME = "coe_jax_test"


def _kernel_spec_for_this_python(directory: Path) -> None:
  """A kernel spec running ipykernel with this interpreter (the venv's); first on JUPYTER_PATH."""
  spec_dir = directory / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "coe_jax test kernel",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))


def _count_outputs(nb, output_type: str, mime: str = "") -> int:
  return sum(
    1
    for cell in nb.cells
    if cell.cell_type == "code"
    for out in cell.get("outputs", [])
    if out.output_type == output_type and (not mime or mime in out.get("data", {}))
  )


@pytest.mark.slow
def test_gating_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  _kernel_spec_for_this_python(tmp_path / "jupyter")
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  for name in ("GATING_COE_RUN", "GATING_MOE_RUN"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("GATING_TRAIN_STEPS", "30")  # the default 120 runs the same cells, slower
  monkeypatch.setenv("COE_JAX_CACHE", str(tmp_path / "cache"))  # nothing shared with other runs
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook trains in tempfile.mkdtemp()

  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
    "commit the notebook with its outputs cleared"
  )
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
  )
  client.execute()

  assert _count_outputs(nb, "error") == 0
  # Load (2 models), co-selection (2 layers), summary, logged metrics, drops (2 models).
  assert (
    _count_outputs(nb, "display_data", "image/png")
    + _count_outputs(nb, "execute_result", "image/png")
    >= 8
  )
  text = "".join(
    out.get("text", "")
    for cell in nb.cells
    if cell.cell_type == "code"
    for out in cell.get("outputs", [])
  )
  assert "trained C=2, K=2" in text and "trained C=1, K=4" in text
