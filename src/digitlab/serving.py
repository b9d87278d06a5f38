"""`digitlab serve`: a web page to draw a digit and watch the network read it, and the HTTP API behind it.

Routes (OpenAPI reference at /docs and /redoc, generated from the Pydantic models below):
    GET  /               the drawing page (plain HTML/CSS/JS from digitlab/static, works offline)
    POST /api/predict    an image (multipart field "file", or JSON {"image": base64}) or JSON {"pixels": 784
                         numbers in [0,1]} -> digit, confidence, probabilities, the preprocessed 28x28 PNG;
                         ?explain=true adds each layer's activations, first-layer templates (MLP) and a
                         saliency map ("why this digit")
    GET  /api/model      what model is served: name, parameters, accuracy, calibration
    GET  /healthz        liveness
Every GET route answers HEAD too.

Bounded memory and time: the body is limited in size (413) and in time (408); large images are decoded
reduced (JPEG draft mode, then Image.reduce) under a decoded-pixel budget, at most `max_decodes` at once;
JSON is parsed with a depth and number-size limit (400); uvicorn runs with a header timeout, a keep-alive
timeout and a connection cap (GuardedH11Protocol). A Host allow-list (on by default for loopback binds)
stops DNS rebinding. Every error is JSON {"error": "..."}; inference runs in a worker thread, and the
Predictor's lock keeps one forward pass at a time on the one loaded model.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import json
import logging
import math
import socket
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Sequence

import anyio
import fastapi_offline
import h11
import numpy as np
from anyio import to_thread
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError, from_json
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import __version__
from .errors import DigitlabError
from .prediction import PredictError

STATIC_DIR = Path(__file__).with_name("static")
DOCS_STATIC_DIR = Path(fastapi_offline.__file__).with_name("static")  # Swagger UI and ReDoc, no CDN
PIXELS = 28 * 28
log = logging.getLogger("digitlab.serving")

# Limits. Each is a `serve` option; docs/serving.md explains the defaults.
DEFAULT_MAX_BODY_BYTES = 5_000_000
DEFAULT_MAX_IMAGE_PIXELS = 16_000_000  # decoded pixels per image (64 MB as RGBA); JPEGs are decoded reduced
DEFAULT_MAX_DECODES = 2  # images decoded at once; more requests wait their turn
DEFAULT_HEADER_TIMEOUT = 10.0  # s for a client to send its request line and headers
DEFAULT_BODY_TIMEOUT = 60.0  # s for the whole body: 5 MB at under 1 Mbit/s
DEFAULT_KEEP_ALIVE_TIMEOUT = 5  # s an idle keep-alive connection stays open
DEFAULT_MAX_CONNECTIONS = 100  # open connections; more are answered 503 and closed at once
MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11's incomplete-event limit)
REDUCE_ABOVE = 1024 * 1024  # images with more pixels are decoded reduced; smaller ones exactly as `predict` does
TEMPLATES = 12  # MLP "look inside": how many of the most active first-layer units to send
SALIENCY_STEPS = 32

# The page loads nothing from elsewhere; its pictures are data: URLs (server answers) and blob: URLs (uploads).
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
# /docs and /redoc: scripts only from here (Swagger UI's start-up script is a file, not inline); ReDoc and
# Swagger UI set inline styles, ReDoc searches in a blob: worker. No other host for anything.
DOCS_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
    "worker-src 'self' blob:; connect-src 'self'; font-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"  # built into ReDoc's bundle; replaced when served


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


class BodyTimeout(InputError):
    def __init__(self, seconds: float):
        super().__init__(408, f"request body not received within {seconds:g} s")


# ----------------------------------------------------------------------------------------------------------
# The API's models: requests, answers, errors (the OpenAPI schema is generated from these)
# ----------------------------------------------------------------------------------------------------------


class ImageBody(BaseModel):
    """An encoded image in JSON."""

    image: str = Field(description="base64 PNG/JPEG/GIF/BMP/WebP, or a data: URL (data:image/png;base64,...)")

    @field_validator("image", mode="before")
    @classmethod
    def _is_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise PydanticCustomError(
                "image", '"image" must be a base64 string, got {kind}', {"kind": type(value).__name__}
            )
        return value


class PixelsBody(BaseModel):
    """Pixels the model takes as they are."""

    pixels: list[float] | list[list[float]] = Field(
        description="784 numbers in [0, 1], row by row (or 28 rows of 28), white digit on black, MNIST-like "
        "(already centred): used as they are, no preprocessing",
        json_schema_extra={"minItems": 28, "maxItems": PIXELS},
    )

    @field_validator("pixels", mode="before")
    @classmethod
    def _check(cls, value: Any) -> Any:
        check_pixels(value)  # one clear message per defect, instead of 784 generic ones
        return value


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    model: str = Field(description="the served model's name", examples=["mlp"])


class ModelInfo(BaseModel):
    model: str = Field(examples=["mlp"])
    description: str = Field(examples=["the tutorial's network: 784-512-512-10, ReLU"])
    parameters: int | None = Field(examples=[669706])
    accuracy: float | None = Field(description="test accuracy from the checkpoint sidecar", examples=[0.9812])
    metrics: dict[str, Any] = Field(description="all metrics of the sidecar; NaN and infinities as null")
    class_names: list[str]
    dataset: str = Field(examples=["mnist"])
    epoch: int
    device: str = Field(examples=["cpu"])
    temperature: float = Field(description="softmax temperature applied to the logits (1.0: none)")
    calibrated: bool = Field(description="a fitted temperature is applied: confidences are calibrated")
    reject_below: float | None = Field(
        description="answers below this confidence are marked rejected (serve --reject-below)"
    )
    digitlab_version: str


class Template(BaseModel):
    """One first-layer unit of the MLP: what it responds to."""

    unit: int = Field(description="index in the first hidden layer")
    activation: float = Field(description="its activation (after ReLU) for this image")
    weights: list[list[float]] = Field(
        description="its 784 input weights as 28x28: positive = ink there "
        "excites the unit, negative = ink there inhibits it"
    )


class Answer(BaseModel):
    """What the model read."""

    digit: int = Field(description="the most probable digit", examples=[7])
    confidence: float = Field(
        description="its probability (calibrated when /api/model says so)", examples=[0.9983021616935730]
    )
    probabilities: list[float] = Field(description="10 probabilities, summing to 1, full float precision")
    rejected: bool = Field(description="confidence is below the server's --reject-below: not sure")
    preprocessed: str = Field(description="base64 PNG: the 28x28 grayscale image the model saw")
    activations: dict[str, Any] | None = Field(
        None,
        description="explain=true: each layer's activations, 4 decimals (MLP: hidden1 [512], hidden2 "
        "[512], logits [10]; CNN: conv1 [8][14][14], conv2 and conv3 [8][7][7], logits)",
    )
    templates: list[Template] | None = Field(
        None,
        description=f"explain=true, MLP only: the {TEMPLATES} most active first-layer units, most active "
        "first, with their input weights",
    )
    saliency: list[list[float]] | None = Field(
        None,
        description="explain=true: 28x28, how much each pixel pushed the answer towards `digit` (> 0) "
        "and towards `runner_up` (< 0); integrated gradients, in logit units, 4 decimals",
    )
    runner_up: int | None = Field(None, description="explain=true: the second most probable digit")


class ErrorBody(BaseModel):
    error: str = Field(description="one line: what is wrong with the request")


# ----------------------------------------------------------------------------------------------------------
# Inference: decode (bounded) -> preprocess -> one forward pass
# ----------------------------------------------------------------------------------------------------------

# EXIF orientation -> the transpose that undoes it (as PIL.ImageOps.exif_transpose)
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F")


def reduce_in_stripes(image: Image.Image, factor: int, rows: int = 64) -> Image.Image:
    """image.reduce(factor), a stripe of `rows` output rows at a time: Pillow reduces RGBA through a full-size
    premultiplied copy, which doubled the peak memory of a big PNG; a stripe's copy is small. The stripes
    are whole multiples of `factor` rows, so the result is the same as one reduce."""
    width, height = image.size
    parts = [
        image.crop((0, top, width, min(height, top + factor * rows))).reduce(factor)
        for top in range(0, height, factor * rows)
    ]
    out = Image.new(parts[0].mode, (parts[0].width, sum(part.height for part in parts)))
    top = 0
    for part in parts:
        out.paste(part, (0, top))
        top += part.height
    return out


class InferenceService:
    """The one loaded Predictor behind the API; call its methods from a worker thread, never the event loop."""

    def __init__(
        self, predictor: Any, reject_below: float | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ):
        self.predictor = predictor
        self.reject_below = reject_below
        self.max_image_pixels = max_image_pixels
        self._templates: np.ndarray | None = None  # (512, 784) first-layer weights of an MLP, read once

    @property
    def temperature(self) -> float:
        """The fitted softmax temperature from the checkpoint sidecar (1.0: none); an ensemble's first member's."""
        return float(getattr(self.predictor, "temperature", 1.0))

    def decode(self, data: bytes, name: str) -> Image.Image:
        """Encoded bytes -> a PIL image no larger than needed; InputError 400 (not an image), 413 (too large).

        Up to REDUCE_ABOVE pixels: exactly `preprocessing.load_image`, as `digitlab predict` reads it. Larger:
        a JPEG is decoded at 1/2, 1/4 or 1/8 scale (draft mode) to no less than the working size, and any
        image is reduced right after decoding, so preprocessing never sees full-size float copies (a 6320x6320
        RGBA PNG cost ~1.5 GB that way). What is decoded must fit `max_image_pixels`.
        """
        from .preprocessing import MAX_PIXELS, WORK_SIZE, load_image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))  # reads the header only
            width, height = image.size
        except Exception:  # noqa: BLE001 - load_image below names the defect
            width = height = 0
        if width * height <= REDUCE_ABOVE or width * height > MAX_PIXELS:
            try:
                return load_image(data, name=name)  # its messages start with the name
            except DigitlabError as exc:
                raise InputError(400, str(exc)) from None
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise InputError(400, f"{name}: corrupt or unsupported image data ({exc.__class__.__name__})") from None
        try:
            if image.format == "JPEG":
                image.draft(None, (WORK_SIZE, WORK_SIZE))  # DCT scaling: the full size is never decoded
            width, height = image.size
            if width * height > self.max_image_pixels:
                raise InputError(
                    413,
                    f"{name}: image too large to decode: {width}x{height} is "
                    f"{width * height / 1e6:.1f} megapixels, this server decodes at most "
                    f"{self.max_image_pixels / 1e6:g} (send it smaller)",
                )
            image.seek(0)  # GIF, multi-page TIFF: the first frame. Before anything is decoded: seeking a
            # decoded PNG decodes it again while the first copy is still held (measured: 4x the pixels)
            orientation = image.getexif().get(0x0112)  # a PNG's EXIF may follow its pixels: this decodes
            image.load()
            if image.mode not in REDUCIBLE_MODES:
                image = image.convert(
                    "RGBA"
                    if image.mode in ("P", "PA")
                    else "L"
                    if image.mode == "1"
                    else "I"
                    if image.mode.startswith("I;16")
                    else "RGB"
                )
            factor = max(image.size) // WORK_SIZE
            if factor >= 2:
                image = reduce_in_stripes(image, factor)  # to >= WORK_SIZE; preprocessing resizes from there
            if orientation in ORIENTATIONS:
                image = image.transpose(ORIENTATIONS[orientation])
            return image
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - never a 500 for a file
            raise InputError(400, f"{name}: truncated or corrupt image data ({exc.__class__.__name__})") from None

    def predict_bytes(self, data: bytes, explain: bool, name: str = "image") -> Answer:
        """An encoded image (PNG, JPEG, ...) -> Answer; raises InputError 400 (not an image), 413 (too large
        to decode) or 422 (blank). `name` says which input it was in error messages, e.g. "file 'seven.png'"."""
        from .preprocessing import preprocess

        image = self.decode(data, name)
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
        extra: dict[str, Any] = {}
        # The Predictor runs one forward pass at a time (its own lock), whichever path runs it.
        if explain:
            values = self._activations(x)
            # The Predictor's own answer (its temperature, every ensemble member): explained and plain agree.
            probabilities = np.asarray(self.predictor.predict_arrays(x[None]), dtype=np.float64)[0]
            # 4 decimals are plenty for a heat map and halve the JSON
            extra["activations"] = {k: np.round(v.astype(np.float64), 4).tolist() for k, v in values.items()}
            if "hidden1" in values:
                extra["templates"] = self._top_templates(values["hidden1"])
            why = self.predictor.saliency(x, steps=SALIENCY_STEPS)
            extra["saliency"] = np.round(why.map.astype(np.float64), 4).tolist()
            extra["runner_up"] = why.runner_up
        else:
            probabilities = np.asarray(self.predictor.predict_arrays(x[None]), dtype=np.float64)[0]
        digit = int(np.argmax(probabilities))
        confidence = float(probabilities[digit])
        return Answer(
            digit=digit,
            confidence=confidence,
            probabilities=[float(p) for p in probabilities],
            rejected=self.reject_below is not None and confidence < self.reject_below,
            preprocessed=png_base64(x),
            **extra,
        )

    def _activations(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Each layer's activations for one (28, 28) image in [0, 1] used as it is, logits included.

        The pixels are final (preprocess's output, or an API client's MNIST-like pixels), so they go to
        Predictor.activations, which does not preprocess again.
        """
        try:
            return self.predictor.activations(x)
        except PredictError:
            raise InputError(422, "explain=true needs a PyTorch model with hidden activations") from None

    def _top_templates(self, hidden1: np.ndarray) -> list[Template]:
        """The most active first-layer units of an MLP, most active first, with their 784 input weights: what
        each unit looks for. (The raw 512 activations as a heat map say nothing to a reader.)"""
        if self._templates is None:
            import torch

            first = next(
                (
                    m
                    for m in self.predictor.model.modules()
                    if isinstance(m, torch.nn.Linear) and m.in_features == PIXELS
                ),
                None,
            )
            if first is None:
                return []
            self._templates = first.weight.detach().float().cpu().numpy().reshape(-1, 28, 28)
        order = np.argsort(-hidden1)[:TEMPLATES]
        return [
            Template(
                unit=int(k),
                activation=round(float(hidden1[k]), 4),
                weights=np.round(self._templates[k].astype(np.float64), 3).tolist(),
            )
            for k in order
            if hidden1[k] > 0
        ]

    def model_summary(self) -> ModelInfo:
        from .models import MODELS, count_parameters

        info, model = self.predictor.info, self.predictor.model
        entry = MODELS.get(info.model)
        metrics = json_safe(dict(info.metrics or {}))
        return ModelInfo(
            model=info.model,
            description=entry.description if entry else "",
            parameters=count_parameters(model) if model is not None else None,
            accuracy=metrics.get("test_accuracy"),
            metrics=metrics,
            class_names=list(info.class_names),
            dataset=getattr(info, "dataset", "mnist"),
            epoch=getattr(info, "epoch", 0),
            device=str(self.predictor.device),
            temperature=self.temperature,
            calibrated=self.temperature != 1.0,
            reject_below=self.reject_below,
            digitlab_version=__version__,
        )


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
    from .figures import png_bytes

    return base64.b64encode(png_bytes(x)).decode("ascii")


