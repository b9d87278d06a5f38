"""Why this digit: integrated gradients (digitlab.saliency), Predictor.saliency and `predict --explain DIR`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from .conftest import run_main, save_random_checkpoint


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def predictor(request, tmp_path_factory):
    from digitlab.prediction import Predictor

    path = save_random_checkpoint(
        tmp_path_factory.mktemp(request.param) / "best", request.param, random_batch_norm=True
    )
    return Predictor.from_checkpoint(path, device="cpu")


def seven() -> np.ndarray:
    image = Image.new("L", (28, 28), 0)
    draw = ImageDraw.Draw(image)
    draw.line([8, 6, 20, 6], fill=255, width=3)
    draw.line([20, 6, 12, 24], fill=255, width=3)
    return np.asarray(image, dtype=np.float32) / 255


def margin(predictor, x: np.ndarray, digit: int, runner_up: int) -> float:
    with torch.no_grad():
        t = (torch.from_numpy(x.reshape(1, 1, 28, 28)) - predictor.info.mean) / predictor.info.std
        logits = predictor.model(t)[0]
    return float(logits[digit] - logits[runner_up])


def test_map_explains_the_margin_between_the_digit_and_the_runner_up(predictor):
    x = seven()
    result = predictor.saliency(x, steps=64)
    assert result.map.shape == (28, 28) and result.map.dtype == np.float32
    order = np.argsort(result.logits)[::-1]
    assert (result.digit, result.runner_up) == (int(order[0]), int(order[1]))
    assert np.all(result.map[x == 0] == 0)  # black baseline: pixels without ink get no credit
    # completeness: the map sums to the margin's change from a black image to x
    change = margin(predictor, x, result.digit, result.runner_up) - margin(
        predictor, np.zeros_like(x), result.digit, result.runner_up
    )
    assert result.map.sum() == pytest.approx(change, rel=0.05, abs=0.02)


def test_saliency_leaves_the_shared_model_untouched(predictor):
    before = {k: v.clone() for k, v in predictor.model.state_dict().items()}
    predictor.saliency(seven())
    assert all(p.grad is None for p in predictor.model.parameters())  # nothing accumulated
    assert not predictor.model.training
    for k, v in predictor.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_saliency_image_marks_the_strokes(predictor):
    from digitlab.saliency import saliency_image

    x = seven()
    image = saliency_image(x, predictor.saliency(x))
    assert image.size == (224, 224) and image.mode == "RGB"
    rgb = np.asarray(image).astype(int)
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 60).sum() > 100  # orange or blue over the strokes
    assert rgb[:8, :8].max() == 0  # no ink there: black


def test_onnx_like_predictor_has_no_saliency():
    from digitlab.prediction import PredictError, Predictor

    predictor = Predictor(lambda x: np.zeros((len(x), 10), np.float32), info=None)
    with pytest.raises(PredictError, match="PyTorch"):
        predictor.saliency(seven())


def test_cli_predict_explain_writes_a_png_per_input(tmp_path, monkeypatch, capsys):
    path = save_random_checkpoint(tmp_path / "ckpt" / "best", "mlp")
    images = tmp_path / "in"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray((seven() * 255).astype(np.uint8)).save(images / name)
    (images / "c.png").write_bytes(b"not an image")
    out = tmp_path / "why"
    code, stdout, stderr = run_main(
        monkeypatch, capsys, "predict", "--checkpoint", str(path), "--device", "cpu", "--explain", str(out), str(images)
    )
    assert code == 1 and "c.png" in stderr  # the bad file is reported; the others are explained
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 2 and written[0].startswith("00000-") and "a.png" in written[0]
    assert Image.open(out / written[0]).size == (224, 224)
