"""Evaluation: loading checkpoints and generating from them, metrics, judges, FID, image grids, plots."""
