"""Training: `train` (the loop), `train_step` (pure train/eval steps), `optimizer`,
`checkpoint` (Orbax, resume checks), `metrics` (logs, TensorBoard, W&B), `sharding`
(mesh, sharded state, per-process batches, the coordinated stop)."""
