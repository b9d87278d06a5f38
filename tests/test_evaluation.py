"""evaluate: the calibration error, the reliability diagram, what --reject-below buys, ensembles; and the
temperature's round trip through training, the checkpoint, the Python API and ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from digitlab import calibration, checkpoint
from digitlab.evaluation import evaluate
from digitlab.prediction import Predictor

from .conftest import run_main, save_random_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny MLP trained for one epoch on synthetic digits, with a validation split to fit its temperature."""
    from digitlab.training import train

    from .conftest import write_dataset

    root = tmp_path_factory.mktemp("evaluation")
    data_dir = write_dataset(root / "data", n_train=600, n_test=200)
    run = train(
        model="mlp", epochs=1, data=str(data_dir), out=str(root / "run"), val_size=200, quiet=True, label_smoothing=0.3
    )
    return run.dir


def test_training_fits_a_temperature_on_validation_and_stores_it(trained):
    info = checkpoint.read_info(trained)
    summary = json.loads((trained / "summary.json").read_text())
    assert info.temperature > 0 and info.temperature != 1.0
    assert summary["temperature"] == pytest.approx(info.temperature)
    assert 0 <= summary["test_ece"] <= 1


def test_evaluate_json_reports_ece_and_draws_a_reliability_diagram(
    trained, tiny_mnist_dir, monkeypatch, capsys, tmp_path
):
    data_dir = json.loads((trained / "config.json").read_text())["data"]
    code, out, err = run_main(
        monkeypatch,
        capsys,
        "evaluate",
        "--checkpoint",
        str(trained),
        "--data",
        data_dir,
        "--json",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    report = json.loads(out)
    assert 0 <= report["ece"] <= 1
    assert report["temperature"] == pytest.approx(checkpoint.read_info(trained).temperature)
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    kept = [row["kept"] for row in report["selective"]]
    assert kept == sorted(kept, reverse=True) and kept[0] <= 1.0  # a higher threshold keeps fewer answers


def test_the_temperature_changes_confidence_but_not_the_answer(tmp_path):
    hot = save_random_checkpoint(tmp_path / "hot" / "best", "mlp", seed=3, temperature=4.0)
    cold = save_random_checkpoint(tmp_path / "cold" / "best", "mlp", seed=3, temperature=1.0)
    x = np.random.default_rng(0).random((16, 28, 28)).astype(np.float32)
    p_hot = Predictor.from_checkpoint(hot, device="cpu").predict_arrays(x)
    p_cold = Predictor.from_checkpoint(cold, device="cpu").predict_arrays(x)
    assert (p_hot.argmax(1) == p_cold.argmax(1)).all()
    assert (p_hot.max(1) < p_cold.max(1)).all()  # a higher temperature is less sure
    logits = np.log(p_cold.astype(np.float64))  # softmax(log p) = p: logits up to a constant
    np.testing.assert_allclose(p_hot, calibration.softmax(logits, 4.0), atol=1e-5)


def test_an_exported_onnx_model_applies_the_temperature(tmp_path):
    pytest.importorskip("onnxruntime")
    from digitlab import export

    weights = save_random_checkpoint(tmp_path / "run" / "best", "cnn", seed=1, temperature=2.5, random_batch_norm=True)
    export.export_onnx(weights, tmp_path / "model.onnx")
    x = np.random.default_rng(1).random((8, 28, 28)).astype(np.float32)
    from_torch = Predictor.from_checkpoint(weights, device="cpu").predict_arrays(x)
    from_onnx = Predictor.from_onnx(tmp_path / "model.onnx", device="cpu").predict_arrays(x)
    np.testing.assert_allclose(from_onnx, from_torch, atol=1e-5)
    assert "2.5" in export.read_metadata(tmp_path / "model.onnx")["temperature"]


def test_an_ensemble_averages_its_members_calibrated_probabilities(tmp_path):
    a = save_random_checkpoint(tmp_path / "a" / "best", "mlp", seed=1, temperature=2.0)
    b = save_random_checkpoint(tmp_path / "b" / "best", "cnn", seed=2, temperature=0.5, random_batch_norm=True)
    x = np.random.default_rng(2).random((8, 28, 28)).astype(np.float32)
    pa = Predictor.from_checkpoint(a, device="cpu").predict_arrays(x)
    pb = Predictor.from_checkpoint(b, device="cpu").predict_arrays(x)
    both = Predictor.from_checkpoints([a, b], device="cpu").predict_arrays(x)
    np.testing.assert_allclose(both, (pa + pb) / 2, atol=1e-6)


def test_evaluate_an_ensemble(trained):
    data_dir = json.loads((trained / "config.json").read_text())["data"]
    single = evaluate(trained, data_dir, plots=False)
    double = evaluate([trained, trained], data_dir, plots=False)
    assert double.accuracy == single.accuracy and double.ece == pytest.approx(single.ece)
    assert double.model.startswith("ensemble") and len(double.temperature) == 2


def test_an_ensemble_exports_to_one_onnx_graph_that_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    from digitlab import export

    a = save_random_checkpoint(tmp_path / "a" / "best", "mlp", seed=4, temperature=1.7)
    b = save_random_checkpoint(tmp_path / "b" / "best", "cnn", seed=5, temperature=0.6, random_batch_norm=True)
    report = export.export_onnx([a, b], tmp_path / "ensemble.onnx")
    assert report.model == "ensemble" and report.check.argmax_agreement == report.check.count
    x = np.random.default_rng(3).random((8, 28, 28)).astype(np.float32)
    from_torch = Predictor.from_checkpoints([a, b], device="cpu").predict_arrays(x)
    from_onnx = Predictor.from_onnx(tmp_path / "ensemble.onnx", device="cpu").predict_arrays(x)
    np.testing.assert_allclose(from_onnx, from_torch, atol=1e-5)
    members = json.loads(export.read_metadata(tmp_path / "ensemble.onnx")["model_config"])["members"]
    assert [m["temperature"] for m in members] == [1.7, 0.6]


def test_predict_reads_with_an_ensemble_from_the_command_line(tmp_path, monkeypatch, capsys):
    a = save_random_checkpoint(tmp_path / "a" / "best", "mlp", seed=6)
    b = save_random_checkpoint(tmp_path / "b" / "best", "mlp", seed=7)
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[4:24, 12:16] = 255
    image = tmp_path / "one.png"
    from PIL import Image

    Image.fromarray(digit).save(image)
    code, out, err = run_main(
        monkeypatch, capsys, "predict", "--checkpoint", str(a), "--checkpoint", str(b), "--json", str(image)
    )
    assert code == 0, err
    answer = json.loads(out.strip().splitlines()[-1])
    expected = Predictor.from_checkpoints([a, b], device="cpu").predict([str(image)])[0]
    np.testing.assert_allclose(answer["probabilities"], expected.probabilities, atol=1e-6)
