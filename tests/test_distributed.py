"""Two processes with gloo on localhost, launched by torchrun as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import write_dataset

pytestmark = pytest.mark.slow


def torchrun(nproc: int, *train_args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "digitlab",
        "train",
        *train_args,
    ]


def common_args(data_dir: Path, out: Path, epochs: int = 2) -> list[str]:
    return [
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--model",
        "mlp",
        "--epochs",
        str(epochs),
        "--batch-size",
        "64",
        "--val-size",
        "64",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--quiet",
    ]


def env_for_tests() -> dict[str, str]:
    # One thread per process: two processes share this machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "DIGITLAB_DIST_TIMEOUT": "60"}


def test_two_processes_match_one_process(tmp_path):
    data_dir = write_dataset(tmp_path / "data", n_train=512 + 64, n_test=128)
    one = subprocess.run(
        [sys.executable, "-m", "digitlab", "train", *common_args(data_dir, tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env_for_tests(),
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        torchrun(2, *common_args(data_dir, tmp_path / "two")),
        capture_output=True,
        text=True,
        timeout=300,
        env=env_for_tests(),
    )
    assert two.returncode == 0, two.stderr[-3000:]

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["max_weight_difference_between_processes"] == 0.0  # both ranks hold the same weights
    a, b = load_file(str(tmp_path / "one" / "last.safetensors")), load_file(str(tmp_path / "two" / "last.safetensors"))
    for key in a:
        # Same global batches, same mean gradient; only the order of floating-point sums differs.
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-3), key
    one_metrics = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two_metrics = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one_metrics) == len(two_metrics) == 2
    for m1, m2 in zip(one_metrics, two_metrics):
        assert m1["train_loss"] == pytest.approx(m2["train_loss"], rel=1e-3)  # all-reduced over both ranks
        assert m1["val_accuracy"] == pytest.approx(m2["val_accuracy"], abs=1 / 64)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_a_killed_rank_ends_the_run_with_a_clear_error(tmp_path):
    data_dir = write_dataset(tmp_path / "data", n_train=20000, n_test=128)
    out = tmp_path / "run"
    args = common_args(data_dir, out, epochs=50)
    proc = subprocess.Popen(
        torchrun(2, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env_for_tests(), "DIGITLAB_DIST_TIMEOUT": "30"},
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    ranks = {_rank_of(pid): pid for pid in _children(proc.pid)}
    assert 1 in ranks, ranks
    os.kill(ranks[1], signal.SIGKILL)
    try:
        output, _ = proc.communicate(timeout=120)  # must end by itself, not hang
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the surviving rank hung after its peer was killed")
    assert proc.returncode != 0
    assert "rank 0: lost contact with another training process" in output, output[-3000:]
