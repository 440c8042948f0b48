"""A stage's paths dataclass is its command line: each field says its flag and help once.

`dvc.yaml` passes every path on the command line; declaring the flag beside the field (with the
default dvc.yaml uses) means the parser, the defaults and the dataclass cannot drift apart, and
`add_parser` in a stage is two calls instead of a flag per path.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
POSITIONAL = ""  # `flag` of the one positional path (the stage's main input)


def path_arg(default: str | None, help: str, flag: str | None = None) -> Any:
    """A paths-dataclass field on the command line: `flag` (default `--<field-name>`), or POSITIONAL."""
    value = None if default is None else Path(default)
    return field(default=value, metadata={"help": help, "flag": flag})


def add_path_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field declared with `path_arg`, its default the dataclass's."""
    for f in _cli_fields(cls):
        flag, help_text = f.metadata["flag"], f"{f.metadata['help']} (default: %(default)s)"
        if flag == POSITIONAL:
            parser.add_argument(
                f.name, metavar=f.name.upper(), type=Path, nargs="?", default=f.default, help=help_text
            )
        else:
            name = flag or "--" + f.name.replace("_", "-")
            parser.add_argument(name, dest=f.name, type=Path, default=f.default, help=help_text)


def paths_from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """The dataclass from the parsed arguments (plus fields that are not on the command line)."""
    return cls(**{f.name: getattr(args, f.name) for f in _cli_fields(cls)}, **extra)


def _cli_fields(cls: type) -> list[Field]:
    return [f for f in fields(cls) if "help" in f.metadata and f.default is not MISSING]
