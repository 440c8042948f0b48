"""`cnnops <command>`: parse arguments, load params once, hand over to the command's module.

Each command module exposes `add_parser(subparsers)`, which registers its arguments and sets
`handler(args, params) -> int`. Stage logic lives in the stage modules, never here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from cnnops import __version__
from cnnops.config import DEFAULT_PARAMS, load_params
from cnnops.errors import CnnopsError

# Command name -> module that registers it, in the order `cnnops --help` lists them.
COMMANDS = {
    "validate": "cnnops.stages.validate",
    "prepare": "cnnops.stages.prepare",
    "train": "cnnops.stages.train",
    "evaluate": "cnnops.stages.evaluate",
    "audit": "cnnops.stages.audit",
    "export": "cnnops.stages.export",
    "release": "cnnops.stages.release",
    "predict": "cnnops.export.predict",
    "make-example": "cnnops.data.example",
    "make-planted": "cnnops.data.planted",
}
# Third-party loggers that narrate their internals at INFO (the ONNX exporter's graph passes).
QUIET_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


def positive_int(text: str) -> int:
    """The argparse type of the commands' count options (--batch-size, --scale, ...): an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _chosen(argv: Sequence[str]) -> str | None:
    """The command named on the command line, if any; its module is the only one imported."""
    return next((COMMANDS[a] for a in argv if a in COMMANDS), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser with every command (for --help), or only the chosen one: importing every
    stage module pulls in torch, MLflow, Great Expectations and Prefect, seconds of start-up."""
    parser = argparse.ArgumentParser(prog="cnnops", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cnnops {__version__}")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    for name in COMMANDS.values() if chosen is None else (chosen,):
        importlib.import_module(name).add_parser(subparsers)
    return parser


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(show_path=False, markup=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)
    logging.captureWarnings(True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    setup_logging(args.verbose)
    try:
        params = load_params(args.params) if getattr(args, "needs_params", True) else None
        return int(args.handler(args, params) or 0)
    except CnnopsError as exc:
        print(f"cnnops {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cnnops {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
