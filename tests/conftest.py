"""Fixtures shared by the test modules (plain helpers: `run_helpers`, `data_helpers`).

`fast_compilation` is not autouse: a module that trains opts in with
`pytestmark = pytest.mark.usefixtures("fast_compilation")`, so the numerical tests of
other modules keep XLA's default optimisation passes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache
from run_helpers import jax_cache_dir, jax_cache_env, shared_trained_run


@pytest.fixture(scope="module")
def fast_compilation(tmp_path_factory):
  """Within a module: no slow XLA passes, and a persistent cache shared by the session."""
  settings = {
    "jax_compilation_cache_dir": str(jax_cache_dir(tmp_path_factory)),
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
    "jax_disable_most_optimizations": True,
  }
  previous = {name: jax.config.values[name] for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # re-read the cache directory
  yield
  for name, value in previous.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def reference_run(fast_compilation, tmp_path_factory) -> Path:
  """The session's workdir of `small_config()` trained for its 30 steps in one go (read only)."""
  del fast_compilation  # requested so that the run is compiled as the tests' own runs are
  return shared_trained_run(tmp_path_factory)


@pytest.fixture
def run_copy(reference_run, tmp_path) -> Path:
  """A writable copy of the 30-step reference run."""
  return Path(shutil.copytree(reference_run, tmp_path / "run"))


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
  """Environment variables giving a CLI subprocess the settings of `fast_compilation`."""
  return jax_cache_env(tmp_path_factory)
