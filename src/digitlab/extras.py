"""The optional parts of digitlab, and the one message a missing one gives.

`pip install digitlab` installs what training, evaluation and prediction need. Serving, ONNX, plots and
TensorBoard come with extras (`pip install "digitlab[serve]"`, ...). Code that needs one imports it through
`require(extra, module)`: when the module is not installed, the user reads one line naming the pip command,
and the CLI exits 1. Plots are a nicety: without matplotlib, `train` and `evaluate` skip them and say so
once (`plots_available`, `plots_skipped`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from .errors import DigitlabError, first_line

# extra -> what it is for, as the message says it
EXTRAS = {
    "serve": "digitlab serve",
    "onnx": "ONNX support",
    "plots": "drawing plots",
    "tensorboard": "--tensorboard",
}


class MissingExtra(DigitlabError):
    """An optional dependency is not installed; the message names the pip command that installs it."""

    exit_code = 1


def pip_line(extra: str) -> str:
    return f'pip install "digitlab[{extra}]"'


def require(extra: str, module: str) -> ModuleType:
    """Import and return `module`; raise MissingExtra (one line, with the pip command) when it, or a package
    it imports, is not installed. `module` may be a digitlab module that imports the extra's packages."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or module).split(".")[0]
        if missing == "digitlab":  # a bug in digitlab, not a missing extra
            raise
        what = EXTRAS.get(extra, extra)
        if isinstance(exc, ModuleNotFoundError):
            raise MissingExtra(f"{what} needs {missing}, which is not installed: {pip_line(extra)}") from None
        raise MissingExtra(
            f"{what} needs {missing}, which cannot be imported ({first_line(exc, 120)}): "
            f'pip install --upgrade "digitlab[{extra}]"'
        ) from None


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def plots_available() -> bool:
    return installed("matplotlib")


def plots_skipped(names: list[str] | tuple[str, ...]) -> None:
    """Say, in one line on stderr, that these PNG files were not drawn and which extra draws them."""
    print(
        f"digitlab: note: matplotlib is not installed: skipped {', '.join(names)} ({pip_line('plots')} draws them)",
        file=sys.stderr,
        flush=True,
    )
