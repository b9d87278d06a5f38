"""The IDX file format MNIST is stored in: read, validate, write. numpy only (no torch), so that
`predict --model x.onnx` and other torch-free paths can read IDX files, and so the data files can be read
while torch is still importing.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DigitlabError
from .fileio import atomic_write_bytes

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


class DataError(DigitlabError):
    """A data problem with a one-line message that names the file and the defect."""


# ----------------------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------------------


# The most decompressed bytes digitlab reads from one gzipped IDX file whatever its header claims: the
# largest dataset in MNIST's format (EMNIST byclass, 698k images) is 0.55 GB; a header claiming more could
# otherwise make a small gzip bomb fill memory before the file is found to be short.
MAX_IDX_BYTES = 1 << 30
# Decompressed bytes read past the size the header gives, so that a few stray bytes are still reported
# exactly ("trailing bytes: N expected, M found"); a stream longer than that is refused unread.
TRAILING_SLACK = 1 << 16
GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an IDX file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return gunzip(raw, path.name)


def idx_size(header: bytes) -> int | None:
    """The total size (header + data) an unsigned-byte IDX header announces, or None when `header` does not
    start with a complete one (too short, bad magic): then parse_idx reports the defect from the first bytes."""
    if len(header) < 4 or header[:3] != b"\x00\x00\x08" or header[3] == 0:
        return None
    ndim = header[3]
    if len(header) < 4 + 4 * ndim:
        return None
    return 4 + 4 * ndim + math.prod(struct.unpack(f">{ndim}I", header[4 : 4 + 4 * ndim]))


def _inflate(raw: bytes, limit: int) -> tuple[bytes, bool]:
    """At most `limit` decompressed bytes of a gzip stream, and whether the stream ended within them.

    zlib stops writing at `limit`, so a gzip bomb costs `limit` bytes of memory, not its expanded size.
    """
    inflater = zlib.decompressobj(31)  # wbits=31: the gzip container, in one C call (2x faster than gzip.open)
    out = inflater.decompress(raw, limit)
    return out, inflater.eof


def is_gzip(raw: bytes) -> bool:
    """Whether the bytes start as gzip data (1f 8b); IDX and image formats never do."""
    return raw[:2] == GZIP_MAGIC


def gunzip(raw: bytes, name: str) -> bytes:
    """The bytes decompressed when they are gzip data, else as they are; corrupt gzip is a DataError.

    The IDX header is decompressed first and the stream is then decompressed only up to the size the header
    announces (plus TRAILING_SLACK): a gzip that expands to more than its header says is refused unread.
    """
    if not is_gzip(raw):
        return raw
    try:
        head, ended = _inflate(raw, 4 + 4 * 255)  # the longest IDX header: 255 dimensions
        expected = idx_size(head)
        if expected is None:  # not an IDX header: its first bytes are all parse_idx needs to name the defect
            if not ended and len(head) < 4 + 4 * 255:
                raise DataError(f"{name}: corrupt gzip data (incomplete or truncated stream)")
            return head
        limit = min(expected, MAX_IDX_BYTES) + TRAILING_SLACK
        data, ended = _inflate(raw, limit + 1)
    except zlib.error as exc:
        raise DataError(f"{name}: corrupt gzip data ({exc})") from None
    if len(data) > limit:
        if expected > MAX_IDX_BYTES:
            raise DataError(
                f"{name}: header claims {expected} bytes, more than digitlab reads from one file "
                f"({MAX_IDX_BYTES} bytes)"
            )
        raise DataError(
            f"{name}: trailing bytes: {expected} bytes expected, the gzip data expands to more than "
            f"{limit} bytes (refused without decompressing the rest)"
        )
    if not ended:
        raise DataError(f"{name}: corrupt gzip data (incomplete or truncated stream)")
    return data


def parse_idx(data: bytes, name: str = "<bytes>", expect_magic: int | None = None) -> np.ndarray:
    """Parse IDX bytes (unsigned-byte type only) into a read-only uint8 array, validating every field."""
    if not data:
        raise DataError(f"{name}: empty file")
    if len(data) < 4:
        raise DataError(f"{name}: truncated: {len(data)} bytes, not even an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    magic = struct.unpack(">I", data[:4])[0]
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise DataError(f"{name}: bad magic number {magic} (expected {expect_magic or '2051 or 2049'})")
    if expect_magic is not None and magic != expect_magic:
        # A valid unsigned-byte header whose last byte (the number of dimensions) is not the expected one.
        raise DataError(
            f"{name}: bad magic number {magic} (expected {expect_magic}): {ndim} dimensions, "
            f"expected {expect_magic & 0xFF}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated: header needs {header} bytes, {len(data)} found")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)  # Python ints: int64 would wrap for absurd headers
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "trailing bytes"
        raise DataError(f"{name}: {kind}: {expected} bytes expected, {len(data)} found")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: str | Path, expect_magic: int | None = None) -> np.ndarray:
    """Read an IDX file, gzipped or raw."""
    path = Path(path)
    return parse_idx(read_bytes(path), path.name, expect_magic)


def read_images(path: str | Path) -> np.ndarray:
    """Read an IDX image file: (N, H, W) uint8."""
    return read_checked("images", Path(path), 10)[0]


def read_labels(path: str | Path, num_classes: int = 10) -> np.ndarray:
    """Read an IDX label file: (N,) uint8, every label in 0..num_classes-1."""
    return read_checked("labels", Path(path), num_classes)[0]


def encode_idx(array: np.ndarray) -> bytes:
    """IDX bytes for a uint8 array (1 dimension: labels, 3 dimensions: images)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise DataError(f"IDX writer: dtype {array.dtype} not supported (uint8 only)")
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an IDX file; gzipped when the name ends in .gz."""
    path = Path(path)
    data = encode_idx(array)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write_bytes(path, data)


def read_checked(key: str, path: Path, num_classes: int) -> tuple[np.ndarray, str]:
    """One file's array and the MD5 of its decompressed bytes (hashed here, while the bytes are at hand)."""
    raw = read_bytes(path)
    expect = IMAGES_MAGIC if key.endswith("images") else LABELS_MAGIC
    array = parse_idx(raw, path.name, expect)
    if key.endswith("images") and (array.ndim != 3 or 0 in array.shape[1:]):
        raise DataError(f"{path.name}: bad dimensions {list(array.shape)} (expected N x rows x cols)")
    if key.endswith("labels") and array.size and int(array.max()) >= num_classes:
        bad = int(np.argmax(array >= num_classes))
        raise DataError(f"{path.name}: label {int(array[bad])} at index {bad} is out of range 0-{num_classes - 1}")
    return array, hashlib.md5(raw).hexdigest()
