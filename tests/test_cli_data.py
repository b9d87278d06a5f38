"""The data commands end to end through `digitlab.cli.main`: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from digitlab import datafiles, idx

from .conftest import run_main, save_random_checkpoint, write_dataset
from .test_data import (
    CORRUPTIONS,
    FILE_OF,
    MNIST_TEST_COUNTS,
    MNIST_TRAIN_COUNTS,
    STEMS,
    gzip_bomb,
    peak_traced_bytes,
)

REPO = Path(__file__).resolve().parents[1]


def assert_one_line_failure(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("digitlab: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    monkeypatch.delenv("DIGITLAB_DATA", raising=False)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_explore_on_corrupt_data_fails_in_one_line(tmp_path, monkeypatch, capsys, case):
    bad = write_dataset(tmp_path / "bad")
    defect = CORRUPTIONS[case](bad)
    code, out, err = run_main(monkeypatch, capsys, "explore", "--data", str(bad))
    assert_one_line_failure(code, err, FILE_OF[case], defect)
    assert out == ""


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    bad = write_dataset(tmp_path / "bad")
    CORRUPTIONS["truncated"](bad)
    env = {k: v for k, v in os.environ.items() if k != "DIGITLAB_DATA"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "digitlab", "explore", "--data", str(bad)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (
        f"digitlab: error: train-images-idx3-ubyte.gz: truncated: {16 + 512 * 784} bytes expected, 1000 found\n"
    )


def test_explore_and_grid(tiny_mnist_dir, tmp_path, monkeypatch, capsys):
    grid = tmp_path / "grid.png"
    code, out, err = run_main(
        monkeypatch,
        capsys,
        "explore",
        "--data",
        str(tiny_mnist_dir),
        "--grid",
        str(grid),
        "--index",
        "1",
        "--seed",
        "2",
    )
    assert code == 0, err
    assert "len(train_set) = 512" in out and "len(test_set)  = 128" in out and "item = train_set[1]" in out
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explore_option_errors(tiny_mnist_dir, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "explore", "--data", str(tiny_mnist_dir), "--index", "600")
    assert_one_line_failure(code, err, "--index 600: out of range")
    code, _, err = run_main(monkeypatch, capsys, "explore", "--data", str(tiny_mnist_dir), "--grid", "x.svg")
    assert_one_line_failure(code, err, "--grid x.svg")
    code, _, err = run_main(monkeypatch, capsys, "explore", "--data", str(tiny_mnist_dir), "--dataset", "emnist")
    assert_one_line_failure(code, err, "unknown dataset 'emnist'")


def test_tour_command(tiny_mnist_dir, monkeypatch, capsys):
    code, out, err = run_main(
        monkeypatch, capsys, "tour", "--data", str(tiny_mnist_dir), "--device", "cpu", "--steps", "3", "--seed", "1"
    )
    assert code == 0, err
    assert "input shape  [64, 1, 28, 28]" in out and "output shape [64, 10]" in out
    code, _, err = run_main(monkeypatch, capsys, "tour", "--data", str(tiny_mnist_dir), "--steps", "0")
    assert code == 2 and "--steps" in err  # a usage error
    code, _, err = run_main(monkeypatch, capsys, "tour", "--data", str(tiny_mnist_dir), "--device", "tpu")
    assert_one_line_failure(code, err, "--device 'tpu'")


# ----------------------------------------------------------------------------------------------------------
# Issue 11: gzip bombs (6), images of the wrong size (7), symbolic link loops (8), through the commands
# ----------------------------------------------------------------------------------------------------------


def test_explore_on_a_gzip_bomb_fails_in_one_line_with_bounded_memory(tmp_path, monkeypatch, capsys):
    """Issue 11.6: explore reached 4.46 GB RSS on a 1.9 MB gzip before its count check."""
    bad = write_dataset(tmp_path / "bomb")
    (bad / "train-images-idx3-ubyte.gz").write_bytes(gzip_bomb())
    result: list = []
    peak = peak_traced_bytes(lambda: result.append(run_main(monkeypatch, capsys, "explore", "--data", str(bad))))
    code, out, err = result[0]
    assert_one_line_failure(code, err, "train-images-idx3-ubyte.gz", "trailing bytes: 7856 bytes expected")
    assert out == "" and peak < 20 << 20, peak


def odd_sized(directory: Path, shape: tuple[int, int]) -> Path:
    """A dataset whose images hold 784 pixels each, but not as 28x28."""
    write_dataset(directory)
    for stem, n in (("train-images-idx3-ubyte", 512), ("t10k-images-idx3-ubyte", 128)):
        idx.write_idx(directory / f"{stem}.gz", np.zeros((n, *shape), dtype=np.uint8))
    return directory


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("shape", [(1, 784), (14, 56)])
def test_train_refuses_images_the_models_cannot_take(tmp_path, monkeypatch, capsys, model, shape):
    """Issue 11.7: the MLP trained on 1x784 or 14x56 images silently, the CNN died with a 30-frame traceback."""
    monkeypatch.setenv("DIGITLAB_THREADS", "off")  # leave this test process's torch threads alone
    bad = odd_sized(tmp_path / "odd", shape)
    code, out, err = run_main(
        monkeypatch,
        capsys,
        "train",
        "--model",
        model,
        "--data",
        str(bad),
        "--epochs",
        "1",
        "--quiet",
        "--out",
        str(tmp_path / "run"),
    )
    assert_one_line_failure(
        code, err, "train-images-idx3-ubyte.gz", f"images are {shape[0]}x{shape[1]} pixels", "MNIST images are 28x28"
    )
    assert out == ""


def test_evaluate_refuses_images_the_models_cannot_take(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIGITLAB_THREADS", "off")
    bad = odd_sized(tmp_path / "odd", (14, 56))
    checkpoint = save_random_checkpoint(tmp_path / "run" / "best", "cnn")
    code, _, err = run_main(
        monkeypatch, capsys, "evaluate", "--checkpoint", str(checkpoint), "--data", str(bad), "--no-plots"
    )
    assert_one_line_failure(code, err, "train-images-idx3-ubyte.gz", "images are 14x56 pixels")


def test_explore_with_a_symlink_loop_as_data_dir_says_so(tmp_path, monkeypatch, capsys):
    """Issue 11.8: a link loop in --data was reported as missing files, and a download was tried."""
    monkeypatch.setattr("digitlab.datafiles.download_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    loop = tmp_path / "loop"
    loop.symlink_to(loop.name)
    code, _, err = run_main(monkeypatch, capsys, "explore", "--data", str(loop))
    assert_one_line_failure(code, err, f"{loop}: symbolic link loop")


@pytest.fixture()
def tiny_is_mnist(tiny_mnist_dir, monkeypatch) -> Path:
    """Make the registered MNIST checksums those of the tiny data, so `data verify` can pass on it."""
    md5 = {stem: datafiles.md5_of(tiny_mnist_dir / f"{stem}.gz") for stem in STEMS}
    monkeypatch.setitem(datafiles.DATASETS, "mnist", dataclasses.replace(datafiles.DATASETS["mnist"], md5=md5))
    return tiny_mnist_dir


def test_data_verify_ok_and_mismatch(tiny_is_mnist, tmp_path, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "data", "verify", str(tiny_is_mnist))
    assert code == 0, err
    assert out.count("ok  ") == 4 and "all four files verified" in out
    copy = Path(shutil.copytree(tiny_is_mnist, tmp_path / "copy"))
    labels = copy / "train-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[100] = (content[100] + 1) % 10  # one label changed, still a valid file
    labels.write_bytes(gzip.compress(bytes(content)))
    code, out, err = run_main(monkeypatch, capsys, "data", "verify", str(copy))
    assert_one_line_failure(code, err, str(labels), "MD5 mismatch")


def test_data_verify_finds_the_data_itself(tiny_is_mnist, monkeypatch, capsys):
    monkeypatch.setenv("DIGITLAB_DATA", str(tiny_is_mnist))
    code, out, err = run_main(monkeypatch, capsys, "data", "verify")
    assert code == 0, err
    assert f"MNIST in {tiny_is_mnist}: all four files verified" in out


def test_data_verify_missing_dir(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "data", "verify", str(tmp_path / "nowhere"))
    assert_one_line_failure(code, err, str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz"), "file not found")


def test_data_where_lists_the_lookup_order(tiny_mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIGITLAB_DATA", str(tmp_path / "env"))
    code, out, err = run_main(monkeypatch, capsys, "data", "where", "--data", str(tiny_mnist_dir))
    assert code == 0, err
    lines = out.splitlines()
    assert lines == [f"found  {tiny_mnist_dir}", f"-      {tmp_path / 'env'}", f"-      {datafiles.cache_dir()}"]


@pytest.mark.realdata
def test_explore_real_mnist_command(mnist_dir, tmp_path, monkeypatch, capsys):
    grid = tmp_path / "grid.png"
    code, out, err = run_main(monkeypatch, capsys, "explore", "--data", str(mnist_dir), "--grid", str(grid))
    assert code == 0, err
    assert "len(train_set) = 60000" in out and "len(test_set)  = 10000" in out
    for digit, (a, b) in enumerate(zip(MNIST_TRAIN_COUNTS, MNIST_TEST_COUNTS)):
        assert f"│     {digit} │  {a} │" in out and f"│ {b:>4} │" in out
    assert "mean 0.1307  std 0.3081" in out
    assert grid.is_file() and [p.name for p in tmp_path.iterdir()] == ["grid.png"]


@pytest.mark.realdata
def test_data_verify_real_mnist_and_a_changed_copy(mnist_dir, tmp_path, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "data", "verify", str(mnist_dir))
    assert code == 0, err
    assert out.count("ok  ") == 4
    copy = tmp_path / "copy"
    copy.mkdir()
    for stem in STEMS:
        shutil.copy(datafiles.find_file(Path(mnist_dir), stem), copy)
    target = datafiles.find_file(copy, "t10k-images-idx3-ubyte")
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one byte of the copy
    target.write_bytes(bytes(blob))
    code, out, err = run_main(monkeypatch, capsys, "data", "verify", str(copy))
    assert_one_line_failure(code, err, "t10k-images-idx3-ubyte.gz: ")
    assert "MD5 mismatch" in err or "corrupt gzip data" in err
