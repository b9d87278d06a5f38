"""`digitlab serve`: a web page to draw a digit and watch the network read it, and the HTTP API behind it.

Routes (OpenAPI reference at /docs):
    GET  /               the drawing page (plain HTML/CSS/JS from digitlab/static, works offline)
    POST /api/predict    an image (multipart field "file", or JSON {"image": base64}) or JSON {"pixels": 784
                         numbers in [0,1]} -> digit, confidence, probabilities, the preprocessed 28x28 PNG;
                         ?explain=true adds each layer's activations
    GET  /api/model      what model is served: name, parameters, accuracy from the checkpoint sidecar
    GET  /healthz        liveness

Robustness: every error is JSON {"error": "..."}; a body over the limit is refused with 413 before it is read
(Content-Length) or as soon as the streamed bytes pass the limit; inference runs in a worker thread so the
event loop never waits on the model, and the Predictor's lock keeps one forward pass at a time on the one loaded model.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import logging
import math
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from anyio import to_thread
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .errors import DigitlabError
from .prediction import PredictError, softmax

DEFAULT_MAX_BODY_BYTES = 5_000_000
STATIC_DIR = Path(__file__).with_name("static")
PIXELS = 28 * 28
log = logging.getLogger("digitlab.serving")

# The page loads nothing from elsewhere; its pictures are data: URLs (server answers) and blob: URLs (uploads).
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


class ServeError(DigitlabError):
    """The server cannot start: bad option, address in use, unusable checkpoint."""


class InputError(Exception):
    """A request the API refuses: carries the HTTP status and a one-line message for {"error": ...}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class BodyTooLarge(InputError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body too large: the limit is {limit} bytes")


# ----------------------------------------------------------------------------------------------------------
# Inference: decode -> preprocess -> one forward pass
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One prediction, as the API returns it."""

    digit: int
    confidence: float
    probabilities: list[float]
    preprocessed: np.ndarray  # (28, 28) float32 in [0, 1]: what the model saw
    activations: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "digit": self.digit,
            "confidence": self.confidence,
            "probabilities": self.probabilities,
            "preprocessed": png_base64(self.preprocessed),
        }
        if self.activations is not None:
            out["activations"] = self.activations
        return out


class InferenceService:
    """The one loaded Predictor behind the API; call its methods from a worker thread, never the event loop."""

    def __init__(self, predictor: Any):
        self.predictor = predictor

    def predict_bytes(self, data: bytes, explain: bool, name: str = "image") -> Answer:
        """An encoded image (PNG, JPEG, ...) -> Answer; raises InputError 400 (not an image) or 422 (blank).

        `name` says which input it was in error messages, e.g. "file 'seven.png'".
        """
        from .preprocessing import load_image, preprocess

        try:
            image = load_image(data, name=name)  # decodes fully; its messages start with the name
        except DigitlabError as exc:
            raise InputError(400, str(exc)) from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # never a 500 for a file
            raise InputError(400, f"{name}: corrupt or unsupported image data ({exc.__class__.__name__})") from None
        try:
            x = preprocess(image)  # (28, 28) float32 in [0, 1]
        except DigitlabError as exc:
            raise InputError(422, f"{name}: {exc}") from None
        return self.predict_pixels(x, explain)

    def predict_pixels(self, x: np.ndarray, explain: bool) -> Answer:
        """A (28, 28) float image in [0, 1], already MNIST-like (white on black, centred) -> Answer."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(28, 28)
        if not x.any():
            raise InputError(422, '"pixels" is blank: no ink found (all pixels are 0)')
        # The Predictor runs one forward pass at a time (its own lock), whichever of these two paths runs it.
        if explain:
            activations, logits = self._activations(x)
            probabilities = np.asarray(softmax(logits[None]), dtype=np.float64)[0]
        else:
            probabilities = np.asarray(self.predictor.predict_arrays(x[None]), dtype=np.float64)[0]
            activations = None
        digit = int(np.argmax(probabilities))
        return Answer(
            digit=digit,
            confidence=float(probabilities[digit]),
            probabilities=[float(p) for p in probabilities],
            preprocessed=x,
            activations=activations,
        )

    def _activations(self, x: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """Each layer's activations for one (28, 28) image in [0, 1] used as it is, and the logits (10,).

        The pixels are final (preprocess's output, or an API client's MNIST-like pixels), so they go to
        Predictor.activations, which does not preprocess again.
        """
        try:
            values = self.predictor.activations(x)
        except PredictError:
            raise InputError(422, "explain=true needs a PyTorch model with hidden activations") from None
        # 4 decimals are plenty for a heat map and halve the JSON
        activations = {name: np.round(value.astype(np.float64), 4).tolist() for name, value in values.items()}
        return activations, values["logits"].astype(np.float64)

    def model_summary(self) -> dict[str, Any]:
        from .models import MODELS, count_parameters

        info, model = self.predictor.info, self.predictor.model
        entry = MODELS.get(info.model)
        metrics = json_safe(dict(info.metrics or {}))
        return {
            "model": info.model,
            "description": entry.description if entry else "",
            "parameters": count_parameters(model) if model is not None else None,
            "accuracy": metrics.get("test_accuracy"),
            "metrics": metrics,
            "class_names": list(info.class_names),
            "dataset": info.dataset,
            "epoch": info.epoch,
            "device": str(self.predictor.device),
            "digitlab_version": __version__,
        }


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities (which JSON cannot carry) by None, recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def png_base64(x: np.ndarray) -> str:
    """A (28, 28) float image in [0, 1] as a base64 grayscale PNG."""
    pixels = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------------------
# Request parsing
# ----------------------------------------------------------------------------------------------------------


def decode_base64_image(text: Any) -> bytes:
    """The "image" field: base64, optionally as a data URL (data:image/png;base64,...)."""
    if not isinstance(text, str):
        raise InputError(422, f'"image" must be a base64 string, got {type(text).__name__}')
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InputError(400, '"image": a data URL must be base64-encoded (data:image/...;base64,...)')
    text = "".join(text.split())  # base64 wrapped over lines is still base64
    if not text:
        raise InputError(422, '"image" is empty')
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, '"image" is not valid base64') from None


def parse_pixels(value: Any) -> np.ndarray:
    """The "pixels" field: 784 numbers in [0, 1] (row by row), or 28 rows of 28 -> (28, 28) float32."""
    if isinstance(value, list) and len(value) == 28 and all(isinstance(row, list) for row in value):
        value = [v for row in value for v in row]
    if not isinstance(value, list):
        raise InputError(422, f'"pixels" must be a list of {PIXELS} numbers, got {type(value).__name__}')
    if len(value) != PIXELS:
        raise InputError(422, f'"pixels" must hold {PIXELS} numbers (28x28, row by row), got {len(value)}')
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise InputError(422, '"pixels" must hold only numbers')
    x = np.asarray(value, dtype=np.float64)
    if not np.isfinite(x).all():
        raise InputError(422, '"pixels" must hold finite numbers (no NaN or Infinity)')
    if x.min() < 0.0 or x.max() > 1.0:
        raise InputError(422, f'"pixels" must be in [0, 1], got values from {x.min():g} to {x.max():g}')
    return x.astype(np.float32).reshape(28, 28)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_upload(request: Request) -> tuple[bytes, str]:
    """The image file of a multipart/form-data body (field "file", else the only file in it) and its name."""
    try:
        async with request.form(max_files=4, max_fields=16) as form:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                files = [v for v in form.values() if not isinstance(v, str)]
                upload = files[0] if len(files) == 1 else None
            if upload is None:
                raise InputError(422, 'multipart body has no image file: send it in the field "file"')
            filename = (upload.filename or "")[:100]
            return await upload.read(), f"file {filename!r}" if filename else "uploaded file"
    except StarletteHTTPException as exc:  # malformed multipart
        raise InputError(400, f"malformed multipart body: {exc.detail}") from None


async def read_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InputError(422, 'JSON body must be an object: {"image": "<base64>"} or {"pixels": [784 numbers]}')
    given = [key for key in ("image", "pixels") if key in payload]
    if len(given) != 1:
        what = "both" if given else "neither"
        raise InputError(422, f'JSON body must have exactly one of "image" or "pixels", it has {what}')
    return payload


# ----------------------------------------------------------------------------------------------------------
# ASGI middleware: body limit and security headers
# ----------------------------------------------------------------------------------------------------------


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` without reading them into memory.

    A declared Content-Length over the limit is refused before any of the body is read; a body sent without
    one (chunked) is counted as it streams in, and refused the moment it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
                return
            if length > self.max_bytes:
                await error_response(413, BodyTooLarge(self.max_bytes).message,
                                     {"Connection": "close"})(scope, receive, send)
                return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await error_response(413, exc.message, {"Connection": "close"})(scope, receive, send)


class SecurityHeadersMiddleware:
    """nosniff and no-referrer everywhere; a strict Content-Security-Policy on the page and its files."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        strict = path == "/" or path.startswith("/static/")

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if strict:
                    headers += [(b"content-security-policy", PAGE_CSP.encode()), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, add_headers)


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------

PREDICT_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary",
                                            "description": "PNG, JPEG, GIF, BMP or WebP image of one digit"}},
                    "required": ["file"],
                }
            },
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"type": "object", "required": ["image"], "properties": {"image": {
                            "type": "string", "description": "base64 PNG/JPEG, or a data: URL"}}},
                        {"type": "object", "required": ["pixels"], "properties": {"pixels": {
                            "type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
                            "minItems": PIXELS, "maxItems": PIXELS,
                            "description": "784 pixels in [0,1], row by row, white digit on black, "
                                           "MNIST-like (already centred): used as they are"}}},
                    ]
                }
            },
        },
    }
}

ERROR_DOC = {"content": {"application/json": {"example": {"error": "image: no ink found"}}}}
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {"example": {
        "digit": 7, "confidence": 0.998, "probabilities": [0.0] * 7 + [0.998] + [0.0] * 2,
        "preprocessed": "<base64 PNG, 28x28 grayscale>",
        "activations": {"hidden1": "[512 numbers] (MLP)", "hidden2": "[512 numbers]", "logits": "[10 numbers]"},
    }}}},
    400: {"description": "not an image, corrupt image, bad base64, invalid JSON", **ERROR_DOC},
    413: {"description": "body over the limit (default 5 MB)", **ERROR_DOC},
    415: {"description": "Content-Type is neither multipart/form-data nor application/json", **ERROR_DOC},
    422: {"description": "blank image, wrong pixel count or range, missing field", **ERROR_DOC},
}


def validate_origins(origins: Iterable[str]) -> list[str]:
    """CORS origins as a browser sends them: scheme://host[:port], or "*"."""
    checked = []
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if origin != "*" and (not sep or scheme not in ("http", "https") or not rest or "/" in rest):
            raise ServeError(f"--cors-origin {origin!r}: expected an origin like https://example.org "
                             "(scheme and host, no path), or *")
        checked.append(origin)
    return checked


def create_app(predictor: Any, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               cors_origins: Iterable[str] = ()) -> FastAPI:
    """The FastAPI app over one loaded Predictor (testable without a server)."""
    if max_body_bytes <= 0:
        raise ServeError(f"max_body_bytes must be positive, got {max_body_bytes}")
    origins = validate_origins(cors_origins)
    service = InferenceService(predictor)
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    # FastAPIOffline: FastAPI whose /docs (Swagger UI) and /redoc load their scripts from this server, not a
    # CDN, so the API reference works offline like the drawing page.
    app = FastAPIOffline(
        static_url="/docs-static",
        title="digitlab",
        version=__version__,
        description="Read handwritten digits with a digitlab checkpoint. The drawing page is at /.",
    )
    app.state.service = service

    @app.exception_handler(InputError)
    async def on_input_error(request: Request, exc: InputError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = " ".join(str(part) for part in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}".strip(": "))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "model": predictor.info.model}

    @app.get("/api/model", summary="The served model: name, parameters, accuracy from the checkpoint")
    async def model_info() -> dict[str, Any]:
        return service.model_summary()

    @app.post("/api/predict", summary="Read one digit", openapi_extra=PREDICT_BODY_DOC,
              responses=PREDICT_RESPONSES)
    async def predict(request: Request, explain: bool = Query(False, description="add each layer's activations")
                      ) -> JSONResponse:
        kind = media_type(request)
        if kind == "multipart/form-data":
            data, name = await read_upload(request)
            answer = await to_thread.run_sync(service.predict_bytes, data, explain, name)
        elif kind == "application/json":
            payload = await read_json(request)
            if "image" in payload:
                data = decode_base64_image(payload["image"])
                answer = await to_thread.run_sync(service.predict_bytes, data, explain, '"image"')
            else:
                pixels = parse_pixels(payload["pixels"])
                answer = await to_thread.run_sync(service.predict_pixels, pixels, explain)
        else:
            shown = kind or "none"
            raise InputError(415, f"Content-Type {shown} is not supported: send multipart/form-data "
                                  '(image in field "file") or application/json')
        return JSONResponse(answer.to_json())

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # Last added runs first: CORS outermost (so even a 413 carries its headers), then headers, then the limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(SecurityHeadersMiddleware)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type"], max_age=600)
    return app


# ----------------------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); ServeError names the address on failure."""
    if not 0 <= port <= 65535:
        raise ServeError(f"--port {port}: must be between 0 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this. Without it, a response written in two parts (headers, body)
        # waits for the client's delayed ACK: 40 ms on every request on Linux (measured: 44 ms -> 1 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(f"{host}:{port}: cannot listen ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, cors_origins: Iterable[str] = (),
          device: str = "auto", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info") -> None:
    """Load the checkpoint once, then serve the page and the API with uvicorn until interrupted."""
    import uvicorn

    from .prediction import Predictor

    origins = validate_origins(cors_origins)
    sock = bind_socket(host, port)  # before the model loads: a busy port fails fast
    try:
        predictor = Predictor.from_checkpoint(checkpoint, device=device)
        app = create_app(predictor, max_body_bytes=max_body_bytes, cors_origins=origins)
        actual_port = sock.getsockname()[1]
        if not is_loopback(host):
            print(f"digitlab: warning: listening on {host}, reachable from other machines; the API has no "
                  "authentication", file=sys.stderr, flush=True)
        print(f"digitlab: serving {predictor.info.model} from {checkpoint} on {url_for(host, actual_port)} "
              "(Ctrl+C to stop)", flush=True)
        config = uvicorn.Config(app, host=host, port=actual_port, log_level=log_level,
                                timeout_graceful_shutdown=5, server_header=False)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
