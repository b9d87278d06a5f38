from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from digitlab import checkpoint
from digitlab.checkpoint import CheckpointError, CheckpointInfo
from digitlab.models import build_model


def info_for(model: str) -> CheckpointInfo:
    return CheckpointInfo(model=model, model_config={}, mean=0.1307, std=0.3081,
                          class_names=[str(d) for d in range(10)], metrics={"test_accuracy": 0.5})


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "best", build_model("mlp"), info_for("mlp"), state={"epoch": 3})
    return tmp_path


def test_round_trip(saved):
    model, info = checkpoint.load(saved)  # a run dir resolves to best
    torch.manual_seed(0)
    reference = build_model("mlp")
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), reference.eval()(x))
    assert info.model == "mlp" and info.format_version == checkpoint.FORMAT_VERSION
    assert checkpoint.load_state(saved / "best")["epoch"] == 3
    assert not list(saved.glob(".*.tmp"))


@pytest.mark.parametrize("spelling", ["best", "best.safetensors", "best.json", "."])
def test_paths_that_name_the_same_checkpoint(saved, spelling):
    assert checkpoint.resolve(saved / spelling) == saved / "best.safetensors"


def test_cnn_config_survives(tmp_path):
    model = build_model("cnn", {"channels": [8, 16, 32]})
    checkpoint.save(tmp_path / "c", model, info_for("cnn"))
    loaded, info = checkpoint.load(tmp_path / "c")
    assert loaded.config.channels == (8, 16, 32) and info.model_config["channels"] == [8, 16, 32]


def test_truncated_weights(saved):
    path = saved / "best.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"best.safetensors: truncated or corrupt weights"):
        checkpoint.load(saved)


def test_missing_weights(saved):
    (saved / "best.safetensors").unlink()
    with pytest.raises(CheckpointError, match="best.safetensors: file not found"):
        checkpoint.load(saved / "best")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.safetensors: file not found"):
        checkpoint.load(tmp_path / "nothing.safetensors")


def test_another_architecture(saved):
    sidecar = saved / "best.json"
    raw = json.loads(sidecar.read_text())
    raw["model"], raw["model_config"] = "cnn", {}
    sidecar.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"weights do not fit a 'cnn' model"):
        checkpoint.load(saved)


def test_expect_model(saved):
    with pytest.raises(CheckpointError, match=r"checkpoint is a 'mlp' model, expected 'cnn'"):
        checkpoint.load(saved, expect_model="cnn")


def test_newer_format_version(saved):
    sidecar = saved / "best.json"
    raw = json.loads(sidecar.read_text())
    raw["format_version"] = checkpoint.FORMAT_VERSION + 1
    sidecar.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="newer than this digitlab supports"):
        checkpoint.load(saved)


def test_not_a_sidecar(saved):
    (saved / "best.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid checkpoint sidecar"):
        checkpoint.load(saved)


def test_empty_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in this directory"):
        checkpoint.load(tmp_path)


def test_corrupt_resume_state(saved):
    (saved / "best.state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt resume state"):
        checkpoint.load_state(saved / "best")


def test_cli_reports_a_bad_checkpoint_on_one_line(saved):
    path = saved / "best.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    result = subprocess.run([sys.executable, "-m", "digitlab", "evaluate", "--checkpoint", str(saved)],
                            capture_output=True, text=True, env={**os.environ, "DIGITLAB_DATA": str(saved)})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "truncated or corrupt weights" in result.stderr
    assert "Traceback" not in result.stderr
