"""Prefect flows and deployments of cnnops: when and where the DVC pipeline runs.

`pipelines.flows` holds the flows (`reproduce`, `retrain`), `pipelines.deploy` serves or deploys them
on a schedule, and `python -m pipelines` runs either from a shell. DVC owns the DAG: flows run it
through `dvc repro`, never the stage code itself.
"""

import logging

# What the helpers log to: a Prefect run logger inside a flow, a plain logger elsewhere.
Logger = logging.Logger | logging.LoggerAdapter
