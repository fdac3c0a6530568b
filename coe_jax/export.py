"""Command line: export a run to the authors' Hugging Face format, or import their checkpoint.

    python -m coe_jax.export --workdir=RUN --out=DIR [--step=N] [--modeling_code=COE_CHECKOUT]
    python -m coe_jax.export --from_hf=DIR --out=RUN [--config=configs/coe_c2.py[:tiny]] \
        [--dispatch=dropless|capacity]

What is written and read: `coe_jax.inference.hf_files`.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from coe_jax import cli, host_memory
from coe_jax.inference.hf_files import IMPORT_DISPATCH, export_run, import_hf, override_flags

# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory to export (export mode).")
  flags.DEFINE_string(
    "out", None, "Output: the HF directory (export) or the new run directory (import)."
  )
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: latest).")
  flags.DEFINE_string(
    "modeling_code",
    None,
    "Export mode: a checkout of github.com/ZihanWang314/CoE (or the folder holding its "
    "configuration_coe.py and modeling_coe.py) to copy beside config.json, so that "
    "transformers loads the export with trust_remote_code=True.",
  )
  flags.DEFINE_string("from_hf", None, "Import mode: the authors' checkpoint directory.")
  flags.DEFINE_string("tokenizer", None, "Import mode: tokenizer.json to copy into the run.")
  flags.DEFINE_enum(
    "dispatch",
    IMPORT_DISPATCH,
    ["dropless", "capacity"],
    "Import mode: the imported run's routing ('dropless' = the authors').",
  )
  config_flags.DEFINE_config_file(
    "config", None, "Import mode: base run config (`file.py[:scale]`)."
  )
  flags.mark_flags_as_required(["out"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.from_hf:
    result = import_hf(f.from_hf, f.out, f.config, f.tokenizer, f.dispatch)
    print(
      f"Imported {f.from_hf} into {result['workdir']} (step 0).\nFine-tune with:\n"
      f"  python -m coe_jax.main --config=<the same config file> --workdir={f.out} "
      f"{override_flags(result['overrides'])}"
    )
    return
  if not f.workdir:
    raise app.UsageError("pass --workdir=RUN (export) or --from_hf=DIR (import)")
  paths = export_run(f.workdir, f.out, f.step, f.modeling_code)
  print(
    f"Exported step {paths.pop('step')} of {f.workdir}:\n"
    + "\n".join(f"  {k}: {v}" for k, v in paths.items())
  )


if __name__ == "__main__":
  host_memory.reexec_keeping_host_memory()  # CPU: reuse the step's memory (PERF.md 19)
  _define_flags()
  cli.run(main)  # one-line user errors, --verbose, quiet Orbax logs
