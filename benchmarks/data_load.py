"""Loading MNIST and batching it, side by side: digitlab's data layer vs torchvision's MNIST + DataLoader.

Two measurements, each the median of `--repeats` runs, alternating contenders:
  load:  all 70,000 images and labels into memory. digitlab reads the four .gz files (decompressing them);
         torchvision.datasets.MNIST reads the decompressed files it keeps in MNIST/raw/ (its fastest case).
  batch: images/s drawing `--batches` shuffled batches of 64 for a network (loaders built outside the clock):
         torchvision MNIST + ToTensor through a DataLoader (the tutorial's way), digitlab's MnistDataset through
         the same DataLoader, and digitlab's BatchLoader (slices of one in-memory tensor).

    python benchmarks/data_load.py --data ../shared/datasets/mnist --repeats 5 --batches 200
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from digitlab import data, datafiles


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def torchvision_root(data_dir: Path, tmp: Path) -> Path:
    """A torchvision-style root (MNIST/raw/ with decompressed files) in a temp dir."""
    raw = tmp / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in datafiles.SPLIT_FILES.values():
        source = datafiles.find_file(data_dir, stem)
        if source is None:
            raise SystemExit(f"data_load: {stem} not found in {data_dir}")
        if source.suffix == ".gz":
            (raw / stem).write_bytes(gzip.decompress(source.read_bytes()))
        else:
            shutil.copy(source, raw / stem)
    return tmp


def draw_batches(loader, batches: int) -> int:
    seen = 0
    for i, (x, _) in enumerate(loader):
        seen += len(x)
        if i + 1 == batches:
            break
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="Dir with the four MNIST .gz files.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=200, help="Batches of 64 drawn per batching run.")
    args = parser.parse_args()

    from torchvision import datasets, transforms

    files = datafiles.locate(args.data, download=False)
    spec = datafiles.get_spec("mnist")
    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_root(args.data, Path(tmp))

        def load_torchvision():
            return (datasets.MNIST(root, train=True, download=False), datasets.MNIST(root, train=False, download=False))

        load_ours = median_seconds(lambda: data.load_files(files, spec), args.repeats)
        load_tv = median_seconds(load_torchvision, args.repeats)

        mnist = data.load_files(files, spec)
        tv_train = datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())
        ours_train, _ = data.datasets(mnist)
        contenders = {
            "torchvision MNIST + ToTensor, DataLoader(batch_size=64, shuffle=True)": lambda: DataLoader(
                tv_train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
            ),
            "digitlab MnistDataset, DataLoader(batch_size=64, shuffle=True)": lambda: DataLoader(
                ours_train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
            ),
            "digitlab BatchLoader(batch_size=64), normalised": lambda: data.BatchLoader(
                mnist.train_images, mnist.train_labels, batch_size=64, seed=0
            ),
        }
        rates = {}
        for name, make in contenders.items():
            loader = make()  # built once, outside the clock, as in training: one loader, many epochs
            seconds = median_seconds(lambda loader=loader: draw_batches(loader, args.batches), args.repeats)
            rates[name] = args.batches * 64 / seconds
        setup = median_seconds(contenders["digitlab BatchLoader(batch_size=64), normalised"], args.repeats)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(
        f"load 70,000 images: digitlab (from .gz) {load_ours:.3f} s, torchvision (from raw) {load_tv:.3f} s, "
        f"ratio {load_tv / load_ours:.2f}x"
    )
    baseline = next(iter(rates.values()))
    for name, rate in rates.items():
        print(f"batches: {rate:>12,.0f} images/s  {rate / baseline:>7.1f}x  {name}")
    print(f"BatchLoader setup (all 60,000 images to normalised float32, once per run): {setup:.3f} s")


if __name__ == "__main__":
    main()
