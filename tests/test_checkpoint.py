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
    return CheckpointInfo(
        model=model,
        model_config={},
        mean=0.1307,
        std=0.3081,
        class_names=[str(d) for d in range(10)],
        metrics={"test_accuracy": 0.5},
    )


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


def evaluate_in_a_process(run_dir: Path) -> subprocess.CompletedProcess:
    """`digitlab evaluate --checkpoint RUN_DIR` as a user runs it, with the run's own data dir."""
    return subprocess.run(
        [sys.executable, "-m", "digitlab", "evaluate", "--checkpoint", str(run_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "DIGITLAB_DATA": str(run_dir)},
    )


def test_cli_reports_a_bad_checkpoint_on_one_line(saved):
    path = saved / "best.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    result = evaluate_in_a_process(saved)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "truncated or corrupt weights" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------------
# Issue 11: one atomic unit (manifest of SHA-256s in the sidecar, written last), validated sidecars
# ----------------------------------------------------------------------------------------------------------

KILL_DURING_SAVE = """
import os, sys, torch
from digitlab import checkpoint
from digitlab.models import build_model
from tests.test_checkpoint import info_for

base, renames_before_kill = sys.argv[1], int(sys.argv[2])
real, done = checkpoint._rename, []
def rename_then_die(tmp, path):
    if len(done) == renames_before_kill:
        os._exit(137)  # as SIGKILL would: no cleanup, no finally
    real(tmp, path)
    done.append(path)
checkpoint._rename = rename_then_die
torch.manual_seed(1)
checkpoint.save(base, build_model("mlp"), info_for("mlp"), state={"epoch": 4})
"""


@pytest.mark.parametrize("renames_before_kill", [0, 1, 2])
def test_a_kill_between_the_renames_never_gives_a_mixed_checkpoint(saved, renames_before_kill):
    """Defect 1: a kill (fault injected with os._exit) at each point of a save of weights+state+sidecar."""
    base = saved / "best"
    result = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, str(base), str(renames_before_kill)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 137, result.stderr
    assert list(saved.glob(".best.*.tmp")), "a kill leaves its temp files behind"
    if renames_before_kill == 0:  # nothing renamed: the old checkpoint is intact and still loads
        assert checkpoint.load_state(base)["epoch"] == 3
        checkpoint.load(base)
    else:  # new weights (and maybe state) beside the old sidecar: refused, never mixed
        with pytest.raises(CheckpointError, match=r"best.safetensors: truncated or corrupt weights: SHA-256"):
            checkpoint.load(base)
        if renames_before_kill == 2:
            with pytest.raises(CheckpointError, match=r"best.state.pt: truncated or corrupt resume state: SHA-256"):
                checkpoint.load_state(base)
    # The next save removes the stale temp files and writes a consistent checkpoint.
    checkpoint.save(base, build_model("mlp"), info_for("mlp"), state={"epoch": 5})
    assert not list(saved.glob(".*.tmp"))
    assert checkpoint.load_state(base)["epoch"] == 5


def test_sidecar_is_the_manifest(saved):
    raw = json.loads((saved / "best.json").read_text())
    import hashlib

    assert raw["weights_sha256"] == hashlib.sha256((saved / "best.safetensors").read_bytes()).hexdigest()
    assert raw["state_sha256"] == hashlib.sha256((saved / "best.state.pt").read_bytes()).hexdigest()


def test_a_checkpoint_without_state_has_no_resume_state(tmp_path):
    checkpoint.save(tmp_path / "best", build_model("mlp"), info_for("mlp"))
    (tmp_path / "best.state.pt").write_bytes(b"stale")  # not part of the checkpoint
    with pytest.raises(CheckpointError, match=r"best.state.pt: resume state not found \(best.json lists none\)"):
        checkpoint.load_state(tmp_path / "best")


def test_a_bit_flip_in_the_weights_is_refused(saved):
    """Defect 5: one flipped bit in a float (safetensors still parses it) is caught by the SHA-256."""
    path = saved / "best.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(
        CheckpointError,
        match=r"best.safetensors: truncated or corrupt weights: SHA-256 differs "
        r"from the one best.json records",
    ):
        checkpoint.load(saved)


