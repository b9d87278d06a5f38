"""The HTTP API of `digitlab serve`: every route, every error case, CORS, body limit, threads, the CLI."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

with warnings.catch_warnings():
    # starlette 1.x warns at import that its TestClient will move to httpx2; it still works as documented.
    warnings.filterwarnings("ignore", message=".*httpx2")
    from starlette.testclient import TestClient

from digitlab.models import count_parameters

from .conftest import save_random_checkpoint

SIDECAR_METRICS = {"test_accuracy": 0.1234, "test_loss": float("nan")}  # NaN: JSON must cope
LIMIT = 50_000  # a small body limit so the 413 tests send little


# ----------------------------------------------------------------------------------------------------------
# Fixtures: random-weight checkpoints, the app, images
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-ckpt")


@pytest.fixture(scope="module")
def mlp_path(ckpt_dir) -> Path:
    return save_random_checkpoint(ckpt_dir / "mlp", "mlp", metrics=SIDECAR_METRICS, epoch=2)


@pytest.fixture(scope="module")
def predictor(mlp_path):
    from digitlab.prediction import Predictor

    return Predictor.from_checkpoint(mlp_path, device="cpu")


@pytest.fixture(scope="module")
def app(predictor):
    from digitlab.serving import create_app

    return create_app(predictor, max_body_bytes=LIMIT)


@pytest.fixture()
def client(app):
    # raise_server_exceptions (the default): any unhandled exception in the app fails the test
    with TestClient(app) as c:
        yield c


def digit_array(kind: int, size: int = 28) -> np.ndarray:
    """A white-on-black uint8 drawing: 0 a ring, 1 a bar, 7 a bar with a top stroke, 4 a cross-like shape."""
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    s = size / 28
    w = max(1, round(2.5 * s))
    if kind == 0:
        d.ellipse([8 * s, 5 * s, 20 * s, 23 * s], outline=255, width=w)
    elif kind == 1:
        d.line([14 * s, 4 * s, 14 * s, 24 * s], fill=255, width=w)
    elif kind == 7:
        d.line([8 * s, 6 * s, 20 * s, 6 * s], fill=255, width=w)
        d.line([20 * s, 6 * s, 12 * s, 24 * s], fill=255, width=w)
    else:
        d.line([17 * s, 4 * s, 17 * s, 24 * s], fill=255, width=w)
        d.line([8 * s, 16 * s, 21 * s, 16 * s], fill=255, width=w)
        d.line([8 * s, 16 * s, 15 * s, 4 * s], fill=255, width=w)
    return np.asarray(img)


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def decode_png(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image)


def check_answer(body: dict) -> None:
    assert set(body) >= {"digit", "confidence", "probabilities", "preprocessed"}
    assert body["digit"] in range(10)
    assert len(body["probabilities"]) == 10
    assert math.isclose(sum(body["probabilities"]), 1.0, abs_tol=1e-4)
    assert body["confidence"] == max(body["probabilities"])
    assert body["probabilities"][body["digit"]] == body["confidence"]
    seen = decode_png(body["preprocessed"])
    assert seen.shape == (28, 28) and seen.dtype == np.uint8 and seen.max() > 0


# ----------------------------------------------------------------------------------------------------------
# Routes
# ----------------------------------------------------------------------------------------------------------


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "mlp"}


def test_model_info_comes_from_the_checkpoint(client, predictor):
    body = client.get("/api/model").json()
    assert body["model"] == "mlp"
    assert body["parameters"] == count_parameters(predictor.model) == 669_706
    assert body["accuracy"] == 0.1234
    assert body["metrics"]["test_loss"] is None  # NaN is not JSON: it comes back as null, not as a 500
    assert body["class_names"] == [str(d) for d in range(10)]
    assert body["device"] == "cpu"
    assert "784-512-512-10" in body["description"]


def test_page_and_its_files_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<canvas id="pad"' in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    for name, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        response = client.get(f"/static/{name}")
        assert response.status_code == 200
        assert kind in response.headers["content-type"]
        assert response.headers["x-content-type-options"] == "nosniff"


def test_page_loads_nothing_from_other_hosts():
    """Offline: no http(s) URL in the page's own files (the only link is to the API docs, relative)."""
    from digitlab.serving import STATIC_DIR

    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path.name


def test_api_docs_work_offline(client):
    """/docs and /redoc load Swagger UI and ReDoc from this server: no other host is needed."""
    for route in ("/docs", "/redoc"):
        page = client.get(route)
        assert page.status_code == 200
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sources and all(s.startswith("/") for s in sources), (route, sources)
        for source in sources:
            assert client.get(source).status_code == 200, source


