"""Load test of `digitlab serve`: N concurrent clients on 127.0.0.1 for a bounded time and request count.

    python benchmarks/serve_load.py [--checkpoint RUN_DIR] [--data ../shared/datasets/mnist]
                                    [--clients 8] [--duration 10] [--max-requests 20000]
                                    [--scenarios upload,upload+explain,pixels]

Starts `digitlab serve --port 0` in its own process (so the clients do not share its interpreter), waits
for /healthz, then runs each scenario in turn against the same server:
    upload           POST /api/predict, multipart PNG of an MNIST test digit (what a script would send)
    upload+explain   the same with ?explain=true (what the drawing page sends on every update)
    pixels           POST /api/predict, JSON {"pixels": [784 numbers]} (no decoding, no preprocessing)
    python benchmarks/serve_load.py --costs     # instead: the ms of a saliency map, the memory of a big PNG

Each scenario stops after --duration seconds or --max-requests requests, whichever comes first, after a short
warm-up. Prints requests/s, p50/p90/p99/max latency and the error count (any non-200 answer, or a 200 whose
body is not a digit); exits 1 if there was any error. Without --checkpoint a seeded random-weight MLP is used:
the work per request, hence the figures, does not depend on the weights. Without MNIST (--data or
$DIGITLAB_DATA), seeded synthetic strokes are sent instead of test digits.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

SCENARIOS = ("upload", "upload+explain", "pixels")


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def sample_digits(data_dir: str | None, n: int) -> list[np.ndarray]:
    """n MNIST test images (28x28 uint8), or seeded synthetic strokes when MNIST is not found."""
    data_dir = data_dir or os.environ.get("DIGITLAB_DATA")
    if data_dir:
        from digitlab import data, datafiles

        if datafiles.find_files(Path(data_dir)) is not None:
            return [img.numpy() for img in data.load(data_dir, download=False).test_images[:n]]
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        img = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(img)
        points = [tuple(rng.integers(5, 23, size=2).tolist()) for _ in range(3)]
        draw.line(points, fill=255, width=2)
        images.append(np.asarray(img))
    return images


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Request:
    """One HTTP/1.1 request, encoded once (by httpx, so multipart and JSON bodies are exactly standard)."""

    raw: bytes


def encode(host: str, port: int, path: str, **kwargs) -> Request:
    request = httpx.Request("POST", f"http://{host}:{port}{path}", **kwargs)
    body = request.read()
    headers = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    return Request(f"POST {path} HTTP/1.1\r\n{headers}\r\n".encode("latin-1") + body)


def requests_for(scenario: str, images: list[np.ndarray], host: str, port: int) -> list[Request]:
    if scenario == "pixels":
        return [
            encode(host, port, "/api/predict", json={"pixels": (img / 255.0).round(4).ravel().tolist()})
            for img in images
        ]
    path = "/api/predict?explain=true" if scenario == "upload+explain" else "/api/predict"
    return [encode(host, port, path, files={"file": ("digit.png", png(img), "image/png")}) for img in images]


def random_checkpoint(directory: Path, model: str = "mlp") -> Path:
    """A seeded random-weight checkpoint (MLP by default): serving cost does not depend on the weights."""
    import torch

    from digitlab import checkpoint
    from digitlab.checkpoint import CheckpointInfo
    from digitlab.models import build_model

    torch.manual_seed(0)
    base = directory / f"random-{model}"
    checkpoint.save(
        base,
        build_model(model),
        CheckpointInfo(model=model, model_config={}, mean=0.1307, std=0.3081, class_names=[str(d) for d in range(10)]),
    )
    return base.with_suffix(".safetensors")


# ----------------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------------


def start_server(checkpoint: Path, device: str) -> tuple[subprocess.Popen, str]:
    """`digitlab serve` on 127.0.0.1, any free port; returns the process and its URL once /healthz answers."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "digitlab",
            "serve",
            "--checkpoint",
            str(checkpoint),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            device,
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = proc.stdout.readline()
    if " on http://127.0.0.1:" not in line:
        proc.kill()
        raise SystemExit(f"serve_load: the server did not start: {line.strip() or 'no output'}")
    url = line.split(" on ", 1)[1].split()[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"serve_load: {url}/healthz did not answer within 60 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


# ----------------------------------------------------------------------------------------------------------
# The clients
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    errors: int = 0
    first_error: str = ""

    @property
    def requests(self) -> int:
        return len(self.latencies) + self.errors

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")

    def row(self) -> str:
        rate = self.requests / self.seconds if self.seconds else 0.0
        return (
            f"| {self.scenario} | {self.clients} | {self.requests} | {self.seconds:.1f} | {rate:.0f} | "
            f"{self.percentile(50):.1f} | {self.percentile(90):.1f} | {self.percentile(99):.1f} | "
            f"{max(self.latencies) * 1000 if self.latencies else float('nan'):.1f} | {self.errors} |"
        )


class Connection:
    """A keep-alive HTTP/1.1 connection that sends pre-encoded requests and reads Content-Length answers.

    Deliberately minimal: httpx's async client, tried first, spent more CPU than the server on this
    2-core machine and capped the measured rate at about 130 requests/s with 32 clients (even on /healthz,
    which the server answers at about 3,200 requests/s); this client leaves the cores to the server.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, request: Request) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request.raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        body = await self.reader.readexactly(int(headers[b"content-length"]))
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run_scenario(
    host: str,
    port: int,
    scenario: str,
    requests: list[Request],
    clients: int,
    duration: float,
    max_requests: int,
    warmup: int,
) -> Result:
    result = Result(scenario, clients)
    connections = [Connection(host, port) for _ in range(clients)]
    for i in range(warmup):  # first requests open connections and warm torch's kernels
        await connections[i % clients].request(requests[i % len(requests)])
    issued = 0
    start = time.perf_counter()
    deadline = start + duration

    async def worker(k: int) -> None:
        nonlocal issued
        i = k
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            request = requests[i % len(requests)]
            i += clients
            t0 = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(connections[k].request(request), timeout=30)
                ok = status == 200 and json.loads(body).get("digit") in range(10)
                why = "" if ok else f"HTTP {status}: {body[:200]!r}"
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
                connections[k].close()
                ok, why = False, f"{exc.__class__.__name__}: {exc}"
            if ok:
                result.latencies.append(time.perf_counter() - t0)
            else:
                result.errors += 1
                result.first_error = result.first_error or why

    await asyncio.gather(*(worker(k) for k in range(clients)))
    result.seconds = time.perf_counter() - start
    for connection in connections:
        connection.close()
    return result


MEMORY_SCRIPT = """
import sys
import numpy as np
from digitlab.preprocessing import load_image, preprocess
from digitlab.serving import InferenceService

class Info:
    temperature = 1.0
service = InferenceService(type("P", (), {"info": Info()})(), max_image_pixels=45_000_000)
data = open(sys.argv[2], "rb").read()
preprocess(np.zeros((28, 28), np.float32) + np.eye(28, dtype=np.float32))  # warm up
def status(key):  # kB, from /proc/self/status
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key)))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (ru_maxrss would include the parent's)
before = status("VmRSS:")
if sys.argv[1] == "before":
    x = preprocess(load_image(data, name="big.png"))  # what the server did: full-size decode, float copies
else:
    x = preprocess(service.decode(data, "big.png"))  # decoded and reduced at once
print((status("VmHWM:") - before) / 1024)
"""


PATCHES = [(i, j) for i in range(0, 26, 2) for j in range(0, 26, 2)]  # occlusion: 4x4 patches, stride 2


def costs() -> None:
    """The ms of one saliency map (integrated gradients, 32 steps, vs occlusion of 4x4 patches at stride 2)
    for each model, and the peak memory of decoding a 6320x6320 RGBA PNG the old way and the new way."""
    import torch

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tests.test_serving import big_png  # a PNG written row by row: a few kB, never whole in memory

    from digitlab.prediction import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
        for name in ("mlp", "cnn"):
            path = random_checkpoint(Path(tmp), name)
            predictor = Predictor.from_checkpoint(path, device="cpu")
            x = sample_digits(None, 1)[0].astype(np.float32) / 255

            def occlusion(x: np.ndarray = x, predictor: Predictor = predictor) -> None:
                batch = np.repeat(x[None], len(PATCHES), axis=0)
                for k, (i, j) in enumerate(PATCHES):
                    batch[k, i : i + 4, j : j + 4] = 0
                predictor.predict_arrays(batch)

            for label, run in [
                ("integrated gradients, 32 steps", lambda x=x, p=predictor: p.saliency(x)),
                (f"occlusion, {len(PATCHES)} patches", occlusion),
            ]:
                run()
                times = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    run()
                    times.append(1000 * (time.perf_counter() - t0))
                print(f"{name}: {label}: median {statistics.median(times):.1f} ms, min {min(times):.1f} ms")
        png_path = Path(tmp) / "big.png"
        png_path.write_bytes(big_png(6320, 6320))
        for way in ("before", "after"):
            out = subprocess.run(
                [sys.executable, "-c", MEMORY_SCRIPT, way, str(png_path)], capture_output=True, text=True, check=True
            )
            print(
                f"6320x6320 RGBA PNG ({png_path.stat().st_size / 1000:.0f} kB), {way}: peak memory grew "
                f"{float(out.stdout.strip()):.0f} MB"
            )


def main() -> None:
    if "--costs" in sys.argv[1:]:
        costs()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a seeded random-weight MLP")
    parser.add_argument("--data", default=None, help="MNIST dir (default $DIGITLAB_DATA; else synthetic strokes)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario (upper bound)")
    parser.add_argument("--max-requests", type=int, default=20_000, help="requests per scenario (upper bound)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown or args.clients < 1 or args.duration <= 0 or args.max_requests < 1:
        parser.error(f"bad arguments (unknown scenarios: {', '.join(sorted(unknown)) or 'none'})")

    images = sample_digits(args.data, 256)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or random_checkpoint(Path(tmp))
        proc, url = start_server(checkpoint, args.device)
        host, port = url.removeprefix("http://").rsplit(":", 1)[0], int(url.rsplit(":", 1)[1])
        try:
            model = httpx.get(f"{url}/api/model", timeout=10).json()
            print(
                f"server: {url}, model {model['model']} ({model['parameters']:,} parameters) on "
                f"{model['device']}; {os.cpu_count()} CPUs; {args.clients} clients, <= {args.duration:g} s and "
                f"<= {args.max_requests} requests per scenario",
                flush=True,
            )
            print(
                "\n| scenario | clients | requests | seconds | requests/s | p50 ms | p90 ms | p99 ms | max ms | "
                "errors |\n|---|---|---|---|---|---|---|---|---|---|"
            )
            results = []
            for scenario in scenarios:
                requests = requests_for(scenario, images, host, port)
                result = asyncio.run(
                    run_scenario(
                        host, port, scenario, requests, args.clients, args.duration, args.max_requests, args.warmup
                    )
                )
                results.append(result)
                print(result.row(), flush=True)
        finally:
            stop_server(proc)
    failed = [r for r in results if r.errors]
    for r in failed:
        print(f"{r.scenario}: {r.errors} errors, first: {r.first_error}", file=sys.stderr)
    if results:
        print(f"\nmedian p50 over scenarios: {statistics.median(r.percentile(50) for r in results):.1f} ms")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