def test_cli_predict_with_a_flipped_bit_exits_1_on_one_line(saved, tmp_path):
    path = saved / "best.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x10
    path.write_bytes(bytes(raw))
    image = tmp_path / "x-idx3-ubyte"
    import numpy as np

    from digitlab.idx import write_idx

    write_idx(image, np.zeros((1, 28, 28), np.uint8))
    result = subprocess.run(
        [sys.executable, "-m", "digitlab", "predict", "--checkpoint", str(saved), str(image)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "SHA-256" in result.stderr and "Traceback" not in result.stderr


def test_checkpoints_without_digests_still_load(saved):
    """Sidecars written before digitlab recorded SHA-256s (and temperatures) load unchecked."""
    sidecar = saved / "best.json"
    raw = json.loads(sidecar.read_text())
    for key in ("weights_sha256", "state_sha256", "temperature"):
        del raw[key]
    sidecar.write_text(json.dumps(raw))
    _, info = checkpoint.load(saved)
    assert info.temperature == 1.0 and checkpoint.load_state(saved / "best")["epoch"] == 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"std": 0}, r"std 0: must be a finite number from 0.001 to 1"),
        ({"mean": float("nan")}, r"mean nan: must be a finite number"),
        ({"mean": None}, r"mean None, std 0.3081: give both or neither"),
        ({"std": "0.3"}, r"std '0.3': must be a finite number"),
        ({"model_config": {"hidden": 1e12}}, r"model_config.hidden 1000000000000.0: must be an integer from 1 to 8192"),
        ({"model_config": {"hidden": 10**9}}, r"model_config.hidden 1000000000: must be an integer from 1 to 8192"),
        ({"model_config": {"hidden": -5}}, r"model_config.hidden -5: must be an integer"),
        ({"model_config": {"hidden": [1, 2]}}, r"model_config.hidden \[1, 2\]: must be an integer"),
        ({"model_config": {"hidden": True}}, r"model_config.hidden True: must be an integer"),
        ({"model_config": {"in_features": 100}}, r"model_config.in_features 100: must be 784"),
        ({"model_config": {"depth": 3}}, r"model_config: model 'mlp' has no field 'depth'"),
        ({"model_config": []}, r"model_config \[\]: must be an object"),
        ({"model": "resnet"}, r"model 'resnet': unknown"),
        ({"class_names": ["a", "b"]}, r"class_names: 2 names, but the model has 10 outputs"),
        ({"class_names": ["0"] * 10}, r"class_names .*: names must be unique"),
        ({"class_names": "0123456789"}, r"class_names '0123456789': must be a list"),
        ({"temperature": 0}, r"temperature 0: must be a finite number > 0"),
        ({"temperature": -1.5}, r"temperature -1.5: must be a finite number > 0"),
        ({"temperature": float("inf")}, r"temperature inf: must be a finite number > 0"),
        ({"temperature": "1"}, r"temperature '1': must be a finite number > 0"),
        ({"epoch": -1}, r"epoch -1: must be an integer >= 0"),
        ({"metrics": [1]}, r"metrics \[1\]: must be an object"),
        ({"dataset": 7}, r"dataset 7: must be a string"),
        ({"weights_sha256": "abc"}, r"weights_sha256 'abc': must be 64 lowercase hex digits"),
        ({"format_version": "1"}, r"format_version '1': must be an integer >= 1"),
    ],
)
def test_every_sidecar_field_is_validated_and_the_message_names_the_sidecar(saved, change, message):
    """Defect 4: bad sidecar values are one-line errors naming best.json, before any model is built."""
    sidecar = saved / "best.json"
    raw = json.loads(sidecar.read_text())
    raw.update(change)
    sidecar.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=rf"best\.json: {message}") as caught:
        checkpoint.load(saved)
    assert "\n" not in str(caught.value)


def test_cnn_config_bounds(tmp_path):
    checkpoint.save(tmp_path / "c", build_model("cnn"), info_for("cnn"))
    sidecar = tmp_path / "c.json"
    raw = json.loads(sidecar.read_text())
    raw["model_config"]["channels"] = [16, 32, 10**6]
    sidecar.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"c\.json: model_config.channels .*list of 3 integers from 1 to 8192"):
        checkpoint.load(tmp_path / "c")


def test_missing_required_field(saved):
    sidecar = saved / "best.json"
    raw = json.loads(sidecar.read_text())
    del raw["class_names"], raw["std"]
    sidecar.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"best\.json: incomplete sidecar \(missing std, class_names\)"):
        checkpoint.load(saved)


def test_cli_evaluate_with_std_zero_exits_1_naming_the_sidecar(saved):
    """Defect 4: used to give NaN probabilities and report 9.8% with exit 0."""
    sidecar = saved / "best.json"
    raw = json.loads(sidecar.read_text())
    raw["std"] = 0
    sidecar.write_text(json.dumps(raw))
    result = evaluate_in_a_process(saved)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and f"{sidecar}: std 0" in result.stderr
