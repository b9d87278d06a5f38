"""Writing files crash-safely: a fsynced temp file beside the target, then a rename, so that readers never
see a half-written file. Standard library only (no numpy, no torch): every module that writes uses it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _new_file_mode() -> int:
    """The mode open() gives a new file (0o666 minus the umask); mkstemp's temp files are 0o600."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


NEW_FILE_MODE = _new_file_mode()  # read once: os.umask is process-wide, so probing it is not thread-safe


def temp_pattern(path: Path) -> str:
    """The glob that matches the temp files `write_temp` makes for `path`."""
    return f".{path.name}.*.tmp"


def write_temp(path: str | Path, data: bytes) -> Path:
    """`data` in a new, fsynced temp file beside `path` (named as `temp_pattern` says), with the mode a new
    file gets; the caller renames it onto `path`. Nothing is left behind when writing fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, NEW_FILE_MODE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["atomic_write_bytes", "write_temp", "temp_pattern", "NEW_FILE_MODE"]
