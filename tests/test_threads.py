"""Issue 11.15: torch's thread count and OpenMP spin chosen against the load (`digitlab.threads`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from digitlab import threads
from digitlab.idx import DataError

from .conftest import run_main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "cores, busy, expected",
    [
        (2, None, 2),
        (2, 0.0, 2),
        (2, 0.4, 2),
        (2, 0.6, 1),
        (2, 1.0, 1),
        (2, 2.0, 1),
        (2, 7.5, 1),
        (16, 3.2, 13),
        (1, 0.0, 1),
    ],
)
def test_threads_are_the_cores_others_leave_free(cores, busy, expected):
    assert threads.choose_threads(cores, busy) == expected


def test_setting_values():
    assert threads.parse_setting(None) == "auto"
    assert threads.parse_setting(" Off ") == "off"
    assert threads.parse_setting("3") == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(threads.ThreadsError) as exc:
            threads.parse_setting(bad)
        assert str(exc.value) == f"DIGITLAB_THREADS={bad!r}: expected auto, off or a number of threads >= 1"


def test_busy_cores_are_others_not_this_process(monkeypatch):
    """2 CPUs, 100 ticks each over the sample: 150 busy ticks of which this process used 0.5 s (50 ticks)."""
    ticks = iter([(1000, 4000), (1150, 4200)])
    own = iter([10.0, 10.5])
    monkeypatch.setattr(threads, "_cpu_ticks", lambda: next(ticks))
    monkeypatch.setattr(threads, "_own_seconds", lambda: next(own))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
    assert threads.others_busy(0.0) == pytest.approx(1.0)  # 1.5 cores busy, 0.5 of them ours


def test_no_proc_stat_means_all_cores(monkeypatch):
    monkeypatch.setattr(threads, "_cpu_ticks", lambda: None)
    assert threads.others_busy(0.0) is None
    assert threads.choose_threads(4, threads.others_busy(0.0)) == 4


def test_busy_sample_on_this_machine_is_a_core_count():
    busy = threads.others_busy(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1)


def configured(kind: str, **env: str) -> dict:
    """threads.configure(kind) in a fresh process, then torch imported: what torch and libgomp were given."""
    code = (
        f"import json, os; from digitlab import threads; p = threads.configure({kind!r}); import torch; "
        "print(json.dumps({'threads': torch.get_num_threads(), 'policy': p.threads, 'reason': p.reason, "
        "'spin': os.environ.get('GOMP_SPINCOUNT'), 'omp': os.environ.get('OMP_NUM_THREADS')}))"
    )
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DIGITLAB_THREADS", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_fixed_count_and_the_short_spin_reach_torch():
    got = configured("train", DIGITLAB_THREADS="1")
    assert got["threads"] == 1 and got["spin"] == str(threads.SPIN_COUNT)


def test_off_leaves_torch_and_libgomp_alone():
    got = configured("train", DIGITLAB_THREADS="off")
    assert got["policy"] is None and got["spin"] is None and got["omp"] is None
    assert got["threads"] == threads.usable_cores()


def test_the_users_openmp_settings_win():
    got = configured("predict", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
    assert got["threads"] == 1 and got["spin"] is None and got["reason"] == "OMP_NUM_THREADS set by the user"


def test_auto_takes_at_least_one_and_at_most_the_usable_cores():
    got = configured("train")
    assert 1 <= got["threads"] <= threads.usable_cores() and got["threads"] == got["policy"]


def test_serve_runs_one_thread_per_request():
    assert configured("serve")["threads"] == 1


def test_configure_after_torch_is_imported_sets_the_count_directly(monkeypatch):
    import torch

    before = torch.get_num_threads()
    env: dict = {}
    try:
        policy = threads.configure("train", env=env, sample_s=0.0)
        assert torch.get_num_threads() == policy.threads
        assert env == {}  # too late for libgomp's environment: nothing is set that would only mislead
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--data", "NOWHERE", "--quiet"],
        ["evaluate", "--checkpoint", "NOWHERE"],
        ["predict", "--checkpoint", "NOWHERE", "x.png"],
        ["serve", "--checkpoint", "NOWHERE"],
    ],
)
def test_the_commands_configure_threads_first(monkeypatch, capsys, tmp_path, args):
    calls: list[str] = []
    monkeypatch.delenv("DIGITLAB_DATA", raising=False)  # else train falls back to the real data (as CI sets it)
    monkeypatch.setattr(threads, "configure", lambda kind: calls.append(kind))
    monkeypatch.setattr(
        "digitlab.datafiles.download_dataset", lambda *a, **k: (_ for _ in ()).throw(DataError("offline in tests"))
    )
    args = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    code, _, _ = run_main(monkeypatch, capsys, *args)
    assert code == 1 and calls == [args[0]]
