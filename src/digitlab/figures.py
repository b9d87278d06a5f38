"""Figures as PNG files: matplotlib's Agg backend without pyplot's global state, written crash-safely.

A `Figure` with its own `FigureCanvasAgg` needs no display and no `matplotlib.use(...)`, and is safe to draw
in any thread. matplotlib is imported on first use: it costs half a second.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .idx import atomic_write_bytes


def new_figure(**kwargs: Any):
    """A matplotlib Figure drawn by the Agg backend; kwargs go to Figure (figsize, dpi, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | Path, dpi: float | None = None) -> Path:
    """Write the figure as a PNG through a temp file and a rename: never a half-written file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi if dpi is not None else "figure")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