# ----------------------------------------------------------------------------------------------------------
# Request parsing
# ----------------------------------------------------------------------------------------------------------


def decode_base64_image(text: str) -> bytes:
    """The "image" field: base64, optionally as a data URL (data:image/png;base64,...)."""
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


def _pixels_error(message: str) -> PydanticCustomError:
    return PydanticCustomError("pixels", message)


def check_pixels(value: Any) -> np.ndarray:
    """The "pixels" field: 784 numbers in [0, 1] (row by row), or 28 rows of 28 -> (28, 28) float32."""
    if isinstance(value, list) and len(value) == 28 and all(isinstance(row, list) for row in value):
        value = [v for row in value for v in row]
    if not isinstance(value, list):
        raise _pixels_error(f'"pixels" must be a list of {PIXELS} numbers, got {type(value).__name__}')
    if len(value) != PIXELS:
        raise _pixels_error(f'"pixels" must hold {PIXELS} numbers (28x28, row by row), got {len(value)}')
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _pixels_error('"pixels" must hold only numbers')
    x = np.asarray(value, dtype=np.float64)
    if not np.isfinite(x).all():
        raise _pixels_error('"pixels" must hold finite numbers (no NaN or Infinity)')
    if x.min() < 0.0 or x.max() > 1.0:
        raise _pixels_error(f'"pixels" must be in [0, 1], got values from {x.min():g} to {x.max():g}')
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


