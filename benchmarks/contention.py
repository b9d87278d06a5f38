"""CPU contention: `digitlab train` alone vs two at once, and `digitlab serve` beside a training run, with the
thread policy of `digitlab.threads` on (the default) and off (DIGITLAB_THREADS=off: torch's own defaults).

Whole processes, as a user runs them:

- alone: one `digitlab train --data DIR --quiet --out TMP` (the tutorial's MLP, 2 epochs), wall time;
- pair: two of them started together, the wall time of each;
- serve: `digitlab serve` on 127.0.0.1 (a random-weight MLP), one client sending `--requests` pixel
  predictions one after another while a training run works beside it; p50/p99 latency of those requests.

The modes alternate within each repeat (off, on, off, on...), so that a change in the machine's other load
hits both alike. Prints every run, then medians and ratios. Loopback only; every request count is bounded.

    python benchmarks/contention.py --data ../shared/datasets/mnist --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_data_option, mnist_files
from serve_load import random_checkpoint, start_server, stop_server

MODES = {"off": {"DIGITLAB_THREADS": "off"}, "on": {}}  # on: digitlab.threads' default policy ("auto")
SETTINGS = ("DIGITLAB_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def env_for(mode: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    return {**clean, **MODES[mode]}


def start_train(data_dir: str, out: Path, mode: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "digitlab", "train", "--data", data_dir, "--quiet", "--out", str(out)]
    return subprocess.Popen(command, env=env_for(mode), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, started: float) -> float:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"contention: digitlab train failed ({proc.returncode}): {err.strip()[-300:]}")
    return time.perf_counter() - started


def train_runs(data_dir: str, tmp: Path, mode: str, count: int) -> list[float]:
    """Wall seconds of each of `count` training runs started together."""
    started = time.perf_counter()
    procs = [start_train(data_dir, tmp / f"{mode}-{count}-{k}-{time.monotonic_ns()}", mode) for k in range(count)]
    return [finish(proc, started) for proc in procs]


def serve_beside_training(data_dir: str, tmp: Path, mode: str, checkpoint: Path, requests: int) -> list[float]:
    """Latencies (ms) of sequential /api/predict requests sent while a training run works beside the server."""
    os.environ.pop("DIGITLAB_THREADS", None)
    os.environ.update(MODES[mode])  # start_server passes this process's environment on
    server, url = start_server(checkpoint, "cpu")
    latencies: list[float] = []
    try:
        body = {"pixels": np.random.default_rng(0).random(784).round(4).tolist()}
        with httpx.Client(timeout=30) as client:
            for _ in range(20):  # warm-up
                client.post(f"{url}/api/predict", json=body).raise_for_status()
            trainer = start_train(data_dir, tmp / f"serve-{mode}-{time.monotonic_ns()}", mode)
            time.sleep(3.0)  # past the trainer's imports: measure beside the epochs
            while trainer.poll() is None and len(latencies) < requests:
                t0 = time.perf_counter()
                client.post(f"{url}/api/predict", json=body).raise_for_status()
                latencies.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.005)  # a user drawing, not a flood: about 100-200 requests/s
            trainer.kill()
            trainer.wait()
    finally:
        stop_server(server)
        os.environ.pop("DIGITLAB_THREADS", None)
    return latencies


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(parser)
    parser.add_argument("--repeats", type=int, default=3, help="Rounds of every measurement (median reported).")
    parser.add_argument("--requests", type=int, default=400, help="Most requests per serve measurement.")
    parser.add_argument("--modes", default="off,on", help="Comma-separated: off (DIGITLAB_THREADS=off), on.")
    parser.add_argument("--skip-serve", action="store_true")
    args = parser.parse_args()
    mnist_files(parser, args.data)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")

    alone: dict[str, list[float]] = {m: [] for m in modes}
    pair: dict[str, list[float]] = {m: [] for m in modes}
    serve: dict[str, list[float]] = {m: [] for m in modes}
    serve_p99: dict[str, list[float]] = {m: [] for m in modes}
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="contention-") as name:
        tmp = Path(name)
        checkpoint = random_checkpoint(tmp)
        for r in range(args.repeats):
            for mode in modes:
                alone[mode] += train_runs(args.data, tmp, mode, 1)
                times = train_runs(args.data, tmp, mode, 2)
                pair[mode] += times
                line = (
                    f"round {r + 1} {mode:3}: alone {alone[mode][-1]:5.1f} s, pair {times[0]:5.1f} / {times[1]:5.1f} s"
                )
                if not args.skip_serve:
                    latencies = serve_beside_training(args.data, tmp, mode, checkpoint, args.requests)
                    serve[mode] += latencies
                    serve_p99[mode].append(p99(latencies))
                    line += (
                        f", serve {len(latencies)} requests p50 {statistics.median(latencies):.1f} ms "
                        f"p99 {serve_p99[mode][-1]:.1f} ms"
                    )
                print(line + f"  (load {os.getloadavg()[0]:.1f})", flush=True)

    print()
    print(
        "| policy | alone s (median) | pair s, each (median) | pair / alone | serve p99 ms beside training "
        "(median of rounds) |"
    )
    print("|---|---|---|---|---|")
    for mode in modes:
        a, p = statistics.median(alone[mode]), statistics.median(pair[mode])
        s = f"{statistics.median(serve_p99[mode]):.1f}" if serve_p99[mode] else "-"
        label = "DIGITLAB_THREADS=off (before)" if mode == "off" else "default policy (after)"
        print(f"| {label} | {a:.1f} | {p:.1f} | {p / a:.2f}x | {s} |")
    if "on" in modes and "off" in modes:
        ratio = statistics.median(alone["on"]) / statistics.median(alone["off"])
        print(
            f"\nalone, on / off: {ratio:.3f} (target <= 1.05); pair / alone with the policy: "
            f"{statistics.median(pair['on']) / statistics.median(alone['on']):.2f}x (target <= 2.5x)"
        )


if __name__ == "__main__":
    main()
