"""Figures and images as PNG files: matplotlib's Agg backend without pyplot's global state, and `png_bytes`,
the one PNG encoder for images (the preprocessed 28x28 digit, saliency maps); files are written crash-safely.

A `Figure` with its own `FigureCanvasAgg` needs no display and no `matplotlib.use(...)`, and is safe to draw
in any thread. matplotlib (the `plots` extra) is imported on first use: it costs half a second.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from .extras import require
from .fileio import atomic_write_bytes


def new_figure(**kwargs: Any):
    """A matplotlib Figure drawn by the Agg backend; kwargs go to Figure (figsize, dpi, ...).
    Without matplotlib: MissingExtra, naming `pip install "digitlab[plots]"`."""
    canvas = require("plots", "matplotlib.backends.backend_agg").FigureCanvasAgg
    fig = require("plots", "matplotlib.figure").Figure(**kwargs)
    canvas(fig)
    return fig


def save_png(fig, path: str | Path, dpi: float | None = None) -> Path:
    """Write the figure as a PNG through a temp file and a rename: never a half-written file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi if dpi is not None else "figure")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def png_bytes(image: Any) -> bytes:
    """An image as PNG bytes: a PIL image as it is, a numpy array as grayscale (or RGB/RGBA by its last axis),
    uint8 as it is, floats in [0, 1] rounded to 0-255 (clipped)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str | Path, image: Any) -> Path:
    """Write `png_bytes(image)` through a temp file and a rename; returns the path."""
    atomic_write_bytes(path, png_bytes(image))
    return Path(path)
