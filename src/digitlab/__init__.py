"""digitlab: build, train, explain and serve neural networks that read handwritten digits.

The public API is imported lazily, so `import digitlab` stays cheap and has no side effects.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "train": ("digitlab.training", "train"),
    "TrainConfig": ("digitlab.training", "TrainConfig"),
    "Run": ("digitlab.training", "Run"),
    "evaluate": ("digitlab.evaluation", "evaluate"),
    "Report": ("digitlab.evaluation", "Report"),
    "load_model": ("digitlab.checkpoint", "load_model"),
    "build_model": ("digitlab.models", "build_model"),
    "Predictor": ("digitlab.prediction", "Predictor"),
    "preprocess": ("digitlab.preprocessing", "preprocess"),
    "load_data": ("digitlab.data", "load"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'digitlab' has no attribute {name!r}")
