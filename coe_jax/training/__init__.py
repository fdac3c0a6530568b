"""Training: `train` (the loop), `train_config` (validation), `train_step` (pure steps), `optimizer`,
`checkpoint` (Orbax, resume checks), `metrics` (logs, TensorBoard, W&B), `sharding`
(mesh, sharded state, per-process batches), `multihost` (jax.distributed, the stop vote).
The loop's pieces: `metric_pipeline`, `stop`, `profiling`, `schedule`, `validation`, `run_summary`."""
