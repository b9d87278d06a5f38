"""The `digitlab` console script's exit (`cli.entry_point`): it skips Python's teardown, so it must still deliver
every line of output and the right exit code, and fall back to a normal exit while other threads work."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from digitlab import cli


class _Exited(Exception):
    def __init__(self, code: int):
        self.code = code


@pytest.fixture
def fast_exit(monkeypatch):
    """os._exit replaced by an exception carrying its code, so the test process survives."""

    def fake_exit(code: int) -> None:
        raise _Exited(code)

    monkeypatch.setattr(cli.os, "_exit", fake_exit)


@pytest.mark.parametrize(
    ("exit_with", "code", "stderr"),
    [(None, 0, ""), (0, 0, ""), (3, 3, ""), ("boom: a message", 1, "boom: a message\n")],
)
def test_entry_point_exits_with_mains_code(monkeypatch, capsys, fast_exit, exit_with, code, stderr):
    def main() -> None:
        print("all of the output")
        sys.exit(exit_with)

    monkeypatch.setattr(cli, "main", main)
    with pytest.raises(_Exited) as exited:
        cli.entry_point()
    assert exited.value.code == code
    captured = capsys.readouterr()
    assert captured.out == "all of the output\n" and captured.err == stderr


def test_entry_point_exits_normally_while_another_thread_works(monkeypatch, fast_exit):
    """A non-daemon thread still running must be waited for, as a normal exit does: no os._exit then."""
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    monkeypatch.setattr(cli, "main", lambda: sys.exit(4))
    try:
        with pytest.raises(SystemExit) as exited:
            cli.entry_point()
        assert exited.value.code == 4
    finally:
        release.set()
        worker.join()


def test_console_script_output_is_complete_through_a_pipe():
    """Through a pipe stdout is block-buffered: the fast exit must flush it."""
    done = subprocess.run(
        [sys.executable, "-m", "digitlab", "train", "--list-recipes"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    assert names == ["mlp", "cnn", "quick", "best"]


def test_console_script_error_is_one_line_and_exit_code_1():
    done = subprocess.run(
        [sys.executable, "-m", "digitlab", "train", "--recipe", "fastest"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "digitlab: error: --recipe 'fastest': expected one of mlp, cnn, quick, best"
    ]
