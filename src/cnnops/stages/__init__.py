"""The pipeline stages: one module each, `run(params, paths) -> result` plus its command line."""
