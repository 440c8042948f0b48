"""Tracking: the MLflow run, lineage (git commit, data version) and the Model Registry."""
