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
    """The T in TEMPERATURE_RANGE minimising the NLL of `labels` (held-out data: never the test split).

    A fit that ends at an edge of the range is no estimate: with every validation image right the NLL
    falls for ever as T shrinks, and baking the edge in would make the rare error maximally
    confident. Then T = 1 is kept (the model's own logits) and a warning says why.
    """
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    fit = minimize_scalar(lambda t: nll(logits, labels, math.exp(t)), bounds=(low, high), method="bounded")
    # the bounded search stops short of an edge it runs to (T 0.055 for 0.05): an edge that scores no
    # worse than the fit is where the minimum is
    if min(nll(logits, labels, math.exp(edge)) for edge in (low, high)) <= fit.fun:
        log.warning(
            "temperature scaling: the fit on %d validation images ran to the edge of %s (T %.3g), so it "
            "is not applied: T = 1 is kept; more validation images, or some the model gets wrong, let "
            "it fit",
            len(labels),
            TEMPERATURE_RANGE,
            math.exp(fit.x),
        )
        return 1.0
    return math.exp(fit.x)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits.astype(np.float64) / temperature, axis=1))
