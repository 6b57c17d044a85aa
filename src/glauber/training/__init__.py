"""Training: building and running the Lightning Trainer, its callbacks, checkpoints and the VQ trainer."""
