"""`cnnops serve MODEL`: answer HTTP requests carrying image files with an exported model.

MODEL is an ONNX file written by `cnnops export`, or a registered version, `models:/<name>@champion`
or `models:/<name>/<version>`, looked up in the tracking store of params.yaml (or
MLFLOW_TRACKING_URI). `POST /predict` with files as multipart/form-data answers, per file, the
class, the probabilities and the model's name, version or path, and sha256, after exactly the
preprocessing of `cnnops predict`; `GET /health` and `GET /metadata` describe the model. Not a
DVC stage: it runs until interrupted.
"""

from __future__ import annotations

import argparse

from cnnops.cli import positive_int
from cnnops.config import load_params
from cnnops.data.decode import DEFAULT_MAX_PIXELS
from cnnops.export.predict import pixel_limit
from cnnops.export.serve import Limits, load_model, serve

MAX_PORT = 65535


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (1-{MAX_PORT})")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="answer HTTP requests carrying image files with an exported model", description=__doc__
    )
    parser.add_argument("model", help="an ONNX file, or models:/<name>@<alias> or models:/<name>/<version>")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=8000, help="port to bind (default: %(default)s)")
    parser.add_argument(
        "--max-files", type=positive_int, default=16, help="files a request may hold (default: %(default)s)"
    )
    parser.add_argument(
        "--max-bytes",
        type=positive_int,
        default=32 * 2**20,
        help="bytes a request body may hold (default: %(default)s, 32 MiB)",
    )
    parser.add_argument(
        "--max-pixels",
        type=pixel_limit,
        default=DEFAULT_MAX_PIXELS,
        help="decompression-bomb limit of one image, as `cnnops predict --max-pixels` (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=8,
        help="requests answered at once; more are refused with 503 (default: %(default)s)",
    )
    parser.set_defaults(handler=_main, needs_params=False)


def _main(args: argparse.Namespace, _params: object) -> int:
    # params.yaml is read only for a registered model (its tracking store): a file serves anywhere
    model = load_model(args.model, lambda: load_params(args.params).tracking)
    limits = Limits(args.max_files, args.max_bytes, args.max_pixels, args.concurrency)
    serve(model, limits, args.host, args.port)
    return 0
