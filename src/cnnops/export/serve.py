"""An HTTP server that classifies posted image files with an exported ONNX model.

`POST /predict` takes one or more image files as multipart/form-data and answers, per file, the
class, the probabilities and the model that gave them; `GET /health` and `GET /metadata` describe
the model. Every file goes through `predict.classify`, the code of `cnnops predict`: a served
model gets the pixels predict feeds it, decoded by the data contract.

Why a server of our own rather than `mlflow models serve` on the registered version: MLflow 3's
pyfunc scoring server reads only JSON, CSV and Parquet bodies on /invocations (any other content
type is a 415), so image files would travel base64-encoded inside JSON and the decoding would live
in a pyfunc wrapper beside predict's instead of being predict's. This one takes the files
themselves on Starlette and uvicorn, the stack MLflow's own scoring server runs on (both installed
with it); python-multipart is Starlette's multipart parser.

Requests are bounded before they are read: a declared length (no chunked uploads), at most
`max_bytes` of it and `max_files` files, each at most `max_pixels` pixels. ONNX Runtime sessions
are safe to run from several threads, so requests are classified in Starlette's thread pool, at
most `concurrency` at a time (uvicorn answers 503 past that).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cnnops.config import TrackingParams
from cnnops.data.digest import file_sha256
from cnnops.errors import StageInputError
from cnnops.export.onnx_model import OnnxMetadata, best_provider, open_session, read_metadata
from cnnops.export.predict import Failure, Prediction, classify
from cnnops.tracking.redact import redact_url

log = logging.getLogger(__name__)

MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))")
MAX_FILE_NAME = 255  # characters: the longest file name a filesystem allows
FORM = "multipart/form-data"


@dataclass(frozen=True)
class Limits:
    """What one request may hold, and how many are answered at once."""

    max_files: int
    max_bytes: int  # of the whole request body
    max_pixels: int  # of one image: the data contract's decompression-bomb limit
    concurrency: int


@dataclass(frozen=True)
class ServedModel:
    """An open ONNX Runtime session and where its file came from."""

    session: ort.InferenceSession
    meta: OnnxMetadata
    name: str  # the registered model's name, or the file's name
    version: str | None  # the registered version; None for a file given by path
    path: str | None  # the file given by path; None for a registered version
    sha256: str  # of the ONNX file

    def describe(self) -> dict[str, str]:
        source = {"version": self.version} if self.version is not None else {"path": str(self.path)}
        return {"name": self.name, **source, "sha256": self.sha256}


def load_model(source: str, tracking: Callable[[], TrackingParams]) -> ServedModel:
    """The model of an ONNX file path, or of a registered version: `models:/<name>@<alias>` or
    `models:/<name>/<version>` in the store `tracking()` names (called only for a registered one)."""
    if not source.startswith("models:/"):
        return _served(Path(source), Path(source).name, None, source)
    match = MODELS_URI.fullmatch(source)
    if match is None:
        raise StageInputError(
            f"{source}: not a registered model URI; give models:/<name>@<alias> (e.g. @champion) "
            "or models:/<name>/<version>, or the path of an ONNX file"
        )
    # Imported here: MLflow takes seconds to import, and serving a file does not need it.
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from cnnops.tracking import registry, runs

    name, store = match["name"], runs.store_uri(tracking())
    mlflow.set_tracking_uri(store)
    version = match["version"] or registry.alias_version(MlflowClient(), name, match["alias"])
    if version is None:
        raise StageInputError(
            f"{source}: registered model {name!r} has no version with alias {match['alias']!r} in "
            f"{redact_url(store)}; run `cnnops release`, or name a version"
        )
    try:
        with registry.downloaded_onnx(name, version) as path:
            return _served(path, name, version, None)
    except MlflowException as exc:
        raise StageInputError(
            f"{source}: version {version} of {name!r} cannot be downloaded ({exc.message[:200]}); "
            "check the name and version with the MLflow UI or `cnnops release`"
        ) from None


def _served(path: Path, name: str, version: str | None, shown: str | None) -> ServedModel:
    meta = read_metadata(path)  # checks the file (exists, ONNX, cnnops metadata matching its graph)
    # the session holds the graph in memory: a downloaded file may be deleted once it is open
    session = open_session(path, best_provider())
    return ServedModel(session, meta, name, version, shown, file_sha256(path))


# Characters that mean something to HTML, escaped the way JSON allows inside a string; outside
# strings JSON never holds them, so the text stays the same JSON (Go's encoding/json does the same).
_HTML_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


class SafeJSON(JSONResponse):
    """JSON with every non-ASCII and HTML character escaped, and `nosniff`: file and class names
    are user input, and a browser must never take an answer, or a page embedding it, for HTML."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=True, allow_nan=False)
        return text.translate(_HTML_SAFE).encode("ascii")

    def __init__(self, content: Any, status_code: int = 200, headers: dict[str, str] | None = None):
        super().__init__(content, status_code, {**(headers or {}), "X-Content-Type-Options": "nosniff"})


