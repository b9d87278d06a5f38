"""`explore` (the dataset tour) and `tour` (the tutorial run for real), on tiny synthetic data and on MNIST."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from digitlab import data, datafiles
from digitlab.explore import ExploreError, ascii_digit, explore, tour

from .conftest import synthetic_digits
from .test_data import MNIST_TEST_COUNTS, MNIST_TRAIN_COUNTS


def capture() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=120, color_system=None), buffer


def run_explore(data_dir, **kwargs) -> tuple[object, str]:
    console, buffer = capture()
    summary = explore(data_dir, console=console, **kwargs)
    return summary, buffer.getvalue()


def assert_count_rows(text: str, train_counts: list[int], test_counts: list[int]) -> None:
    for digit, (a, b) in enumerate(zip(train_counts, test_counts)):
        row = rf"│\s+{digit} │\s+{a} │\s+[\d.]+ │\s+{b} │"
        assert re.search(row, text), f"no row for class {digit}: {a} train, {b} test"


def test_explore_prints_sizes_item_counts_and_stats(tiny_mnist_dir):
    summary, text = run_explore(tiny_mnist_dir, index=2)
    train_labels = synthetic_digits(512, 0)[1]
    test_labels = synthetic_digits(128, 1)[1]
    train_counts = np.bincount(train_labels, minlength=10).tolist()
    test_counts = np.bincount(test_labels, minlength=10).tolist()
    assert (summary.train_size, summary.test_size) == (512, 128)
    assert (summary.train_counts, summary.test_counts) == (train_counts, test_counts)
    assert "len(train_set) = 512" in text and "len(test_set)  = 128" in text
    assert "item = train_set[2]" in text
    assert "type(item)   tuple" in text and "len(item)    2" in text
    assert "shape [1, 28, 28], dtype torch.float32, values 0.0 to 1.0" in text
    assert f"label        int, {train_labels[2]}" in text and summary.label == train_labels[2]
    assert_count_rows(text, train_counts, test_counts)
    mean, std = data.pixel_stats(data.load(tiny_mnist_dir).train_images)
    assert f"mean {mean:.4f}  std {std:.4f}" in text
    assert f"train[2]: label {train_labels[2]}" in text
    # The synthetic digit is a bright bar 3 rows high at row 4 + 2 * label, columns 6-21.
    assert text.count("@" * 32) == 3
    assert summary.grid is None and "grid:" not in text


def test_explore_names_classes_of_named_datasets(tiny_mnist_dir):
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    spec = datafiles.DatasetSpec(name="named", title="Named digits", class_names=names, md5={})
    summary, text = run_explore(tiny_mnist_dir, dataset=spec, index=0)
    assert text.startswith("Named digits from ")
    assert f"({names[summary.label]})" in text
    assert re.search(r"│\s+7 │ seven\s+│", text)


def test_grid_png_is_written_atomically(tiny_mnist_dir, tmp_path):
    out = tmp_path / "plots" / "grid.png"
    summary, text = run_explore(tiny_mnist_dir, grid=out, seed=3)
    assert summary.grid == out and f"grid: wrote {out}" in text
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 600 and height >= 600
        image.load()
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temp file left behind
    first = out.read_bytes()
    run_explore(tiny_mnist_dir, grid=out, seed=3)  # overwrite in place, same seed: same picture
    assert out.read_bytes() == first
    run_explore(tiny_mnist_dir, grid=out, seed=4)
    assert out.read_bytes() != first
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]


def test_grid_errors(tiny_mnist_dir, tmp_path):
    with pytest.raises(ExploreError, match="--grid .*grid.jpg: the grid is a PNG image"):
        run_explore(tiny_mnist_dir, grid=tmp_path / "grid.jpg")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ExploreError) as exc:
        run_explore(tiny_mnist_dir, grid=blocker / "grid.png")
    assert str(exc.value).startswith(f"--grid {blocker / 'grid.png'}: cannot write: ")
    assert "\n" not in str(exc.value)


def test_explore_index_out_of_range(tiny_mnist_dir):
    with pytest.raises(ExploreError, match=r"--index 512: out of range \(the training split has images 0-511\)"):
        run_explore(tiny_mnist_dir, index=512)
    with pytest.raises(ExploreError, match="--index -1"):
        run_explore(tiny_mnist_dir, index=-1)


def test_ascii_digit():
    image = torch.zeros(28, 28, dtype=torch.uint8)
    image[5, 2:4] = 255
    image[6, 0] = 128
    lines = ascii_digit(image).split("\n")
    assert len(lines) == 28 and all(len(line) == 56 for line in lines)
    assert lines[0] == " " * 56
    assert lines[5] == "    " + "@@@@" + " " * 48
    assert lines[6][:2] not in ("  ", "@@") and lines[6][0] == lines[6][1]


def run_tour(data_dir, **kwargs):
    console, buffer = capture()
    result = tour(data_dir, device="cpu", console=console, **kwargs)
    return result, buffer.getvalue()


def test_tour_runs_and_explains(tiny_mnist_dir):
    result, text = run_tour(tiny_mnist_dir, seed=0, steps=20)
    assert result.batch_shape == [64, 1, 28, 28] and result.logits_shape == [64, 10]
    assert "input shape  [64, 1, 28, 28]" in text and "output shape [64, 10]" in text
    assert "DataLoader(train_set, batch_size=64, shuffle=True)" in text
    assert "images.shape = [64, 1, 28, 28]   labels.shape = [64]" in text
    assert result.parameters == 669_706 and "669,706" in text
    for line in (
        "logits = model(images)",
        "loss = loss_fn(logits, labels)",
        "optimizer.zero_grad()",
        "loss.backward()",
        "optimizer.step()",
        "torch.softmax(logits[0], dim=0)",
    ):
        assert line in text, line
    for probs in (result.probs_before, result.probs_after):
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and len(probs) == 10
    before = "right" if result.predicted_before == result.label else "wrong"
    assert f"predicted {result.predicted_before}, actual {result.label}: {before}" in text
    assert "random weights" in text
    # The synthetic classes are easy: 20 steps of Adam learn them.
    assert result.last_loss < result.first_loss
    assert result.predicted_after == result.label
    assert f"predicted {result.label}, actual {result.label}: right" in text
    assert result.accuracy_after > 0.9 > 0.3 > result.accuracy_before
    assert f"Test accuracy: {result.accuracy_after:.1%}" in text
    assert "Step 6. The same image again" in text


def test_tour_is_seeded(tiny_mnist_dir):
    a, _ = run_tour(tiny_mnist_dir, seed=5, steps=3)
    b, _ = run_tour(tiny_mnist_dir, seed=5, steps=3)
    c, _ = run_tour(tiny_mnist_dir, seed=6, steps=3)
    assert a.probs_before == b.probs_before and a.probs_after == b.probs_after and a.label == b.label
    assert a.probs_before != c.probs_before


def test_tour_rejects_no_steps(tiny_mnist_dir):
    with pytest.raises(ExploreError, match="--steps 0: must be at least 1"):
        run_tour(tiny_mnist_dir, steps=0)


@pytest.mark.realdata
def test_explore_real_mnist(mnist_dir, tmp_path):
    summary, text = run_explore(mnist_dir, grid=tmp_path / "grid.png")
    assert "len(train_set) = 60000" in text and "len(test_set)  = 10000" in text
    assert_count_rows(text, MNIST_TRAIN_COUNTS, MNIST_TEST_COUNTS)
    assert "mean 0.1307  std 0.3081" in text
    assert "label        int, 5" in text
    with Image.open(tmp_path / "grid.png") as image:
        assert image.format == "PNG"


@pytest.mark.realdata
@pytest.mark.slow
def test_tour_real_mnist(mnist_dir):
    result, text = run_tour(mnist_dir, seed=0, steps=300)
    assert "input shape  [64, 1, 28, 28]" in text and "output shape [64, 10]" in text
    assert result.accuracy_before < 0.2
    assert result.accuracy_after > 0.85  # 300 Adam steps of batch 64
