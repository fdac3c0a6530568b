"""Experiment drivers: the paper's ablation suite (`experiments.ablation`)."""
