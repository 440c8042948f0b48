"""The errors cnnops raises for things a user can fix.

Every message names the file, key or value at fault and says what to do; the CLI prints it
without a traceback and exits 1.
"""


class CnnopsError(Exception):
    """Base class: a problem the user can act on, reported without a traceback."""


class ConfigError(CnnopsError):
    """params.yaml (or an override) has an unknown key, a wrong type or an out-of-range value."""


class DataError(CnnopsError):
    """The images under data/ break the data contract (unreadable, empty class, one class, ...)."""


class ValidationFailed(DataError):
    """An error-level data expectation failed; the report names the offending files."""


class WeightsNotFoundError(CnnopsError):
    """Pretrained weights are not in TORCH_HOME (cnnops never downloads at run time), or the cached
    file there is not the published one (its sha256 or its contents are wrong)."""


class ExportError(CnnopsError):
    """The ONNX export or its parity check against PyTorch failed."""


class StageInputError(CnnopsError):
    """A stage's input (checkpoint, prepared split, report) is missing or from another run."""
