"""PNG figures: drawn without pyplot, written through a temp file and a rename."""

from __future__ import annotations

import pytest

from digitlab.figures import new_figure, save_png


def test_save_png_writes_a_png_and_leaves_no_temp_file(tmp_path):
    fig = new_figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    path = save_png(fig, tmp_path / "out" / "line.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["line.png"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "plot.png"
    target.write_bytes(b"previous")
    fig = new_figure(figsize=(2, 2))

    def broken_savefig(*args, **kwargs):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(fig, "savefig", broken_savefig)
    with pytest.raises(RuntimeError):
        save_png(fig, target)
    assert target.read_bytes() == b"previous"
