"""A lean install: the core runs without the optional stacks, a missing extra reads as one pip line, and
`train --tensorboard` writes the scalars of metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from digitlab.extras import MissingExtra, require

from .conftest import save_random_checkpoint, write_dataset

OPTIONAL = (
    "fastapi",
    "fastapi_offline",
    "starlette",
    "uvicorn",
    "anyio",
    "multipart",
    "python_multipart",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "matplotlib",
    "torchvision",
    "tensorboard",
)
PLOTS_SKIPPED = "digitlab: note: matplotlib is not installed: skipped"


def run_blocked(tmp_path: Path, *args: str, blocked: tuple[str, ...] = OPTIONAL) -> subprocess.CompletedProcess:
    """Run the `digitlab` command in a subprocess where every module in `blocked` cannot be imported, as when
    its extra is not installed (`sys.modules[name] = None`: `import name` raises ModuleNotFoundError and
    importlib.util.find_spec(name) says None)."""
    runner = tmp_path / "blocked_digitlab.py"
    runner.write_text(
        textwrap.dedent(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None
        sys.argv = ["digitlab", *sys.argv[1:]]
        from digitlab.cli import main
        main()
    """)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, str(runner), *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_require_names_the_pip_line_for_a_missing_module():
    with pytest.raises(MissingExtra) as caught:
        require("plots", "digitlab_no_such_module_for_the_test")
    assert str(caught.value) == (
        "drawing plots needs digitlab_no_such_module_for_the_test, which is not installed: "
        'pip install "digitlab[plots]"'
    )
    assert caught.value.exit_code == 1
    assert require("plots", "json").dumps([]) == "[]"  # present: the module itself


def test_importing_digitlab_and_training_loads_no_optional_stack():
    code = f"""
        import sys
        import digitlab, digitlab.cli, digitlab.training, digitlab.evaluation, digitlab.prediction
        from digitlab import train, evaluate, Predictor  # the lazy public API, resolved
        loaded = sorted(n for n in sys.modules if n.split(".")[0] in {OPTIONAL!r})
        print(" ".join(loaded))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.slow
def test_train_and_evaluate_run_without_any_extra(tmp_path):
    data_dir = write_dataset(tmp_path / "data", n_train=256, n_test=64)
    run_dir = tmp_path / "run"
    trained = run_blocked(
        tmp_path,
        "train",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--val-size",
        "64",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--data",
        str(data_dir),
        "--out",
        str(run_dir),
    )
    assert trained.returncode == 0, trained.stderr
    assert trained.stderr.count(PLOTS_SKIPPED) == 1, trained.stderr
    assert 'skipped curves.png (pip install "digitlab[plots]" draws them)' in trained.stderr
    assert (run_dir / "best.safetensors").exists() and not (run_dir / "curves.png").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1

    evaluated = run_blocked(
        tmp_path, "evaluate", "--checkpoint", str(run_dir), "--data", str(data_dir), "--device", "cpu", "--json"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert error_line(evaluated) == (
        f'{PLOTS_SKIPPED} confusion.png, mistakes.png, reliability.png (pip install "digitlab[plots]" draws them)'
    )
    assert 0.0 <= json.loads(evaluated.stdout)["accuracy"] <= 1.0
    assert not list(run_dir.glob("*.png"))


@pytest.mark.parametrize(
    "command, blocked, extra",
    [
        (["serve"], ("fastapi",), "serve"),
        (["serve"], OPTIONAL, "serve"),
        (["export", "--out", "model.onnx"], ("onnx",), "onnx"),
        (["export", "--out", "model.onnx"], ("onnxscript",), "onnx"),
        (["predict", "--model", "model.onnx", "digit.png"], ("onnxruntime",), "onnx"),
        (["train", "--tensorboard", "tb", "--epochs", "1"], ("tensorboard",), "tensorboard"),
    ],
    ids=["serve", "serve-all-blocked", "export-onnx", "export-onnxscript", "predict-onnx", "train-tensorboard"],
)
def test_a_command_without_its_extra_exits_1_with_the_pip_line(tmp_path, command, blocked, extra):
    weights = save_random_checkpoint(tmp_path / "ckpt" / "best", "mlp")
    (tmp_path / "model.onnx").write_bytes(b"not read: onnxruntime is missing first")
    (tmp_path / "digit.png").write_bytes(b"")
    data_dir = write_dataset(tmp_path / "data", n_train=128, n_test=32)
    args = [*command]
    if command[0] in ("serve", "export"):
        args += ["--checkpoint", str(weights)]
    if command[0] == "train":
        args += ["--data", str(data_dir), "--out", "run", "--device", "cpu"]
    result = run_blocked(tmp_path, *args, blocked=blocked)
    line = error_line(result)
    assert result.returncode == 1, result.stderr
    assert line.startswith("digitlab: error: ")
    assert line.endswith(f'which is not installed: pip install "digitlab[{extra}]"')
    if len(blocked) == 1:
        assert f"needs {blocked[0]}," in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # the train command failed before any epoch


def test_explore_grid_without_matplotlib_names_the_plots_extra(tmp_path):
    data_dir = write_dataset(tmp_path / "data", n_train=128, n_test=32)
    result = run_blocked(tmp_path, "explore", "--data", str(data_dir), "--grid", "grid.png", blocked=("matplotlib",))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'digitlab: error: drawing plots needs matplotlib, which is not installed: pip install "digitlab[plots]"'
    )


def test_train_tensorboard_writes_the_scalars_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from digitlab.training import TrainConfig, train

    data_dir = write_dataset(tmp_path / "data", n_train=256, n_test=64)
    tb_dir = tmp_path / "tb"
    run = train(
        TrainConfig(
            model="mlp",
            epochs=2,
            batch_size=64,
            lr=3e-3,
            val_size=64,
            device="cpu",
            precision="fp32",
            data=str(data_dir),
            out=str(tmp_path / "run"),
            quiet=True,
            tensorboard=str(tb_dir),
        )
    )
    records = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    numeric = sorted(
        k for k, v in records[0].items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    assert numeric == sorted(
        ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds", "images_per_second", "lr"]
    )
    assert sorted(events.Tags()["scalars"]) == numeric
    for name in numeric:
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([r[name] for r in records], rel=1e-6)
    assert json.loads((run.dir / "config.json").read_text())["tensorboard"] == str(tb_dir)
