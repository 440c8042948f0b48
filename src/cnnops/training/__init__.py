"""Training: the loops (engine), optimizer and schedule, ranks, resume state, metrics, plots."""
