"""Using trained models: `run_dir` (open a run directory), `decoding` (cached generation), `completion` (text in, text out),
`convert` (the authors' weights and config.json), `hf_files` (their directory format)."""
