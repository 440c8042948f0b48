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

# Modules that register a subcommand, in the order `cnnops --help` lists them.
COMMAND_MODULES = (
    "cnnops.stages.validate",
    "cnnops.stages.prepare",
    "cnnops.stages.train",
    "cnnops.stages.evaluate",
    "cnnops.stages.audit",
    "cnnops.planted",
    "cnnops.example",
    "cnnops.stages.export",
    "cnnops.stages.release",
    "cnnops.predict",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnops", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cnnops {__version__}")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
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


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    args = build_parser().parse_args(argv)
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
