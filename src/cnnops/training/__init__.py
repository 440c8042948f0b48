"""Training: the loops (engine), optimizer and schedule, ranks, resume state, progress, metrics, plots."""
