"""Using trained models: `run_dir` (open a run directory), `decoding` (cached generation),
`convert` (the authors' weights and config.json), `hf_files` (their directory format)."""
