from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from digitlab import checkpoint, training
from digitlab.models import build_model
from digitlab.training import TrainConfig, TrainingInterrupted, augment_batch, train, train_step

from .conftest import run_main, write_dataset


def tiny_config(data_dir: Path, out: Path, **overrides) -> TrainConfig:
    base = TrainConfig(model="mlp", epochs=3, batch_size=32, lr=3e-3, val_size=64, seed=1, device="cpu",
                       precision="fp32", data=str(data_dir), out=str(out), quiet=True)
    return replace(base, **overrides)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_loss_decreases_and_outputs_are_written(tiny_mnist_dir, tmp_path):
    run = train(tiny_config(tiny_mnist_dir, tmp_path / "run"))
    losses = [r["train_loss"] for r in run.history]
    assert losses[-1] < losses[0]
    assert run.best_val_accuracy > 0.9 and run.test_accuracy > 0.9  # the synthetic classes are easy
    for name in ("config.json", "metrics.jsonl", "curves.png", "best.safetensors", "best.json",
                 "last.safetensors", "last.json", "last.state.pt", "summary.json"):
        assert (run.dir / name).is_file(), name
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    saved = json.loads((run.dir / "config.json").read_text())
    assert saved["epochs"] == 3 and saved["optimizer"] == "adamw"  # recipe defaults were filled in
    assert not list(run.dir.glob("*.tmp")) and not list(run.dir.glob(".*"))


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model("mlp")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for _ in range(150):
        loss, correct = train_step(model, x, y, optimizer, 0.0, None, None)
    assert float(loss) < 0.01 and int(correct) == 32


def test_checkpoint_round_trip_gives_the_same_predictions(tiny_mnist_dir, tmp_path):
    run = train(tiny_config(tiny_mnist_dir, tmp_path / "run", epochs=1))
    model, info = checkpoint.load(run.dir)
    assert info.model == "mlp" and info.class_names == [str(d) for d in range(10)]
    assert info.metrics["test_accuracy"] == pytest.approx(run.test_accuracy)
    assert info.train_config["seed"] == 1 and len(info.dataset_md5) == 4
    from digitlab import data
    from digitlab.evaluation import evaluate_tensors

    d = data.load(tiny_mnist_dir)
    result = evaluate_tensors(model, d.test_images, d.test_labels, info.mean, info.std, torch.device("cpu"))
    assert result.accuracy == pytest.approx(run.test_accuracy)


@pytest.mark.parametrize("model, extra", [("mlp", {}), ("cnn", {"augment": True, "batch_size": 64, "epochs": 2})])
def test_interrupted_and_resumed_run_is_bit_identical(tiny_mnist_dir, tmp_path, monkeypatch, model, extra):
    config = tiny_config(tiny_mnist_dir, tmp_path / "straight", model=model, **extra)
    train(config)

    calls = {"n": 0}
    real_step = training.train_step

    def step_then_signal(*args, **kwargs):
        result = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 11:  # mid-way through the first epoch (14 steps per epoch at batch 32)
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(training, "train_step", step_then_signal)
    interrupted_dir = tmp_path / "interrupted"
    with pytest.raises(TrainingInterrupted) as caught:
        train(replace(config, out=str(interrupted_dir)))
    assert caught.value.exit_code == 130
    assert f"digitlab train --resume {interrupted_dir}" in str(caught.value)
    monkeypatch.setattr(training, "train_step", real_step)
    train(TrainConfig(resume=str(interrupted_dir), device="cpu", quiet=True))

    for name in ("last.safetensors", "best.safetensors"):
        a, b = weights(tmp_path / "straight" / name), weights(interrupted_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    resumed = (interrupted_dir / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in ("epoch_seconds", "images_per_second")} for x in lines]
    assert strip(straight) == strip(resumed)


def test_target_accuracy_stops_early(tiny_mnist_dir, tmp_path):
    run = train(tiny_config(tiny_mnist_dir, tmp_path / "run", epochs=10, target_accuracy=0.5))
    assert run.stopped_early and len(run.history) < 10


def test_same_seed_same_weights(tiny_mnist_dir, tmp_path):
    a = train(tiny_config(tiny_mnist_dir, tmp_path / "a", epochs=1))
    b = train(tiny_config(tiny_mnist_dir, tmp_path / "b", epochs=1))
    c = train(tiny_config(tiny_mnist_dir, tmp_path / "c", epochs=1, seed=2))
    wa, wb, wc = weights(a.last), weights(b.last), weights(c.last)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_augment_batch_is_seeded_and_keeps_shape():
    x = torch.rand(8, 1, 28, 28)
    a = augment_batch(x, torch.Generator().manual_seed(3), background=0.0)
    b = augment_batch(x, torch.Generator().manual_seed(3), background=0.0)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.allclose(a, x)
    identity = augment_batch(x, torch.Generator().manual_seed(3), 0.0, degrees=0, scale=0, shift_px=0)
    assert torch.allclose(identity, x, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ({"epochs": 0}, "--epochs 0: must be >= 1"),
    ({"optimizer": "rmsprop"}, "--optimizer 'rmsprop'"),
    ({"model": "resnet"}, "--model 'resnet'"),
    ({"target_accuracy": 99.0}, "--target-accuracy 99.0"),
])
def test_bad_config_values_are_rejected(override, message, tmp_path):
    with pytest.raises(training.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        replace(TrainConfig(), **override).resolved()


def test_resume_of_a_dir_that_is_not_a_run(tmp_path):
    with pytest.raises(training.ConfigError, match="no config.json"):
        train(TrainConfig(resume=str(tmp_path), quiet=True))


def test_resume_with_optimizer_state_from_another_version_is_a_one_line_error(tiny_mnist_dir, tmp_path,
                                                                               monkeypatch, capsys):
    """A last.state.pt whose optimizer state has another layout (e.g. torch.optim's) cannot be resumed."""
    run = train(tiny_config(tiny_mnist_dir, tmp_path / "run", epochs=1))
    state_path = run.dir / "last.state.pt"
    state = torch.load(state_path, weights_only=True)
    state["optimizer"] = {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}  # torch.optim's layout
    torch.save(state, state_path)
    code, _, err = run_main(monkeypatch, capsys, "train", "--resume", str(run.dir), "--quiet")
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{state_path}: optimizer state does not fit this run" in err


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "digitlab", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_cli_sigint_saves_last_and_exits_130_then_resumes(tmp_path):
    data_dir = write_dataset(tmp_path / "data", n_train=8192, n_test=128)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "digitlab", "train", "--data", str(data_dir), "--out", str(out), "--epochs", "50",
         "--batch-size", "16", "--device", "cpu", "--val-size", "64", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"resume with: digitlab train --resume {out}" in stderr
    state = checkpoint.load_state(out / "last")
    assert state["epoch"] >= 1
    # SIGTERM, as a job scheduler would send it, gives 143.
    proc = subprocess.Popen([sys.executable, "-m", "digitlab", "train", "--resume", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    while proc.poll() is None and not _later_epoch(out, state["epoch"]):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert checkpoint.load_state(out / "last")["epoch"] > state["epoch"]


def _later_epoch(out: Path, epoch: int) -> bool:
    try:
        return checkpoint.load_state(out / "last")["epoch"] > epoch
    except checkpoint.CheckpointError:
        return False


@pytest.mark.realdata
@pytest.mark.slow
def test_default_mlp_training_reaches_98_percent(mnist_dir, tmp_path):
    result = run_cli("train", "--data", str(mnist_dir), "--out", str(tmp_path / "run"), "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.98, summary
