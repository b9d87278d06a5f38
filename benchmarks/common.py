"""Shared by the benchmark scripts: the `--data` option and reading MNIST's test set from it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from digitlab import idx
from digitlab.datafiles import find_files


def add_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=os.environ.get("DIGITLAB_DATA"), help="MNIST dir (or $DIGITLAB_DATA)")


def mnist_files(parser: argparse.ArgumentParser, data_dir: str | None) -> dict[str, Path]:
    """The four MNIST files in --data, or a usage error naming it."""
    if not data_dir:
        parser.error("--data DIR (or $DIGITLAB_DATA) is required")
    files = find_files(Path(data_dir))
    if files is None:
        parser.error(f"--data {data_dir}: the four MNIST files are not there")
    return files


def mnist_test_set(
    parser: argparse.ArgumentParser, data_dir: str | None, count: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` test images (N, 28, 28) uint8 and labels (N,), or a usage error naming --data."""
    files = mnist_files(parser, data_dir)
    images = np.array(idx.read_images(files["test_images"])[:count])
    labels = np.array(idx.read_labels(files["test_labels"])[:count])
    return images, labels