def test_openapi_documents_both_body_kinds(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert {"/api/model", "/healthz"} <= set(spec["paths"])


def test_predict_multipart_upload(client):
    response = client.post("/api/predict", files={"file": ("seven.png", png_bytes(digit_array(7)), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    check_answer(body)
    assert "activations" not in body


def test_upload_reads_as_the_predictor_reads_it(client, predictor):
    """The server's answer for a file is the library's: same preprocessed image, same probabilities."""
    data = png_bytes(digit_array(4, size=160))
    body = client.post("/api/predict", files={"file": ("four.png", data, "image/png")}).json()
    expected = predictor.predict_one(data)
    assert expected.error is None
    np.testing.assert_allclose(body["probabilities"], expected.probabilities, rtol=1e-6, atol=1e-7)
    assert body["digit"] == expected.digit
    from digitlab.preprocessing import load_image, preprocess

    seen = preprocess(load_image(data))
    np.testing.assert_array_equal(decode_png(body["preprocessed"]), np.rint(seen * 255).astype(np.uint8))


def test_predict_json_image_matches_multipart(client):
    data = png_bytes(digit_array(4, size=200))  # a big drawing: preprocessing scales it down
    multipart = client.post("/api/predict", files={"file": ("four.png", data, "image/png")}).json()
    b64 = base64.b64encode(data).decode()
    plain = client.post("/api/predict", json={"image": b64}).json()
    data_url = client.post("/api/predict", json={"image": "data:image/png;base64," + b64}).json()
    check_answer(plain)
    assert plain == multipart == data_url


def test_predict_jpeg_and_any_file_field_name(client):
    data = png_bytes(np.stack([digit_array(0, 120)] * 3, axis=-1), fmt="JPEG")
    response = client.post("/api/predict", files={"upload": ("zero.jpg", data, "image/jpeg")})
    assert response.status_code == 200, response.text
    check_answer(response.json())


def test_predict_pixels_uses_them_as_they_are(client, predictor):
    x = digit_array(1).astype(np.float32) / 255.0
    body = client.post("/api/predict", json={"pixels": x.ravel().tolist()}).json()
    check_answer(body)
    expected = predictor.predict_arrays(x[None].copy())[0]  # a copy: predict_arrays may normalise in place
    np.testing.assert_allclose(body["probabilities"], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(decode_png(body["preprocessed"]), np.rint(x * 255).astype(np.uint8))
    rows = client.post("/api/predict", json={"pixels": x.tolist()}).json()  # 28 rows of 28 work too
    assert rows == body


def test_explain_mlp_adds_both_hidden_layers_and_logits(client):
    x = digit_array(7).astype(np.float32) / 255.0
    plain = client.post("/api/predict", json={"pixels": x.ravel().tolist()}).json()
    body = client.post("/api/predict?explain=true", json={"pixels": x.ravel().tolist()}).json()
    acts = body["activations"]
    assert set(acts) == {"hidden1", "hidden2", "logits"}
    assert len(acts["hidden1"]) == len(acts["hidden2"]) == 512 and len(acts["logits"]) == 10
    assert min(acts["hidden1"]) >= 0 and min(acts["hidden2"]) >= 0  # after ReLU
    logits = np.array(acts["logits"])
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(body["probabilities"], softmax, atol=1e-3)  # logits are rounded to 4 decimals
    assert body["digit"] == plain["digit"] == int(np.argmax(logits))
    np.testing.assert_allclose(body["probabilities"], plain["probabilities"], atol=1e-3)


def test_explain_uses_pixels_as_they_are(client, predictor):
    """Pixels that preprocessing would change (noise, off-centre) are still what the model sees with explain."""
    x = np.random.default_rng(3).uniform(0, 1, (28, 28)).astype(np.float32)
    x[:, :14] = 0  # ink on the right half only
    body = client.post("/api/predict?explain=true", json={"pixels": x.ravel().tolist()}).json()
    expected = predictor.predict_arrays(x[None].copy())[0]
    np.testing.assert_allclose(body["probabilities"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(decode_png(body["preprocessed"]), np.rint(x * 255).astype(np.uint8))


def test_explain_cnn_adds_feature_maps(ckpt_dir):
    from digitlab.prediction import Predictor
    from digitlab.serving import create_app

    cnn = Predictor.from_checkpoint(
        save_random_checkpoint(ckpt_dir / "cnn", "cnn", metrics=SIDECAR_METRICS, epoch=2), device="cpu"
    )
    with TestClient(create_app(cnn)) as c:
        data = png_bytes(digit_array(0))
        body = c.post("/api/predict?explain=true", files={"file": ("0.png", data, "image/png")}).json()
        assert c.get("/api/model").json()["model"] == "cnn"
    check_answer(body)
    acts = body["activations"]
    assert {"conv1", "conv2", "conv3", "logits"} <= set(acts)
    assert np.array(acts["conv1"]).shape == (8, 14, 14)
    assert np.array(acts["conv3"]).shape == (8, 7, 7)
    assert len(acts["logits"]) == 10


# ----------------------------------------------------------------------------------------------------------
# Bad input: JSON errors with the right status, and the server keeps serving
# ----------------------------------------------------------------------------------------------------------


def expect_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    assert isinstance(message, str) and "\n" not in message
    for word in words:
        assert word in message.lower(), message


def test_body_over_the_limit_is_413_from_content_length(client):
    big = png_bytes(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8))
    assert len(big) > LIMIT
    expect_error(client.post("/api/predict", files={"file": ("big.png", big, "image/png")}), 413, "too large")
    expect_error(client.post("/api/predict", json={"image": base64.b64encode(big).decode()}), 413, "limit")


def test_body_over_the_limit_is_413_when_streamed_without_length(client):
    def chunks():  # no Content-Length: the limit must be enforced while the body streams in
        for _ in range(20):
            yield b'{"pixels": [' + b"0," * 2000

    response = client.post("/api/predict", content=chunks(), headers={"content-type": "application/json"})
    expect_error(response, 413, "too large")


def test_default_limit_is_5_mb(predictor):
    from digitlab.serving import DEFAULT_MAX_BODY_BYTES, create_app

    assert DEFAULT_MAX_BODY_BYTES == 5_000_000
    with TestClient(create_app(predictor)) as c:
        body = b"x" * 5_000_001
        expect_error(c.post("/api/predict", content=body, headers={"content-type": "application/json"}), 413)
        expect_error(
            c.post("/api/predict", content=body[:-2], headers={"content-type": "application/json"}),
            400,
            "not valid json",
        )


@pytest.mark.parametrize("content_type", ["text/plain", "image/png", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/api/predict", content=png_bytes(digit_array(1)), headers=headers)
    expect_error(response, 415, "content-type", "multipart/form-data", "application/json")


def test_not_an_image_is_400(client):
    expect_error(
        client.post("/api/predict", files={"file": ("x.png", b"hello, not a png", "image/png")}),
        400,
        "file 'x.png'",
        "not an image",
    )
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"
    expect_error(
        client.post("/api/predict", json={"image": base64.b64encode(pdf).decode()}), 400, '"image"', "not an image"
    )


def test_corrupt_image_is_400(client):
    data = png_bytes(digit_array(4, size=120))
    expect_error(
        client.post("/api/predict", files={"file": ("cut.png", data[: len(data) // 2], "image/png")}), 400, "image"
    )
    flipped = bytearray(data)
    flipped[60:80] = b"\x00" * 20  # damaged image data: CRC and zlib stream no longer match
    expect_error(client.post("/api/predict", files={"file": ("bad.png", bytes(flipped), "image/png")}), 400, "image")


def test_blank_image_is_422(client):
    black = png_bytes(np.zeros((28, 28), np.uint8))
    expect_error(
        client.post("/api/predict", files={"file": ("black.png", black, "image/png")}), 422, "black.png", "no ink"
    )
    expect_error(client.post("/api/predict", json={"pixels": [0] * 784}), 422, "blank")


@pytest.mark.parametrize(
    "body, status, words",
    [
        ("{not json", 400, ["not valid json"]),
        ("[1, 2, 3]", 422, ["object"]),
        ("{}", 422, ["image", "pixels", "neither"]),
        ('{"image": "", "pixels": []}', 422, ["both"]),
        ('{"image": 12}', 422, ["base64 string"]),
        ('{"image": "***not base64***"}', 400, ["base64"]),
        ('{"image": "data:image/png,abc"}', 400, ["data url"]),
        ('{"pixels": [0.5, 0.5]}', 422, ["784", "got 2"]),
        ('{"pixels": "all white"}', 422, ["list"]),
        ('{"pixels": [' + ",".join(["2"] * 784) + "]}", 422, ["[0, 1]"]),
        ('{"pixels": [' + ",".join(["NaN"] * 784) + "]}", 422, ["finite"]),
        ('{"pixels": [' + ",".join(["true"] * 784) + "]}", 422, ["numbers"]),
    ],
)
def test_bad_json_bodies(client, body, status, words):
    response = client.post("/api/predict", content=body.encode(), headers={"content-type": "application/json"})
    expect_error(response, status, *words)


def test_multipart_without_a_file_is_422(client):
    expect_error(client.post("/api/predict", files={"note": (None, "no file here")}), 422, "file")


def test_bad_explain_flag_and_unknown_routes_are_json(client):
    expect_error(client.post("/api/predict?explain=maybe", json={"pixels": [0.5] * 784}), 422, "explain")
    expect_error(client.get("/api/nothing"), 404, "not found")
    expect_error(client.get("/api/predict"), 405, "not allowed")


def test_server_still_serves_after_every_kind_of_bad_input(client):
    for kwargs in [
        dict(content=b"\xff" * 10, headers={"content-type": "application/json"}),
        dict(files={"file": ("x", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png")}),
        dict(content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}),
    ]:
        assert client.post("/api/predict", **kwargs).status_code in (400, 415, 422)
    assert client.get("/healthz").status_code == 200
    assert client.post("/api/predict", json={"pixels": [0.5] * 784}).status_code == 200


# ----------------------------------------------------------------------------------------------------------
# CORS
# ----------------------------------------------------------------------------------------------------------


def test_cors_is_off_by_default(client):
    response = client.get("/api/model", headers={"origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options(
        "/api/predict", headers={"origin": "https://elsewhere.example", "access-control-request-method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_only_the_given_origin(predictor):
    from digitlab.serving import create_app

    with TestClient(create_app(predictor, cors_origins=["https://app.example"])) as c:
        ok = c.get("/api/model", headers={"origin": "https://app.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        other = c.get("/api/model", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = c.options(
            "/api/predict",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        assert preflight.status_code == 200
        assert "POST" in preflight.headers["access-control-allow-methods"]


@pytest.mark.parametrize("origin", ["app.example", "https://app.example/path", "ftp://x.example", ""])
def test_bad_cors_origin_is_refused(predictor, origin):
    from digitlab.serving import ServeError, create_app

    with pytest.raises(ServeError, match="cors-origin"):
        create_app(predictor, cors_origins=[origin])


# ----------------------------------------------------------------------------------------------------------
# Threads: inference runs off the event loop, concurrent requests get their own answers
# ----------------------------------------------------------------------------------------------------------


def test_inference_never_runs_on_the_event_loop(client, predictor):
    where = []

    def record(module, inputs, output):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")

    first_linear = next(m for m in predictor.model.modules() if isinstance(m, torch.nn.Linear))
    handle = first_linear.register_forward_hook(record)
    try:
        client.post("/api/predict", json={"pixels": [0.5] * 784})
        client.post("/api/predict?explain=true", files={"file": ("1.png", png_bytes(digit_array(1)), "image/png")})
    finally:
        handle.remove()
    # plain: one pass; explain: activations and the saliency map's passes, all off the loop
    assert len(where) >= 2 and set(where) == {"worker thread"}, where


def test_concurrent_requests_get_their_own_answers(app, client):
    rng = np.random.default_rng(0)
    inputs = [
        np.clip(digit_array(k).astype(np.float32) / 255 + rng.uniform(0, 0.3, (28, 28)), 0, 1)
        for k in (0, 1, 4, 7)
        for _ in range(6)
    ]
    payloads = [{"pixels": x.ravel().tolist()} for x in inputs]
    sequential = [client.post("/api/predict?explain=true", json=p).json() for p in payloads]

    async def all_at_once():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            responses = await asyncio.gather(*(ac.post("/api/predict?explain=true", json=p) for p in payloads))
        return [r.json() for r in responses]

    assert asyncio.run(all_at_once()) == sequential


def test_create_app_does_not_load_anything(predictor, monkeypatch):
    """The model is loaded once, by whoever builds the Predictor; the app only holds it: building the app
    reads no checkpoint, builds no model and runs no forward pass (not even a warm-up)."""
    import safetensors.torch

    from digitlab import checkpoint, prediction
    from digitlab.serving import create_app

    def forbidden(*args, **kwargs):
        raise AssertionError("create_app loaded something")

    for owner, name in [
        (checkpoint, "load"),
        (checkpoint, "read_info"),
        (checkpoint, "safetensors_load"),
        (safetensors.torch, "load_file"),
        (torch, "load"),
        (prediction.Predictor, "from_checkpoint"),
        (prediction.Predictor, "from_onnx"),
    ]:
        monkeypatch.setattr(owner, name, forbidden)
    runs = []
    handles = [m.register_forward_hook(lambda *a: runs.append(1)) for m in predictor.model.modules()]
    calls = []
    for method in ("predict_arrays", "activations", "saliency", "predict", "predict_one", "explain"):
        monkeypatch.setattr(predictor, method, lambda *a, _m=method, **k: calls.append(_m))
    try:
        app = create_app(predictor)
    finally:
        for handle in handles:
            handle.remove()
    assert runs == [] and calls == []
    assert app.state.service.predictor is predictor


# ----------------------------------------------------------------------------------------------------------
# The command and the socket
# ----------------------------------------------------------------------------------------------------------


def test_bind_socket_defaults_and_errors():
    from digitlab.serving import ServeError, bind_socket, is_loopback

    sock = bind_socket("127.0.0.1", 0)
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        # connections inherit TCP_NODELAY: no 40 ms delayed-ACK stall between a response's headers and body
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        with pytest.raises(ServeError, match=f"127.0.0.1:{port}: cannot listen"):
            bind_socket("127.0.0.1", port)
    finally:
        sock.close()
    with pytest.raises(ServeError, match="--port 70000"):
        bind_socket("127.0.0.1", 70000)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "digitlab", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_serve_errors_are_one_line(tmp_path):
    missing = run_cli("serve", "--checkpoint", str(tmp_path / "nope.safetensors"), "--port", "0")
    assert missing.returncode == 1
    assert missing.stderr.startswith("digitlab: error: ") and missing.stderr.count("\n") == 1
    assert "nope" in missing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        taken = run_cli("serve", "--checkpoint", str(tmp_path / "nope"), "--port", str(port))
    assert taken.returncode == 1
    assert f"127.0.0.1:{port}: cannot listen" in taken.stderr
    usage = run_cli("serve", "--checkpoint", "x", "--port", "-5")
    assert usage.returncode == 2


@pytest.mark.slow
def test_cli_serve_runs_uvicorn_on_localhost_by_default(mlp_path):
    """`digitlab serve --port 0`: loads the checkpoint, listens on 127.0.0.1, answers, stops on Ctrl+C."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "digitlab",
            "serve",
            "--checkpoint",
            str(mlp_path),
            "--port",
            "0",
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()  # "digitlab: serving mlp from ... on http://127.0.0.1:PORT (Ctrl+C to stop)"
        assert " on http://127.0.0.1:" in line, f"stdout {line!r}"
        url = line.split(" on ", 1)[1].split()[0]
        for _ in range(200):  # uvicorn starts answering a moment after the line
            try:
                health = httpx.get(f"{url}/healthz", timeout=5)
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        else:
            pytest.fail(f"{url} never answered")
        assert health.json() == {"status": "ok", "model": "mlp"}
        answer = httpx.post(f"{url}/api/predict", json={"pixels": [0.5] * 784}, timeout=30)
        assert answer.status_code == 200 and answer.json()["digit"] in range(10)
        assert "server" not in answer.headers  # no version banner
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    # uvicorn shuts down gracefully, then re-raises Ctrl+C, which the CLI turns into status 130, no traceback
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr


# ----------------------------------------------------------------------------------------------------------
# Issue 13: Pydantic models, the OpenAPI schema generated from them
# ----------------------------------------------------------------------------------------------------------


def test_openapi_has_response_schemas_and_distinct_error_examples(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"Health", "ModelInfo", "Answer", "ErrorBody", "ImageBody", "PixelsBody", "Template"} <= set(schemas)
    for path, model in [("/healthz", "Health"), ("/api/model", "ModelInfo")]:
        ok = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{model}"}
    predict = spec["paths"]["/api/predict"]["post"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Answer")
    body = predict["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"oneOf": [{"$ref": "#/components/schemas/ImageBody"}, {"$ref": "#/components/schemas/PixelsBody"}]}
    examples = {}
    for status in ("400", "408", "413", "415", "422"):
        content = predict["responses"][status]["content"]["application/json"]
        assert content["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        examples[status] = content["example"]["error"]
    assert len(set(examples.values())) == 5  # each status its own example, not one 422 message for all
    assert "too large" in examples["413"] and "Content-Type" in examples["415"] and "not an image" in examples["400"]
    assert set(schemas["Answer"]["required"]) >= {"digit", "confidence", "probabilities", "preprocessed", "rejected"}
    assert "saliency" in schemas["Answer"]["properties"] and "runner_up" in schemas["Answer"]["properties"]


def test_answers_validate_against_their_models(client):
    from digitlab.serving import Answer, Health, ModelInfo

    Health.model_validate(client.get("/healthz").json())
    ModelInfo.model_validate(client.get("/api/model").json())
    body = client.post("/api/predict?explain=true", json={"pixels": (digit_array(7) / 255).ravel().tolist()}).json()
    Answer.model_validate(body)


def test_docs_examples_show_real_precision(client):
    """The API returns probabilities at full float precision; docs/serving.md shows them so."""
    body = client.post("/api/predict", json={"pixels": (digit_array(1) / 255).ravel().tolist()}).json()
    assert any(len(repr(p)) > 8 for p in body["probabilities"])
    docs = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    assert '"confidence": 0.9983021616935730' in docs or '"confidence": 0.998302161693573' in docs


# ----------------------------------------------------------------------------------------------------------
# Issue 12: calibrated confidence, --reject-below, saliency
# ----------------------------------------------------------------------------------------------------------


def test_model_info_says_whether_confidence_is_calibrated(predictor, tmp_path):
    from digitlab.prediction import Predictor
    from digitlab.serving import create_app

    body = TestClient(create_app(predictor)).get("/api/model").json()
    assert body["calibrated"] is False and body["temperature"] == 1.0 and body["reject_below"] is None
    hot_path = save_random_checkpoint(tmp_path / "hot" / "best", "mlp", seed=3, temperature=2.0)
    hot = Predictor.from_checkpoint(hot_path, device="cpu")
    with TestClient(create_app(hot, reject_below=0.9)) as c:
        body = c.get("/api/model").json()
        assert body["calibrated"] is True and body["temperature"] == 2.0 and body["reject_below"] == 0.9
        explained = c.post("/api/predict?explain=true", json={"pixels": (digit_array(7) / 255).ravel().tolist()}).json()
    logits = np.array(explained["activations"]["logits"]) / 2.0  # the explained answer applies the temperature
    np.testing.assert_allclose(explained["probabilities"], np.exp(logits) / np.exp(logits).sum(), atol=1e-3)


def test_reject_below_marks_unsure_answers(predictor):
    from digitlab.serving import ServeError, create_app

    pixels = {"pixels": (digit_array(4) / 255).ravel().tolist()}
    with TestClient(create_app(predictor)) as c:
        assert c.post("/api/predict", json=pixels).json()["rejected"] is False
    with TestClient(create_app(predictor, reject_below=1.0)) as c:  # nothing is that sure
        body = c.post("/api/predict", json=pixels).json()
    assert body["rejected"] is True and body["digit"] in range(10)  # the best guess is still given
    with pytest.raises(ServeError, match="reject-below"):
        create_app(predictor, reject_below=1.5)


def test_explain_returns_a_saliency_map_and_the_runner_up(client):
    x = digit_array(7).astype(np.float32) / 255.0
    body = client.post("/api/predict?explain=true", json={"pixels": x.ravel().tolist()}).json()
    saliency = np.array(body["saliency"])
    assert saliency.shape == (28, 28) and np.abs(saliency).max() > 0
    assert np.all(saliency[x == 0] == 0)  # from a black baseline: no ink, no credit
    second = int(np.argsort(body["probabilities"])[-2])
    assert body["runner_up"] == second != body["digit"]
    templates = body["templates"]  # the MLP: its most active first-layer units, with their weights
    assert 0 < len(templates) <= 12 and np.array(templates[0]["weights"]).shape == (28, 28)
    activations = [t["activation"] for t in templates]
    assert activations == sorted(activations, reverse=True)
    assert templates[0]["activation"] == pytest.approx(max(body["activations"]["hidden1"]), abs=1e-3)
    assert "saliency" not in client.post("/api/predict", json={"pixels": x.ravel().tolist()}).json()


# ----------------------------------------------------------------------------------------------------------
# Issue 11: bounded memory and time
# ----------------------------------------------------------------------------------------------------------


def test_head_on_every_get_route(client):
    for path in ("/", "/healthz", "/api/model", "/docs", "/redoc", "/openapi.json", "/static/app.js"):
        head = client.head(path)
        get = client.get(path)
        assert head.status_code == 200 == get.status_code, path
        assert head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
    assert client.head("/api/predict").status_code == 405


def test_host_allow_list_stops_dns_rebinding(predictor):
    from digitlab.serving import create_app, default_allowed_hosts, host_of

    assert default_allowed_hosts("127.0.0.1") == ["127.0.0.1", "::1", "localhost"]
    assert default_allowed_hosts("0.0.0.0") is None  # a network bind: names are the operator's to give
    assert host_of("[::1]:8000") == "::1" and host_of("LocalHost:80") == "localhost" and host_of("::1") == "::1"
    app = create_app(predictor, allowed_hosts=default_allowed_hosts("127.0.0.1"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200
        assert c.get("/healthz", headers={"host": "[::1]:8000"}).status_code == 200
        for evil in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            expect_error(c.get("/api/model", headers={"host": evil}), 400, "not allowed")
            expect_error(c.post("/api/predict", headers={"host": evil}, json={"pixels": [0.5] * 784}), 400, "host")
    with TestClient(create_app(predictor, allowed_hosts=["*"])) as c:
        assert c.get("/healthz", headers={"host": "anything.example"}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        '{"pixels": [' + "1" * 5000 + "]}",  # int("1" * 5000) raised ValueError: a 500
        '{"pixels": ' + "[" * 200_000 + "]" * 200_000 + "}",  # RecursionError: a 500
        '{"image": "x", "deep": ' + "[" * 200_000 + "]" * 200_000 + "}",
        "1" * 5000,
    ],
)
def test_json_limits_are_400(predictor, body):
    from digitlab.serving import create_app

    with TestClient(create_app(predictor)) as c:  # the default body limit: 400 kB of brackets get through
        response = c.post("/api/predict", content=body.encode(), headers={"content-type": "application/json"})
    expect_error(response, 400, "not valid json")


def big_png(width: int, height: int) -> bytes:
    """An RGBA PNG of a dark vertical bar on white paper, written row by row: a few kB, never in memory
    whole (Pillow would hold 4 bytes a pixel to encode it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    paper = b"\xff\xff\xff\xff" * width
    left, right = int(width * 0.45), int(width * 0.55)
    ink = b"\xff\xff\xff\xff" * left + b"\x10\x10\x10\xff" * (right - left) + b"\xff\xff\xff\xff" * (width - right)
    packer = zlib.compressobj(9)
    data = (
        b"".join(packer.compress(b"\x00" + (ink if 0.2 * height <= y < 0.8 * height else paper)) for y in range(height))
        + packer.flush()
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


MEMORY_SCRIPT = """
import sys, numpy as np
from digitlab.prediction import Predictor
from digitlab.serving import InferenceService, InputError
predictor = Predictor.from_checkpoint(sys.argv[1], device="cpu")
service = InferenceService(predictor, max_image_pixels=int(sys.argv[3]))
service.predict_pixels(np.full((28, 28), 0.5, np.float32), explain=False)  # warm up torch
data = open(sys.argv[2], "rb").read()
def status(key):  # kB, from /proc/self/status
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key)))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (ru_maxrss would include the parent's)
before = status("VmRSS:")
try:
    answer = service.predict_bytes(data, explain=False, name="big.png")
    result = f"digit {answer.digit}"
except InputError as exc:
    result = f"{exc.status} {exc.message}"
grown = (status("VmHWM:") - before) / 1024
print(f"{grown:.0f} MB|{result}")
"""


@pytest.mark.slow
def test_big_png_is_decoded_reduced_within_a_memory_bound(mlp_path, tmp_path):
    """A 171 kB PNG of 6320x6320 RGBA (under the 40 MP cap) cost ~1.5 GB of memory; decoded and reduced at
    once it costs little more than its decoded pixels (160 MB), and the default budget refuses it unread."""
    path = tmp_path / "big.png"
    path.write_bytes(big_png(6320, 6320))
    assert len(path.read_bytes()) < 300_000

    def run(budget: int) -> tuple[float, str]:
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(mlp_path), str(path), str(budget)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        grown, result = out.stdout.strip().splitlines()[-1].split("|")
        return float(grown.split()[0]), result

    grown, result = run(45_000_000)  # a budget that lets it through: decoded, reduced, read
    assert result == "digit " + result.split()[-1] and grown < 300, (grown, result)
    grown, result = run(16_000_000)  # the default budget: refused before decoding
    assert result.startswith("413 big.png: image too large to decode: 6320x6320") and grown < 50, (grown, result)


def test_big_jpeg_is_decoded_at_a_fraction_of_its_size(predictor, monkeypatch):
    from digitlab.serving import InferenceService

    image = Image.new("L", (4800, 4000), 255)
    ImageDraw.Draw(image).line([2400, 800, 2400, 3200], fill=0, width=300)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    service = InferenceService(predictor, max_image_pixels=2_000_000)  # 19 MP in full: over this budget
    decoded = service.decode(buffer.getvalue(), "photo.jpg")
    assert max(decoded.size) < 1024  # 1/4 scale by draft mode, then reduced
    assert service.predict_bytes(buffer.getvalue(), explain=False).digit in range(10)


def test_decodes_run_at_most_max_decodes_at_once(predictor):
    import threading

    from digitlab.serving import create_app

    app = create_app(predictor, max_decodes=2)
    service = app.state.service
    running, peak, lock = [0], [0], threading.Lock()
    real = service.decode

    def slow_decode(data, name):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return real(data, name)

    service.decode = slow_decode
    data = png_bytes(digit_array(7, size=64))

    async def six_at_once():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            return await asyncio.gather(
                *(ac.post("/api/predict", files={"file": ("7.png", data, "image/png")}) for _ in range(6))
            )

    assert all(r.status_code == 200 for r in asyncio.run(six_at_once()))
    assert peak[0] == 2


@pytest.fixture()
def guarded_server(predictor):
    """create_app behind uvicorn_config (the `serve` configuration) with short limits, on 127.0.0.1 only."""
    import threading

    import uvicorn

    from digitlab.serving import bind_socket, create_app, uvicorn_config

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = create_app(predictor, body_timeout=0.5, allowed_hosts=["127.0.0.1"])
    server = uvicorn.Server(
        uvicorn_config(
            app, "127.0.0.1", port, log_level="critical", header_timeout=0.5, keep_alive_timeout=1, max_connections=20
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    yield server, port
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def read_until_closed(conn: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start = time.monotonic()
    conn.settimeout(limit)
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {limit} s; got {data[:80]!r}")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - start


def test_slow_clients_are_cut_off(guarded_server):
    """Half-sent headers and half-sent bodies (1,000 of them held 1,009 descriptors) are closed after their
    timeouts; connections over the cap are refused at once; idle keep-alive connections are closed."""
    server, port = guarded_server
    conns = []
    try:
        for _ in range(15):  # half-sent headers
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: app")
            conns.append(("headers", conn))
        time.sleep(0.1)
        for _ in range(5):  # half-sent bodies
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(
                b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"pixels": [0.5, '
            )
            conns.append(("body", conn))
        time.sleep(0.2)
        over = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]  # over the cap of 20
        for conn in over:
            data, took = read_until_closed(conn, 3)
            assert data.startswith(b"HTTP/1.1 503") and took < 0.5, data
            conn.close()
        for kind, conn in conns:
            data, took = read_until_closed(conn, 3)
            assert data.startswith(b"HTTP/1.1 408"), (kind, data)
            assert b'"error"' in data and took < 1.5, (kind, took)
        # keep-alive: a finished request's idle connection is closed after keep_alive_timeout
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data, took = read_until_closed(idle, 3)
        assert data.startswith(b"HTTP/1.1 200") and 0.8 < took < 2.5, took
        idle.close()
    finally:
        for _, conn in conns:
            conn.close()
    for _ in range(50):
        if not server.server_state.connections:
            break
        time.sleep(0.05)
    assert not server.server_state.connections  # every descriptor the server held is released


def test_head_and_host_check_through_uvicorn(guarded_server):
    _, port = guarded_server
    head = httpx.head(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
    rebound = httpx.get(f"http://127.0.0.1:{port}/api/model", headers={"host": "evil.example"}, timeout=5)
    assert rebound.status_code == 400 and "not allowed" in rebound.json()["error"]


def test_serve_options_are_checked(predictor):
    from digitlab.serving import ServeError, create_app, uvicorn_config

    for kwargs in [dict(max_image_pixels=0), dict(max_decodes=0), dict(body_timeout=0)]:
        with pytest.raises(ServeError):
            create_app(predictor, **kwargs)
    with pytest.raises(ServeError, match="header-timeout"):
        uvicorn_config(create_app(predictor), "127.0.0.1", 0, header_timeout=0)


def test_reduce_in_stripes_equals_one_reduce():
    from digitlab.serving import reduce_in_stripes

    rng = np.random.default_rng(0)
    for mode, shape in [("RGBA", (301, 257, 4)), ("L", (300, 250))]:
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
        for factor in (2, 3, 7):
            expected = np.asarray(image.reduce(factor))
            np.testing.assert_array_equal(np.asarray(reduce_in_stripes(image, factor, rows=5)), expected)