def create_app(model: ServedModel, limits: Limits) -> Starlette:
    """The Starlette application: /predict, /health, /metadata; every error a JSON body."""

    async def predict(request: Request) -> SafeJSON:
        _check_request(request.headers, limits)
        form = await _parse_form(request, limits)
        try:
            uploads = _uploads(form)
            answers = await run_in_threadpool(_classify_uploads, model, uploads, limits)
        finally:
            await form.close()
        errors = [a for a in answers if "error" in a]
        body = {"predictions": [a for a in answers if "error" not in a], "errors": errors}
        return SafeJSON(body, 422 if errors else 200)

    async def health(_request: Request) -> SafeJSON:
        return SafeJSON({"status": "ok", "model": model.describe()})

    async def metadata(_request: Request) -> SafeJSON:
        return SafeJSON({"model": model.describe(), "metadata": asdict(model.meta)})

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metadata", metadata, methods=["GET"]),
    ]
    handlers = {HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)


def _check_request(headers: Headers, limits: Limits) -> None:
    """Refuse what cannot be an upload, or is too large, before a byte of the body is read."""
    kind = headers.get("content-type", "")
    if kind.split(";")[0].strip().lower() != FORM:
        raise HTTPException(
            415,
            f"Content-Type is {kind[:100]!r}; send the images as {FORM} file parts "
            "(curl -F file=@image.png ...)",
        )
    length = headers.get("content-length")
    if length is None:
        raise HTTPException(
            411, "the request has no Content-Length; send the files in one body of declared length"
        )
    if not length.isdigit():
        raise HTTPException(400, f"Content-Length {length[:40]!r} is not a number of bytes")
    if int(length) > limits.max_bytes:
        raise HTTPException(
            413,
            f"the request holds {int(length):,} bytes, more than this server's limit of "
            f"{limits.max_bytes:,} (--max-bytes); send fewer or smaller files per request",
        )


async def _parse_form(request: Request, limits: Limits) -> FormData:
    """The multipart body, Starlette's parser counting the parts; too many is a 413 like too large."""
    parser = MultiPartParser(
        request.headers, request.stream(), max_files=limits.max_files, max_fields=limits.max_files
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        # Starlette raises one exception type for every parse failure, told apart by its message
        # only ("Too many files/fields. Maximum ..."); tests/test_serve.py pins the 413.
        if exc.message.startswith("Too many"):
            raise HTTPException(
                413,
                f"the request holds more than {limits.max_files} parts, this server's limit of files "
                "per request (--max-files); send them in several requests",
            ) from None
        raise HTTPException(400, f"the multipart body cannot be read: {exc.message}") from None


def _uploads(form: FormData) -> list[tuple[str, UploadFile]]:
    """(name the client gave, file) for each part; a text field or a missing file is a 400."""
    uploads = []
    for field, value in form.multi_items():
        if not isinstance(value, UploadFile):
            raise HTTPException(
                400, f"form field {field[:100]!r} is not a file; send each image as a file part"
            )
        name = value.filename or f"(part {len(uploads) + 1}, no file name)"
        if len(name) > MAX_FILE_NAME:
            raise HTTPException(400, f"file name {name[:60]!r}... is longer than {MAX_FILE_NAME} characters")
        uploads.append((name, value))
    if not uploads:
        raise HTTPException(400, f"the request holds no file; send the images as {FORM} file parts")
    return uploads


def _classify_uploads(
    model: ServedModel, uploads: list[tuple[str, UploadFile]], limits: Limits
) -> list[dict[str, Any]]:
    """Each upload through `predict.classify`, which reads files: each is copied to a private
    temporary file, and the client's file name replaces that file's path in an error."""
    with tempfile.TemporaryDirectory(prefix="cnnops-serve-") as tmp:
        paths = [Path(tmp) / str(index) for index in range(len(uploads))]
        for path, (_, upload) in zip(paths, uploads, strict=True):
            with path.open("wb") as out:
                shutil.copyfileobj(upload.file, out)
        results = classify(
            model.session, model.meta, paths, batch_size=len(paths), max_pixels=limits.max_pixels
        )
    answers = []
    for (name, _), path, result in zip(uploads, paths, results, strict=True):
        if isinstance(result, Failure):
            answers.append({"file": name, "error": result.error.replace(str(path), name)})
        else:
            answers.append(_answer(name, result, model))
    return answers


def _answer(name: str, prediction: Prediction, model: ServedModel) -> dict[str, Any]:
    return {
        "file": name,
        "class": prediction.label,
        "confidence": prediction.confidence,
        "probabilities": prediction.probabilities,
        "model": model.describe(),
    }


async def _http_error(_request: Request, exc: HTTPException) -> SafeJSON:
    return SafeJSON({"error": exc.detail}, exc.status_code, dict(exc.headers or {}))


async def _server_error(_request: Request, exc: Exception) -> SafeJSON:
    """A bug answers 500 with no traceback; Starlette re-raises it, so the server log has it."""
    return SafeJSON({"error": "internal error while answering; the server log has the details"}, 500)


def serve(model: ServedModel, limits: Limits, host: str, port: int) -> None:
    """Answer on host:port until interrupted; uvicorn's log lines go through cnnops' logging."""
    if not _loopback(host):
        log.warning(
            "serving on %s: anyone who reaches this machine on port %d can post images (no "
            "authentication); bind 127.0.0.1 behind a proxy that authenticates",
            host,
            port,
        )
    log.info("serving %s on http://%s:%d", json.dumps(model.describe()), host, port)
    app = create_app(model, limits)
    uvicorn.run(app, host=host, port=port, limit_concurrency=limits.concurrency, log_config=None)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