async def read_json(request: Request) -> ImageBody | PixelsBody:
    """The JSON body as one of the two request models. pydantic's parser limits nesting depth and number
    size, so a 5,000-digit number or arrays nested 200,000 deep are a 400, not a 500."""
    body = await request.body()
    try:
        payload = from_json(body)
    except ValueError as exc:
        raise InputError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InputError(422, 'JSON body must be an object: {"image": "<base64>"} or {"pixels": [784 numbers]}')
    given = [key for key in ("image", "pixels") if key in payload]
    if len(given) != 1:
        what = "both" if given else "neither"
        raise InputError(422, f'JSON body must have exactly one of "image" or "pixels", it has {what}')
    model = ImageBody if given == ["image"] else PixelsBody
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"] if first["type"] in ("image", "pixels") else f"{where}: {first['msg']}"
        raise InputError(422, message) from None


# ----------------------------------------------------------------------------------------------------------
# ASGI middleware: Host check and HEAD, body limits, security headers
# ----------------------------------------------------------------------------------------------------------


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def host_of(value: str) -> str:
    """The host part of a Host header: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class GuardMiddleware:
    """Two checks before anything else runs.

    Host allow-list: a page on evil.example whose name later resolves to 127.0.0.1 (DNS rebinding) sends
    `Host: evil.example`; only the names this server is reached by are accepted. HEAD: answered as GET
    without the body (FastAPI's routes list GET only).
    """

    def __init__(self, app: ASGIApp, allowed_hosts: list[str] | None):
        self.app = app
        self.allowed = None if allowed_hosts is None or "*" in allowed_hosts else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allowed is not None:
            host = host_of(dict(scope["headers"]).get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                shown = host or "(none)"
                await error_response(
                    400,
                    f"Host {shown!r} is not allowed: this server answers to "
                    f"{', '.join(sorted(self.allowed))} (serve --allowed-host)",
                )(scope, receive, send)
                return
        if scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` (413) or slower than `timeout` seconds in all (408), without
    reading them into memory.

    A declared Content-Length over the limit is refused before any of the body is read; a body sent without
    one (chunked) is counted as it streams in, and refused the moment it passes the limit. The time limit
    covers the whole body, so a client trickling a byte a second is cut off too.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = DEFAULT_BODY_TIMEOUT):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

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
                await error_response(413, BodyTooLarge(self.max_bytes).message, {"Connection": "close"})(
                    scope, receive, send
                )
                return

        received = 0
        complete = False
        started = False
        deadline = anyio.current_time() + self.timeout

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body: waiting for a disconnect has no deadline
                return await receive()
            with anyio.move_on_after(deadline - anyio.current_time()) as timer:
                message = await receive()
            if timer.cancelled_caught:
                raise BodyTimeout(self.timeout)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except InputError as exc:
            if started:
                raise
            await error_response(exc.status, exc.message, {"Connection": "close"})(scope, receive, send)


class SecurityHeadersMiddleware:
    """nosniff and no-referrer everywhere; a strict Content-Security-Policy on the page, and one of their own
    on the API docs."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == "/" or path.startswith("/static/"):
            policy = PAGE_CSP
        elif path in ("/docs", "/redoc", "/docs/oauth2-redirect") or path.startswith("/docs-static/"):
            policy = DOCS_CSP
        else:
            policy = None

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if policy is not None:
                    headers += [(b"content-security-policy", policy.encode()), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, add_headers)


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------


def _error_doc(description: str, example: str) -> dict[str, Any]:
    return {
        "model": ErrorBody,
        "description": description,
        "content": {"application/json": {"example": {"error": example}}},
    }


PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error_doc(
        "not an image, corrupt image, bad base64, invalid JSON (also: nesting too deep, a number "
        "too long), disallowed Host",
        "file 'x.png': not an image (unrecognised format, 16 bytes)",
    ),
    408: _error_doc(
        "the body did not arrive within the body timeout (default 60 s)", "request body not received within 60 s"
    ),
    413: _error_doc(
        "body over the limit (default 5 MB), or an image too large to decode",
        "request body too large: the limit is 5000000 bytes",
    ),
    415: _error_doc(
        "Content-Type is neither multipart/form-data nor application/json",
        "Content-Type text/plain is not supported: send multipart/form-data (image in field "
        '"file") or application/json',
    ),
    422: _error_doc(
        "blank image, wrong pixel count or range, missing field, bad explain value", "file 'black.png': no ink found"
    ),
}
GET_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error_doc(
        "disallowed Host header",
        "Host 'evil.example' is not allowed: this server answers to 127.0.0.1, ::1, localhost (serve --allowed-host)",
    )
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def predict_body_doc() -> dict[str, Any]:
    """The request body of POST /api/predict for OpenAPI: multipart, or JSON as one of the two models."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {
                                "type": "string",
                                "format": "binary",
                                "description": "PNG, JPEG, GIF, BMP or WebP image of one digit",
                            }
                        },
                    }
                },
                "application/json": {"schema": {"oneOf": [_ref("ImageBody"), _ref("PixelsBody")]}},
            },
        }
    }


def add_request_schemas(app: FastAPI) -> None:
    """Generate the OpenAPI document once, with the two JSON request models (parsed by hand, because the same
    route also takes multipart) added to its components."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in (ImageBody, PixelsBody):
                schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def validate_origins(origins: Iterable[str]) -> list[str]:
    """CORS origins as a browser sends them: scheme://host[:port], or "*"."""
    checked = []
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if origin != "*" and (not sep or scheme not in ("http", "https") or not rest or "/" in rest):
            raise ServeError(
                f"--cors-origin {origin!r}: expected an origin like https://example.org "
                "(scheme and host, no path), or *"
            )
        checked.append(origin)
    return checked


