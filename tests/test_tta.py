"""Test-time augmentation (tta.py): the shifted views, their average, and `--tta` in the Predictor, evaluate
and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from digitlab import tta
from digitlab.evaluation import evaluate
from digitlab.prediction import Predictor

from .conftest import run_main, save_random_checkpoint, write_dataset


def test_shift_moves_pixels_and_fills_with_paper():
    x = np.arange(1, 17, dtype=np.float32).reshape(1, 4, 4)
    right = tta.shift(x, 1, 0)
    np.testing.assert_array_equal(right[0, :, 1:], x[0, :, :-1])
    assert (right[0, :, 0] == 0).all()
    up = tta.shift(x, 0, -1)
    np.testing.assert_array_equal(up[0, :-1], x[0, 1:])
    assert (up[0, -1] == 0).all()
    assert tta.shift(x, 0, 0) is not x and (tta.shift(x, 0, 0) == x).all()
    assert (x == np.arange(1, 17).reshape(1, 4, 4)).all()  # the input is left as it was


def test_shift_works_on_torch_uint8_as_on_numpy():
    x = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    for dx, dy in tta.SHIFTS:
        from_torch = tta.shift(torch.from_numpy(x), dx, dy)
        assert from_torch.dtype == torch.uint8
        np.testing.assert_array_equal(from_torch.numpy(), tta.shift(x, dx, dy))


def test_averaged_is_the_mean_over_the_five_views():
    x = np.random.default_rng(1).random((2, 28, 28))
    seen = []

    def probabilities(view: np.ndarray) -> np.ndarray:
        seen.append(view)
        return view[:, 14, 10:12]  # depends on where the ink is, so every view gives another answer

    got = tta.averaged(probabilities, x)
    assert len(seen) == 5
    expected = sum(tta.shift(x, dx, dy)[:, 14, 10:12] for dx, dy in tta.SHIFTS) / 5
    np.testing.assert_allclose(got, expected)


def test_predictor_with_tta_averages_its_calibrated_answers_over_the_views(tmp_path):
    weights = save_random_checkpoint(tmp_path / "run" / "best", "cnn", seed=3, temperature=1.5, random_batch_norm=True)
    x = np.random.default_rng(2).random((6, 28, 28)).astype(np.float32)
    plain = Predictor.from_checkpoint(weights, device="cpu")
    views = [plain.predict_arrays(tta.shift(x, dx, dy)) for dx, dy in tta.SHIFTS]
    with_tta = Predictor.from_checkpoints([weights], device="cpu", tta=True).predict_arrays(x)
    np.testing.assert_allclose(with_tta, sum(views) / 5, atol=1e-6)
    assert not np.allclose(with_tta, views[0], atol=1e-4)  # the shifts changed the answer
    np.testing.assert_allclose(with_tta.sum(1), 1, atol=1e-5)


@pytest.fixture(scope="module")
def trained_cnn(tmp_path_factory):
    from digitlab.training import train

    root = tmp_path_factory.mktemp("tta")
    data_dir = write_dataset(root / "data", n_train=400, n_test=150)
    run = train(model="cnn", epochs=1, data=str(data_dir), out=str(root / "run"), val_size=100, quiet=True)
    return run.dir, data_dir


def test_evaluate_with_tta_reports_it_and_scores_the_averaged_views(trained_cnn):
    run_dir, data_dir = trained_cnn
    plain = evaluate(run_dir, data_dir, plots=False)
    shifted = evaluate(run_dir, data_dir, plots=False, tta=True)
    assert shifted.tta and not plain.tta
    assert shifted.count == plain.count and 0 <= shifted.ece <= 1
    assert shifted.loss != plain.loss  # other probabilities, not the same pass again


def test_tta_from_the_command_line(trained_cnn, monkeypatch, capsys):
    run_dir, data_dir = trained_cnn
    code, out, err = run_main(
        monkeypatch,
        capsys,
        "evaluate",
        "--checkpoint",
        str(run_dir),
        "--data",
        str(data_dir),
        "--json",
        "--tta",
        "--no-plots",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["tta"] is True
    assert report["accuracy"] == pytest.approx(evaluate(run_dir, data_dir, plots=False, tta=True).accuracy)
