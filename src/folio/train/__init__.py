"""Training: the loop, optimizers and schedules, loss estimation, and the speed bench."""