def docs_pages(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc (ReDoc), every file served from here, nothing inline but styles."""
    redoc_js: list[bytes] = []  # read once, on the first request

    def page(head: str, body: str) -> HTMLResponse:
        return HTMLResponse(
            '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>digitlab API</title>'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="/docs-static/favicon.png">{head}</head><body>{body}</body></html>'
        )

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return page(
            '<link rel="stylesheet" href="/docs-static/swagger-ui.css">',
            '<div id="swagger-ui"></div><script src="/docs-static/swagger-ui-bundle.js"></script>'
            '<script src="/static/swagger-init.js"></script>',
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return page(
            "<style>body { margin: 0; }</style>",
            '<redoc spec-url="/openapi.json"></redoc><script src="/docs-static/redoc.standalone.js"></script>',
        )

    @app.get("/docs-static/redoc.standalone.js", include_in_schema=False)
    async def redoc_bundle() -> Response:
        # ReDoc shows a logo from cdn.redoc.ly; "data:," is no image, so ReDoc hides it, and nothing leaves.
        if not redoc_js:
            redoc_js.append((DOCS_STATIC_DIR / "redoc.standalone.js").read_bytes().replace(REDOC_LOGO, b"data:,"))
        return Response(redoc_js[0], media_type="text/javascript", headers={"cache-control": "public, max-age=3600"})

    app.mount("/docs-static", StaticFiles(directory=DOCS_STATIC_DIR), name="docs-static")


def create_app(
    predictor: Any,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    cors_origins: Iterable[str] = (),
    reject_below: float | None = None,
    allowed_hosts: Iterable[str] | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_decodes: int = DEFAULT_MAX_DECODES,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> FastAPI:
    """The FastAPI app over one loaded Predictor (testable without a server). It loads nothing and runs no
    model: whoever built the Predictor loaded it. allowed_hosts None: any Host header (serve() passes this
    machine's names for a loopback bind)."""
    for name, value in [
        ("max_body_bytes", max_body_bytes),
        ("max_image_pixels", max_image_pixels),
        ("max_decodes", max_decodes),
        ("body_timeout", body_timeout),
    ]:
        if value <= 0:
            raise ServeError(f"{name} must be positive, got {value}")
    if reject_below is not None and not 0.0 <= reject_below <= 1.0:
        raise ServeError(f"--reject-below {reject_below}: must be between 0 and 1")
    origins = validate_origins(cors_origins)
    hosts = None if allowed_hosts is None else list(allowed_hosts)
    service = InferenceService(predictor, reject_below=reject_below, max_image_pixels=max_image_pixels)
    decodes = anyio.CapacityLimiter(max_decodes)  # decoding is where the memory goes
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    app = FastAPI(
        title="digitlab",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        description="Read handwritten digits with a digitlab checkpoint. The drawing page is at /. "
        'Every error is `{"error": "..."}`.',
    )
    app.state.service = service
    add_request_schemas(app)

    @app.exception_handler(InputError)
    async def on_input_error(request: Request, exc: InputError) -> JSONResponse:
        # A body refused unread (413, 408) leaves the connection unusable: close it.
        headers = {"Connection": "close"} if exc.status in (408, 413) else None
        return error_response(exc.status, exc.message, headers)

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

    @app.get(
        "/healthz",
        summary="Liveness: the process is up and its model is loaded",
        response_model=Health,
        responses=GET_RESPONSES,
    )
    async def healthz() -> Health:
        return Health(status="ok", model=predictor.info.model)

    @app.get(
        "/api/model",
        summary="The served model: name, parameters, accuracy, calibration",
        response_model=ModelInfo,
        responses=GET_RESPONSES,
    )
    async def model_info() -> ModelInfo:
        return service.model_summary()

    @app.post(
        "/api/predict",
        summary="Read one digit",
        openapi_extra=predict_body_doc(),
        response_model=Answer,
        response_model_exclude_none=True,
        responses=PREDICT_RESPONSES,
    )
    async def predict(
        request: Request,
        explain: bool = Query(False, description="add activations, MLP templates and the saliency map"),
    ) -> JSONResponse:
        kind = media_type(request)
        if kind == "multipart/form-data":
            data, name = await read_upload(request)
            answer = await to_thread.run_sync(service.predict_bytes, data, explain, name, limiter=decodes)
        elif kind == "application/json":
            body = await read_json(request)
            if isinstance(body, ImageBody):
                data = decode_base64_image(body.image)
                answer = await to_thread.run_sync(service.predict_bytes, data, explain, '"image"', limiter=decodes)
            else:
                pixels = check_pixels(body.pixels)
                answer = await to_thread.run_sync(service.predict_pixels, pixels, explain)
        else:
            shown = kind or "none"
            raise InputError(
                415,
                f"Content-Type {shown} is not supported: send multipart/form-data "
                '(image in field "file") or application/json',
            )
        # Serialised here, without FastAPI validating the 784 saliency values again on the way out.
        return JSONResponse(answer.model_dump(exclude_none=True))

    docs_pages(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # Last added runs first: the guard outermost (a wrong Host gets nothing), CORS (so even a 413 carries its
    # headers), then security headers, then the body limits.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, timeout=body_timeout)
    app.add_middleware(SecurityHeadersMiddleware)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["Content-Type"],
            max_age=600,
        )
    app.add_middleware(GuardMiddleware, allowed_hosts=hosts)
    return app


# ----------------------------------------------------------------------------------------------------------
# Running it: uvicorn with a header timeout and a connection cap
# ----------------------------------------------------------------------------------------------------------


def raw_response(status: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection, for the protocol level (no app there)."""
    body = json.dumps({"error": message}).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


HEADERS_TOO_SLOW = raw_response("408 Request Timeout", "request headers not received in time")
TOO_MANY_CONNECTIONS = raw_response("503 Service Unavailable", "too many open connections")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with what it lacks against slow or many clients: a deadline for the request
    line and headers (uvicorn has none: a half-sent header held its connection forever), and a cap on open
    connections enforced when they open (uvicorn's limit_concurrency answers 503 only once headers arrive).
    Subclassed per server by `protocol_class` with the two limits."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(HEADERS_TOO_SLOW)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the first bytes of a next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()  # headers complete: the body has its own deadline (BodyLimitMiddleware)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def protocol_class(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    return type(
        "DigitlabH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )


def uvicorn_config(
    app: ASGIApp,
    host: str,
    port: int,
    log_level: str = "info",
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    keep_alive_timeout: int = DEFAULT_KEEP_ALIVE_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Any:
    """The uvicorn.Config `serve` runs (tests run the same one)."""
    import uvicorn

    for name, value in [
        ("header_timeout", header_timeout),
        ("keep_alive_timeout", keep_alive_timeout),
        ("max_connections", max_connections),
    ]:
        if value <= 0:
            raise ServeError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        server_header=False,
        http=protocol_class(header_timeout, max_connections),
        timeout_keep_alive=keep_alive_timeout,
        limit_concurrency=max_connections + 10,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        ws="none",
        lifespan="off",
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(host: str) -> list[str] | None:
    """On a loopback bind only this machine's names are accepted (DNS rebinding); elsewhere, any."""
    return sorted({"localhost", "127.0.0.1", "::1", host.lower()}) if is_loopback(host) else None


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


def serve(
    checkpoint: str | Path | Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    cors_origins: Iterable[str] = (),
    device: str = "auto",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "info",
    reject_below: float | None = None,
    allowed_hosts: Iterable[str] | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_decodes: int = DEFAULT_MAX_DECODES,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    keep_alive_timeout: int = DEFAULT_KEEP_ALIVE_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    tta: bool = False,
) -> None:
    """Load the checkpoint once, then serve the page and the API with uvicorn until interrupted.

    allowed_hosts None: this machine's names on a loopback bind, any Host otherwise; ["*"]: any.
    """
    from .prediction import Predictor

    origins = validate_origins(cors_origins)
    hosts = list(allowed_hosts) if allowed_hosts else default_allowed_hosts(host)
    sock = bind_socket(host, port)  # before the model loads: a busy port fails fast
    try:
        paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
        predictor = Predictor.from_checkpoints(paths, device=device, tta=tta)  # several: an ensemble
        app = create_app(
            predictor,
            max_body_bytes=max_body_bytes,
            cors_origins=origins,
            reject_below=reject_below,
            allowed_hosts=hosts,
            max_image_pixels=max_image_pixels,
            max_decodes=max_decodes,
            body_timeout=body_timeout,
        )
        config = uvicorn_config(
            app,
            host,
            sock.getsockname()[1],
            log_level=log_level,
            header_timeout=header_timeout,
            keep_alive_timeout=keep_alive_timeout,
            max_connections=max_connections,
        )
        if not is_loopback(host):
            print(
                f"digitlab: warning: listening on {host}, reachable from other machines; the API has no authentication",
                file=sys.stderr,
                flush=True,
            )
        what = predictor.info.model if len(paths) == 1 else f"an ensemble of {len(paths)} models"
        print(
            f"digitlab: serving {what} from {', '.join(map(str, paths))} on "
            f"{url_for(host, sock.getsockname()[1])} (Ctrl+C to stop)",
            flush=True,
        )
        import uvicorn

        server = uvicorn.Server(config)
        server.run(sockets=[sock])
        if server.should_exit:
            # Stopped by Ctrl+C: uvicorn re-raises the signal once it has shut down, but where SIGINT's
            # disposition is "ignore" (inherited from a parent) or asyncio swallows it, run() just returns;
            # raise it here so the CLI exits 130 ("interrupted") either way.
            raise KeyboardInterrupt
    finally:
        sock.close()
