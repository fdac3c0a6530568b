"""Bad input and failed runs at the command line: one line, the right exit code, nothing changed.

`error: <field or file>: <what> ; <what is allowed>` with exit code 2 for a usage error and 1 for
a run that cannot go on, no traceback unless `--verbose`, no library logs (`coe_jax.cli`). The
CLI helpers and the shrunk run come from `run_helpers` and conftest.py.
"""

from __future__ import annotations

import errno
import os
import re

import pytest
from run_helpers import STEPS, cli_flags, one_error_line, run_cli, tree

from coe_jax import cli, storage
from coe_jax.errors import ConfigError, WorkdirLocked

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fast_compilation")]  # CLI runs


def test_an_unknown_config_field_names_the_nearest_before_anything_runs(run_copy, cli_env):
  before = tree(run_copy)
  result = run_cli(
    "coe_jax.main", f"--workdir={run_copy}", *cli_flags(), "--config.train.stpes=5", env=cli_env
  )
  assert one_error_line(result, 2) == (
    "error: --config.train.stpes: unknown config field 'stpes' ; did you mean config.train.steps?"
  )
  assert tree(run_copy) == before


@pytest.mark.parametrize(
  "args, line",
  [
    (["--config=configs/coe_c2.py:huge"], "error: config argument (scale): got 'huge'; allowed"),
    (["--config=configs/nope.py"], "error: --config: configs/nope.py does not exist ; "),
    (["--config=configs/coe_c2.py:tiny", "--stpes=3"], "error: Unknown command line flag 'stpes'"),
    (
      ["--config=configs/coe_c2.py:tiny", "--config.train.steps=abc"],
      "error: flag --config.train.steps=abc: invalid literal for int()",
    ),
    (["--config=configs/coe_c2.py:tiny", "extra"], "error: unexpected arguments: ['extra']"),
    (
      ["--config=configs/coe_c2.py:tiny", "--config.mesh.cpu_devices=-1"],
      "error: mesh.cpu_devices: got -1; must be an integer >= 0 (0 = auto",
    ),
    ([], "error: flag --config=None: Flag --config must have a value other than None."),
  ],
)
def test_bad_flags_are_one_line_and_exit_code_2(tmp_path, cli_env, args, line):
  result = run_cli("coe_jax.main", f"--workdir={tmp_path / 'run'}", *args, env=cli_env)
  assert one_error_line(result, 2).startswith(line)
  assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, cli_env):
  file = tmp_path / "notes.txt"
  file.write_text("mine")
  result = run_cli("coe_jax.main", f"--workdir={file}", *cli_flags(), env=cli_env)
  assert one_error_line(result, 2).startswith(f"error: --workdir: {file} is a file")
  assert file.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_an_empty_training_file_says_empty_and_leaves_no_data_cache(tmp_path, cli_env):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  workdir = tmp_path / "run"
  files = [f"--config.data.{f}={empty}" for f in ("train_files", "val_files")]
  result = run_cli(
    "coe_jax.main",
    f"--workdir={workdir}",
    *cli_flags(),
    "--config.data.source=json",
    *files,
    env=cli_env,
  )
  line = one_error_line(result, 2)
  assert line.startswith(f"error: data.train_files: {empty}: empty (no rows) ; ")
  assert not workdir.exists()


def test_divergence_is_one_line_naming_the_step_the_loss_and_the_checkpoint_kept(run_copy, cli_env):
  result = run_cli(
    "coe_jax.main",
    f"--workdir={run_copy}",
    *cli_flags(train__steps=60, train__lr=1e4),
    env=cli_env,
  )
  line = one_error_line(result, 1)
  found = re.match(
    r"error: train/loss: (nan|-?inf|[-+.e\d]+) at step (\d+) \(gradient norm .*\); stopping ; "
    r"the last good checkpoint \(step (\d+)\) is intact under ",
    line,
  )
  assert found and int(found.group(2)) > STEPS, line
  kept = found.group(3)
  assert int(kept) >= STEPS and (run_copy / "checkpoints" / kept / "state").is_dir()


def test_generate_prints_the_answer_without_library_logs(reference_run, cli_env):
  result = run_cli(
    "coe_jax.generate",
    f"--workdir={reference_run}",
    "--query=What is 1 + 2?",
    "--max_new_tokens=4",
    env=cli_env,
  )
  assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
  assert result.stdout.startswith("query : What is 1 + 2? response :")


@pytest.mark.parametrize(
  "module, args, line",
  [
    ("coe_jax.evaluate", ["--task=gsm8k"], "error: --task=gsm8k: pass --data=PATH to a jsonl"),
    ("coe_jax.evaluate", ["--data={empty}"], "error: --data: {empty}: empty (no rows) ; "),
    ("coe_jax.generate", ["--query=Hi", "--step=7"], "error: --step: got 7; no such checkpoint"),
    ("coe_jax.generate", [], "error: --query: missing ; "),
  ],
)
def test_readers_bad_input_is_one_line_and_changes_nothing(
  reference_run, tmp_path, cli_env, module, args, line
):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  before = tree(reference_run)
  args = [a.format(empty=empty) for a in args]
  result = run_cli(module, f"--workdir={reference_run}", *args, env=cli_env)
  assert one_error_line(result, 2).startswith(line.format(empty=empty))
  assert tree(reference_run) == before


def test_verbose_adds_the_traceback_above_the_one_line(tmp_path, cli_env):
  file = tmp_path / "notes.txt"
  file.write_text("mine")
  result = run_cli("coe_jax.main", f"--workdir={file}", *cli_flags(), "--verbose", env=cli_env)
  assert result.returncode == 2 and "Traceback (most recent call last)" in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: --workdir: ")


def test_only_user_errors_and_failed_writes_lose_their_traceback():
  assert cli.user_error(ConfigError("train.lr: got -1.0; must be > 0")) == (
    2,
    "train.lr: got -1.0; must be > 0",
  )
  assert cli.user_error(WorkdirLocked("held")) == (1, "held")
  full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
  assert cli.user_error(full) == (1, "/runs/x/metrics.jsonl: no space left on device")
  orbax_text = ValueError("Failed writing: \"/runs/x/f\": No space [os_error_code='28']")
  assert storage.problem(orbax_text) == ("/runs/x/f", "no space left on device")
  for bug in (KeyError("model"), ValueError("shapes"), TypeError("None")):
    assert cli.user_error(bug) is None
