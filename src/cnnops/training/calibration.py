"""Temperature scaling (Guo et al., ICML 2017): one scalar T, fitted on the validation split, that
divides the logits so the softmax confidence matches accuracy; the argmax never changes.

scipy's bounded scalar minimiser on log T does the fit (one parameter needs no torch optimiser);
the fitted T travels into the exported ONNX graph (export.onnx_model.Tempered).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

log = logging.getLogger(__name__)

TEMPERATURE_RANGE = (0.05, 20.0)  # beyond it the logits carry almost nothing or everything saturates


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    scaled = log_softmax(logits.astype(np.float64) / temperature, axis=1)
    return float(-scaled[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE minimising the NLL of `labels` (held-out data: never the test split)."""
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    fit = minimize_scalar(lambda t: nll(logits, labels, math.exp(t)), bounds=(low, high), method="bounded")
    temperature = math.exp(fit.x)
    if min(abs(fit.x - low), abs(fit.x - high)) < 1e-3:
        log.warning(
            "temperature scaling: the fitted temperature %.3g sits at the edge of %s on %d validation "
            "images; the calibration is unreliable (more validation images help)",
            temperature,
            TEMPERATURE_RANGE,
            len(labels),
        )
    return temperature


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits.astype(np.float64) / temperature, axis=1))
