"""`cnnops <command>`: parse arguments, load params once, hand over to the command's module.

Each command module exposes `add_parser(subparsers)`, which registers its arguments and sets
`handler(args, params) -> int`. Stage logic lives in the stage modules, never here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence

from cnnops import __version__
from cnnops.config import DEFAULT_PARAMS, load_params
from cnnops.errors import TRANSIENT_EXIT, CnnopsError, is_transient

# Command name -> module that registers it, in the order `cnnops --help` lists them.
COMMANDS = {
    "validate": "cnnops.stages.validate",
    "check-incoming": "cnnops.stages.incoming",
    "prepare": "cnnops.stages.prepare",
    "train": "cnnops.stages.train",
    "evaluate": "cnnops.stages.evaluate",
    "audit": "cnnops.stages.audit",
    "cure": "cnnops.stages.cure",
    "export": "cnnops.stages.export",
    "release": "cnnops.stages.release",
    "predict": "cnnops.export.predict",
    "serve": "cnnops.stages.serve",
    "summary": "cnnops.stages.summary",
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


# C0 controls but tab and newline, DEL, C1 (CSI, OSC as one byte), the bidi overrides that reorder
# text, and lone surrogates (a non-UTF-8 file name as Python decodes it; unencodable on stderr).
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: object) -> str:
    """`text` as the terminal may show it: names and paths are user input, and an ANSI or OSC escape
    in one would recolour, retitle or hyperlink the terminal, so control characters are written as
    \\xNN (\\uNNNN past U+00FF). Rich output takes it as `Text(printable(...))`, which
    never parses markup."""
    return _UNPRINTABLE.sub(_escape, str(text))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class _PrintableFormatter(logging.Formatter):
    """Every log line goes through `printable`, whatever the message and its arguments hold."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


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
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        # stderr, like the plain handler (Rich's default console is stdout, where JSON and CSV go);
        # markup=False: a message is never parsed, whatever names and paths it holds.
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(_PrintableFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
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
        print(f"cnnops {args.command}: error: {printable(exc)}", file=sys.stderr)
        return TRANSIENT_EXIT if is_transient(exc) else 1
    except KeyboardInterrupt:
        print(f"cnnops {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug keeps its traceback and status; a server that did not answer says so
        if not is_transient(exc):
            raise
        traceback.print_exc()
        print(
            f"cnnops {args.command}: error: {printable(f'{type(exc).__name__}: {exc}')} (a server or "
            "database did not answer: worth running again)",
            file=sys.stderr,
        )
        return TRANSIENT_EXIT


if __name__ == "__main__":
    sys.exit(main())
