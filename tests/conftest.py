"""Shared fixtures: small synthetic IDX data written by the tests, and the real MNIST dir when given."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from digitlab import data, datafiles, idx

REQUIRE_REALDATA = os.environ.get("DIGITLAB_REQUIRE_REALDATA") == "1"


def _missing(reason: str) -> None:
    """Skip locally; fail in CI, where DIGITLAB_REQUIRE_REALDATA=1 says the data must be there."""
    if REQUIRE_REALDATA:
        pytest.fail(f"{reason} (DIGITLAB_REQUIRE_REALDATA=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST dir from $DIGITLAB_DATA."""
    env = os.environ.get("DIGITLAB_DATA")
    if not env:
        _missing("real MNIST not given: set DIGITLAB_DATA=../shared/datasets/mnist")
    path = Path(env)
    if datafiles.find_files(path) is None:
        _missing(f"DIGITLAB_DATA={env} does not hold the four MNIST files")
    return path


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path) -> data.MnistData:
    return data.load(mnist_dir)


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: each class is a bright bar at its own position, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row = 4 + 2 * int(label)
        images[i, row : row + 3, 6:22] = 255
    return images, labels


def write_dataset(directory: Path, n_train: int = 512, n_test: int = 128, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic_digits(n_train, seed)
    test_x, test_y = synthetic_digits(n_test, seed + 1)
    idx.write_idx(directory / "train-images-idx3-ubyte.gz", train_x)
    idx.write_idx(directory / "train-labels-idx1-ubyte.gz", train_y)
    idx.write_idx(directory / "t10k-images-idx3-ubyte.gz", test_x)
    idx.write_idx(directory / "t10k-labels-idx1-ubyte.gz", test_y)
    return directory


@pytest.fixture()
def tiny_mnist_dir(tmp_path: Path) -> Path:
    """Four small synthetic IDX .gz files (512 train / 128 test images)."""
    return write_dataset(tmp_path / "tiny-mnist")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch) -> None:
    """Tests never read or write the user's real cache dir (~/.cache/digitlab): XDG_CACHE_HOME points at a tmp dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


def run_main(monkeypatch, capsys, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run the `digitlab` entry point in this process; returns (exit code, stdout, stderr)."""
    from digitlab import cli

    monkeypatch.setattr(sys, "argv", ["digitlab", *args])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def save_random_checkpoint(
    base: Path,
    name: str,
    seed: int = 0,
    metrics: dict | None = None,
    epoch: int = 0,
    random_batch_norm: bool = False,
    temperature: float = 1.0,
) -> Path:
    """An untrained, seeded model saved as a real checkpoint at `base` (e.g. DIR/best); returns its .safetensors.

    random_batch_norm: give the CNN's batch-norm running statistics non-trivial values, so that they matter.
    """
    import torch

    from digitlab import checkpoint
    from digitlab.models import build_model

    torch.manual_seed(seed)
    model = build_model(name)
    if random_batch_norm:
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    info = checkpoint.CheckpointInfo(
        model=name,
        model_config={},
        mean=datafiles.MNIST_MEAN,
        std=datafiles.MNIST_STD,
        class_names=[str(d) for d in range(10)],
        metrics=dict(metrics or {}),
        epoch=epoch,
        temperature=temperature,
    )
    checkpoint.save(base, model, info)
    return Path(base).with_suffix(".safetensors")
