"""The GGM process in plain tensors (torch only): noise schedule, noise law, forward process, loss,
sampler and the exact small-state references the tests check them against."""
