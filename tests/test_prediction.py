"""Predictor: inputs of every kind in, per-input Predictions out; exact on MNIST's own IDX files."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digitlab import data, datafiles, idx
from digitlab.datafiles import MNIST_MEAN, MNIST_STD
from digitlab.prediction import InputItem, PredictError, Prediction, Predictor, expand_inputs

from .conftest import save_random_checkpoint, synthetic_digits
from .test_preprocessing import ink_mask, on_paper, png_bytes, to_u8

USERLIKE_COUNT = 1000  # realdata check: enough for a 1.5-point margin to mean something, small enough for CI


def save_checkpoint(directory: Path, name: str, seed: int = 0) -> Path:
    """An untrained but deterministic model saved as DIR/best; returns DIR (a run dir)."""
    save_random_checkpoint(directory / "best", name, seed)
    return directory


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("mlp"), "mlp")


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("cnn"), "cnn")


@pytest.fixture(scope="module")
def predictor(mlp_dir) -> Predictor:
    return Predictor.from_checkpoint(mlp_dir, device="cpu")


def reference_probabilities(model: torch.nn.Module, images_u8: np.ndarray) -> np.ndarray:
    """What evaluation computes: data.to_input, then the model, then softmax."""
    with torch.no_grad():
        logits = model(data.to_input(torch.from_numpy(images_u8), MNIST_MEAN, MNIST_STD))
    return torch.softmax(logits, dim=1).numpy()


def photo_png(shape: str = "7", size: int = 200) -> bytes:
    return png_bytes(Image.fromarray(to_u8(on_paper(ink_mask(shape, size)))))


# ----------------------------------------------------------------------------------------------------------
# Loading and the model part
# ----------------------------------------------------------------------------------------------------------


def test_from_checkpoint_loads_an_eval_model(predictor):
    assert not predictor.model.training
    assert predictor.info.model == "mlp"
    assert str(predictor.device) == "cpu"


def test_predict_arrays_matches_the_model(predictor):
    images, _ = synthetic_digits(40, seed=3)
    expected = reference_probabilities(predictor.model, images)
    np.testing.assert_allclose(predictor.predict_arrays(images), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        predictor.predict_arrays(images.astype(np.float32) / 255), expected, rtol=1e-5, atol=1e-6
    )
    assert predictor.predict_arrays(np.zeros((0, 28, 28), np.float32)).shape == (0, 10)


def test_predict_arrays_batches_give_the_same_answer(mlp_dir):
    images, _ = synthetic_digits(50, seed=4)
    small = Predictor.from_checkpoint(mlp_dir, device="cpu", batch_size=7)
    big = Predictor.from_checkpoint(mlp_dir, device="cpu", batch_size=1000)
    np.testing.assert_allclose(small.predict_arrays(images), big.predict_arrays(images), rtol=1e-5, atol=1e-6)


def test_a_custom_backend_only_supplies_run_logits(predictor):
    seen = []

    def run_logits(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape)
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0  # raw pixels, like the ONNX export
        return np.tile(np.arange(10, dtype=np.float32), (len(x), 1))  # always "9"

    custom = Predictor(run_logits, predictor.info)
    result = custom.predict([photo_png("7"), photo_png("1")])
    assert [p.digit for p in result] == [9, 9]
    assert seen == [(2, 1, 28, 28)]


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def test_idx_file_predictions_are_exactly_the_models(tmp_path, predictor):
    images, _ = synthetic_digits(300, seed=5)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"):
        idx.write_idx(tmp_path / name, images)
        result = predictor.predict(str(tmp_path / name))
        assert [p.path for p in result[:2]] == [f"{tmp_path / name}#0", f"{tmp_path / name}#1"]
        expected = reference_probabilities(predictor.model, images)
        np.testing.assert_array_equal([p.digit for p in result], expected.argmax(1))
        np.testing.assert_array_equal(result[17].preprocessed, images[17].astype(np.float32) / 255)


def test_idx_labels_file_and_broken_idx_are_per_item_errors(tmp_path, predictor):
    idx.write_idx(tmp_path / "labels-idx1-ubyte.gz", np.arange(10, dtype=np.uint8))
    (tmp_path / "broken-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05")
    (tmp_path / "bad-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"not gzip at all" * 4)
    result = predictor.predict(
        [
            str(tmp_path / "labels-idx1-ubyte.gz"),
            str(tmp_path / "broken-idx3-ubyte"),
            str(tmp_path / "bad-idx3-ubyte.gz"),
        ]
    )
    assert "an IDX labels file, not images" in result[0].error
    assert "truncated" in result[1].error and result[1].digit is None
    assert (
        result[2].error.startswith(f"{tmp_path / 'bad-idx3-ubyte.gz'}: corrupt gzip data") and result[2].digit is None
    )


def test_folders_are_searched_recursively_in_sorted_order(tmp_path):
    for rel in ["b/2.png", "a/z.jpg", "a/sub/1.bmp", "c.webp", ".hidden/x.png", "a/.secret.png", "notes.txt"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    items = expand_inputs([str(tmp_path)])
    assert [Path(i.path).relative_to(tmp_path).as_posix() for i in items] == [
        "a/sub/1.bmp",
        "a/z.jpg",
        "b/2.png",
        "c.webp",
    ]


def test_empty_folder_and_missing_path_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    items = expand_inputs([str(tmp_path / "empty"), str(tmp_path / "missing.png")])
    assert items[0].error.endswith("no image or IDX files in this folder")
    assert items[1].error == f"{tmp_path / 'missing.png'}: file not found"


def test_stdin_is_read_once(tmp_path):
    calls = []

    def stdin() -> bytes:
        calls.append(1)
        return photo_png()

    items = expand_inputs(["-", "-"], stdin=stdin)
    assert [i.path for i in items] == ["-", "-"] and len(calls) == 1


def test_every_kind_of_image_object(predictor):
    png = photo_png("7")
    pil = Image.open(io.BytesIO(png))
    array = np.asarray(pil)
    tensor = torch.from_numpy(array.copy())
    result = predictor.predict([png, pil, array, tensor])
    assert all(p.error is None for p in result)
    assert len({p.digit for p in result}) == 1  # the same picture, the same answer
    np.testing.assert_array_equal(result[0].preprocessed, result[2].preprocessed)


def test_batch_arrays_count_as_many_images(predictor):
    images, _ = synthetic_digits(12, seed=6)
    assert len(predictor.predict(images)) == 12
    assert len(predictor.predict(torch.from_numpy(images)[:, None])) == 12
    assert len(predictor.predict(images[0])) == 1


def test_bad_inputs_do_not_stop_the_others(tmp_path, predictor):
    good = tmp_path / "good.png"
    good.write_bytes(photo_png("4"))
    (tmp_path / "text.png").write_text("not a picture")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "blank.png").write_bytes(png_bytes(Image.new("L", (64, 64), 255)))
    names = ["good.png", "text.png", "missing.png", "empty.png", "blank.png", "good.png"]
    result = predictor.predict([str(tmp_path / n) for n in names])
    assert [p.error is None for p in result] == [True, False, False, False, False, True]
    assert result[1].error.endswith("text.png: not an image (unrecognised format, 13 bytes)")
    assert result[2].error.endswith("missing.png: file not found")
    assert result[3].error.endswith("empty.png: empty file")
    assert result[4].error.endswith("blank.png: no ink found: the image is uniform (blank)")
    assert result[0].digit == result[5].digit is not None


def test_reject_below(predictor):
    images, _ = synthetic_digits(20, seed=7)
    plain = predictor.predict(images)
    threshold = float(np.median([p.confidence for p in plain]))
    rejected = predictor.predict(images, reject_below=threshold)
    for p, r in zip(plain, rejected):
        assert r.confidence == p.confidence and r.probabilities == p.probabilities
        assert r.rejected == (p.confidence < threshold)
        assert r.digit == (None if r.rejected else p.digit)
    assert any(r.rejected for r in rejected) and not all(r.rejected for r in rejected)
    with pytest.raises(PredictError, match="between 0 and 1"):
        predictor.predict(images, reject_below=1.5)


def test_prediction_json(predictor):
    p = predictor.predict_one(photo_png("7"))
    record = json.loads(json.dumps(p.to_json()))
    assert set(record) >= {"path", "digit", "confidence", "probabilities", "error"}
    assert isinstance(record["digit"], int) and record["error"] is None and "preprocessed" not in record
    assert len(record["probabilities"]) == 10 and abs(sum(record["probabilities"]) - 1) < 1e-5
    assert record["confidence"] == max(record["probabilities"]) == record["top3"][0][1]
    assert record["top3"][0][0] == record["digit"]
    failed = predictor.predict_one(b"").to_json()
    assert failed["digit"] is None and failed["probabilities"] is None
    assert failed["error"] == "<image>: empty file"


def test_save_preprocessed_writes_what_the_model_saw(tmp_path, predictor):
    items = expand_inputs([photo_png("7"), photo_png("1")])
    result = list(predictor.iter_predict(items, save_dir=tmp_path / "seen"))
    for p in result:
        saved = np.asarray(Image.open(p.preprocessed_path), dtype=np.float32) / 255
        assert saved.shape == (28, 28)
        assert np.abs(saved - p.preprocessed).max() <= 0.5 / 255 + 1e-6
    assert sorted(f.name for f in (tmp_path / "seen").iterdir()) == ["00000-image.png", "00001-image.png"]


# ----------------------------------------------------------------------------------------------------------
# explain and threads
# ----------------------------------------------------------------------------------------------------------


def test_explain_cnn_keeps_eight_channels(cnn_dir):
    cnn = Predictor.from_checkpoint(cnn_dir, device="cpu")
    result = cnn.explain(photo_png("4"))
    acts = result["activations"]
    assert list(acts) == ["conv1", "conv2", "conv3", "logits"]
    assert np.asarray(acts["conv1"]).shape == (8, 14, 14)
    assert np.asarray(acts["conv3"]).shape == (8, 7, 7)
    assert len(acts["logits"]) == 10
    same = cnn.predict_one(photo_png("4"))
    assert result["prediction"].digit == same.digit
    np.testing.assert_allclose(result["prediction"].probabilities, same.probabilities, rtol=1e-4, atol=1e-6)


def test_explain_mlp(predictor):
    acts = predictor.explain(photo_png("2"))["activations"]
    assert len(acts["hidden1"]) == 512 and len(acts["hidden2"]) == 512 and len(acts["logits"]) == 10


def test_concurrent_predictions_match_sequential_ones(cnn_dir):
    cnn = Predictor.from_checkpoint(cnn_dir, device="cpu")
    pictures = [photo_png(s, 150 + 10 * i) for i, s in enumerate("17420" * 2)]
    expected = [cnn.predict_one(p).probabilities for p in pictures]
    results: dict[int, list[float]] = {}

    def work(i: int) -> None:
        results[i] = cnn.predict_one(pictures[i]).probabilities

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pictures))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, probabilities in enumerate(expected):
        np.testing.assert_allclose(results[i], probabilities, rtol=1e-5, atol=1e-7)


def test_input_item_is_passed_through(predictor):
    item = InputItem("given", error="given: broken")
    assert predictor.predict([item])[0] == Prediction("given", None, None, None, None, "given: broken")


# ----------------------------------------------------------------------------------------------------------
# Real MNIST: exact on the IDX file, within 1.5 points on user-like photos
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_cnn(mnist_dir, tmp_path_factory) -> Path:
    """The CNN recipe, shortened to 2 epochs (~99% test accuracy, ~20 s on 2 cores)."""
    from digitlab.training import train

    run = train(
        model="cnn",
        epochs=2,
        data=str(mnist_dir),
        out=str(tmp_path_factory.mktemp("cnn") / "run"),
        quiet=True,
        device="cpu",
        seed=0,
    )
    return run.dir


@pytest.mark.realdata
@pytest.mark.slow
def test_predict_on_the_test_idx_file_is_the_models_test_accuracy(trained_cnn, mnist_dir):
    from digitlab.evaluation import predict_logits

    predictor = Predictor.from_checkpoint(trained_cnn, device="cpu")
    test_images = datafiles.find_files(mnist_dir)["test_images"]
    labels = idx.read_labels(datafiles.find_files(mnist_dir)["test_labels"])
    result = predictor.predict(str(test_images))
    assert len(result) == 10_000 and all(p.error is None for p in result)
    images = torch.from_numpy(np.array(idx.read_images(test_images)))
    expected = (
        predict_logits(predictor.model, images, predictor.info.mean, predictor.info.std, torch.device("cpu"))
        .argmax(1)
        .numpy()
    )
    digits = np.array([p.digit for p in result])
    np.testing.assert_array_equal(digits, expected)  # every single prediction, not just the accuracy
    assert (digits == labels).mean() > 0.98


@pytest.mark.realdata
@pytest.mark.slow
def test_userlike_photos_are_read_within_1_5_points_of_clean_mnist(trained_cnn, mnist_dir):
    from benchmarks.userlike import make_userlike

    predictor = Predictor.from_checkpoint(trained_cnn, device="cpu")
    files = datafiles.find_files(mnist_dir)
    images = np.array(idx.read_images(files["test_images"])[:USERLIKE_COUNT])
    labels = idx.read_labels(files["test_labels"])[:USERLIKE_COUNT]
    clean = predictor.predict_arrays(images).argmax(1)
    photos = [render.data for render in make_userlike(images, seed=0, workers=2)]
    result = predictor.predict(photos)
    assert all(p.error is None for p in result), [p.error for p in result if p.error][:3]
    clean_accuracy = float((clean == labels).mean())
    userlike_accuracy = float((np.array([p.digit for p in result]) == labels).mean())
    assert clean_accuracy > 0.97
    assert userlike_accuracy >= clean_accuracy - 0.015, (clean_accuracy, userlike_accuracy)


def test_userlike_renders_are_seeded_per_image():
    from benchmarks.userlike import make_userlike

    images, _ = synthetic_digits(6, seed=8)
    all_six = [r.data for r in make_userlike(images, seed=3)]
    assert [r.data for r in make_userlike(images, seed=3, workers=3)] == all_six  # threads: same pictures
    assert [r.data for r in make_userlike(images[4:], seed=3, start=4)] == all_six[4:]  # any slice: same
    assert [r.data for r in make_userlike(images, seed=4)] != all_six
    for r in make_userlike(images, seed=3):
        picture = Image.open(io.BytesIO(r.data))
        assert 200 <= picture.width <= 600 and 200 <= picture.height <= 600
        assert r.format == picture.format.lower()
