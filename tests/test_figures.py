"""PNG figures: drawn without pyplot, written through a temp file and a rename."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from digitlab.figures import new_figure, save_png


def test_save_png_writes_a_png_and_leaves_no_temp_file(tmp_path):
    fig = new_figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    path = save_png(fig, tmp_path / "out" / "line.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["line.png"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """savefig dies halfway through writing its PNG: the file already at the path stays as it was, whole, and no
    temp file is left. (The fake savefig writes real bytes before it raises, to whatever it is given: a path or
    a stream; a save_png that wrote to the target directly would leave half a PNG there.)"""
    target = tmp_path / "plot.png"
    target.write_bytes(b"previous")
    fig = new_figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    real_savefig = fig.savefig

    def savefig_dies_halfway(fname, *args, **kwargs):
        whole = io.BytesIO()
        real_savefig(whole, *args, **kwargs)
        half = whole.getvalue()[: len(whole.getvalue()) // 2]
        if hasattr(fname, "write"):
            fname.write(half)
            fname.flush()
        else:
            Path(fname).write_bytes(half)
        raise RuntimeError("renderer failed halfway")

    monkeypatch.setattr(fig, "savefig", savefig_dies_halfway)
    with pytest.raises(RuntimeError, match="halfway"):
        save_png(fig, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
