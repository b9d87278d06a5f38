"""Throughput of `digitlab predict` on a folder of 10,000 PNGs, next to the same images read from the IDX file.

Writes the MNIST test images as 28x28 PNG files into a temp folder, then times the real command line,
`python -m digitlab predict --checkpoint C --json FOLDER > out`, a few times (median), and the same on the
IDX file. Also checks both give the same accuracy (MNIST-like PNGs pass through preprocessing unchanged) and,
with --userlike N, times N user-like photos (200-600 px JPEG/PNG) written to a folder, where decoding and the
full preprocessing pipeline do the work.

    python benchmarks/predict_throughput.py --checkpoint runs/cnn --data ../shared/datasets/mnist
    python benchmarks/predict_throughput.py --checkpoint runs/cnn --repeats 5 --userlike 1000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import add_data_option, mnist_test_set
from digitlab.idx import write_idx
from userlike import make_userlike


def run_predict(checkpoint: str, target: str, device: str, out_path: Path) -> float:
    """Wall seconds of one `digitlab predict --json` run, output to a file."""
    command = [
        sys.executable,
        "-m",
        "digitlab",
        "predict",
        "--checkpoint",
        checkpoint,
        "--device",
        device,
        "--json",
        target,
    ]
    start = time.perf_counter()
    with out_path.open("wb") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"predict failed ({result.returncode}): {result.stderr.decode()[-500:]}")
    return seconds


def accuracy(out_path: Path, labels: np.ndarray) -> float:
    digits = [json.loads(line)["digit"] for line in out_path.read_text().splitlines()]
    assert len(digits) == len(labels), (len(digits), len(labels))
    return float(np.mean(np.array(digits) == labels))


def time_runs(
    name: str,
    checkpoint: str,
    target: str,
    device: str,
    repeats: int,
    count: int,
    startup: float,
    labels: np.ndarray,
    workdir: Path,
) -> None:
    out_path = workdir / f"{name}.jsonl"
    times = [run_predict(checkpoint, target, device, out_path) for _ in range(repeats)]
    median = statistics.median(times)
    print(
        f"{name:<22} {count:>6} images  median {median:6.2f} s of {repeats}  "
        f"{count / median:8.0f} images/s  ({count / max(median - startup, 1e-9):8.0f} images/s without the "
        f"{startup:.2f} s start-up)  accuracy {accuracy(out_path, labels):.4f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    add_data_option(parser)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--userlike", type=int, default=0, help="also time this many user-like photos")
    args = parser.parse_args()
    images, labels = mnist_test_set(parser, args.data, args.count)

    with tempfile.TemporaryDirectory(prefix="digitlab-predict-bench-") as tmp:
        workdir = Path(tmp)
        folder = workdir / "pngs"
        folder.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i:05d}.png")
        idx = workdir / "t10k-images-idx3-ubyte"
        write_idx(idx, images)  # the same images as the PNGs (all of them unless --count)
        one = workdir / "one.png"
        Image.fromarray(images[0]).save(one)

        startup = statistics.median(
            run_predict(args.checkpoint, str(one), args.device, workdir / "one.jsonl") for _ in range(args.repeats)
        )
        print(
            f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, device {args.device}, "
            f"checkpoint {args.checkpoint}"
        )
        print(f"start-up (one image)   median {startup:.2f} s of {args.repeats}")
        time_runs(
            "IDX file", args.checkpoint, str(idx), args.device, args.repeats, len(images), startup, labels, workdir
        )
        time_runs(
            "folder of PNGs",
            args.checkpoint,
            str(folder),
            args.device,
            args.repeats,
            len(images),
            startup,
            labels,
            workdir,
        )
        if args.userlike:
            photos = workdir / "photos"
            photos.mkdir()
            for i, render in enumerate(make_userlike(images[: args.userlike], seed=0)):
                (photos / f"{i:05d}.{'jpg' if render.format == 'jpeg' else 'png'}").write_bytes(render.data)
            size = sum(p.stat().st_size for p in photos.iterdir()) / args.userlike / 1000
            print(f"user-like photos: {args.userlike} files, {size:.0f} kB each on average")
            time_runs(
                "folder of photos",
                args.checkpoint,
                str(photos),
                args.device,
                args.repeats,
                args.userlike,
                startup,
                labels[: args.userlike],
                workdir,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
