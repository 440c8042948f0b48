"""cnnops: a reproducible training and release pipeline for CNN image classifiers."""

__version__ = "0.1.0"
