"""The training loop any Stage runs in: distribution, compiled steps, progress, checkpoints, faults."""
