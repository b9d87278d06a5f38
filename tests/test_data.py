"""The data layer: IDX files, every corruption, finding, downloading and verifying data, Dataset, BatchLoader."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import struct
import tempfile
import threading
import tracemalloc
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from digitlab import data, datafiles, idx
from digitlab.idx import DataError

from .conftest import REQUIRE_REALDATA, synthetic_digits, write_dataset

STEMS = list(datafiles.SPLIT_FILES.values())
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def assert_one_line_error(exc: pytest.ExceptionInfo, file_name: str, defect: str) -> None:
    message = str(exc.value)
    assert file_name in message, message
    assert defect in message, message
    assert "\n" not in message


# ----------------------------------------------------------------------------------------------------------
# IDX round trip
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_round_trip_images_and_labels(tmp_path, suffix):
    images, labels = synthetic_digits(20, seed=3)
    idx.write_idx(tmp_path / f"images{suffix}", images)
    idx.write_idx(tmp_path / f"labels{suffix}", labels)
    assert (tmp_path / f"images{suffix}").read_bytes()[:2] == (b"\x1f\x8b" if suffix else b"\x00\x00")
    np.testing.assert_array_equal(idx.read_images(tmp_path / f"images{suffix}"), images)
    np.testing.assert_array_equal(idx.read_labels(tmp_path / f"labels{suffix}"), labels)


def test_header_is_the_idx_format(tmp_path):
    images = np.zeros((3, 28, 27), dtype=np.uint8)
    raw = idx.encode_idx(images)
    assert struct.unpack(">IIII", raw[:16]) == (2051, 3, 28, 27)
    assert len(raw) == 16 + 3 * 28 * 27
    assert struct.unpack(">II", idx.encode_idx(np.zeros(5, dtype=np.uint8))[:8]) == (2049, 5)


def test_writer_refuses_non_uint8(tmp_path):
    with pytest.raises(DataError, match="uint8 only"):
        idx.write_idx(tmp_path / "x.gz", np.zeros((2, 28, 28), dtype=np.float32))
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=40, deadline=None)
@given(images=arrays(np.uint8, st.tuples(st.integers(0, 12), st.integers(1, 9), st.integers(1, 9))), gz=st.booleans())
def test_round_trip_property_images(images, gz):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("x.idx.gz" if gz else "x.idx")
        idx.write_idx(path, images)
        back = idx.read_images(path)
    assert back.dtype == np.uint8 and back.shape == images.shape
    np.testing.assert_array_equal(back, images)


@settings(max_examples=40, deadline=None)
@given(labels=arrays(np.uint8, st.integers(0, 40), elements=st.integers(0, 9)))
def test_round_trip_property_labels(labels):
    back = idx.parse_idx(idx.encode_idx(labels), "labels", idx.LABELS_MAGIC)
    np.testing.assert_array_equal(back, labels)
    assert back.shape == labels.shape


def test_written_files_are_readable_by_others_as_umask_allows(tmp_path):
    """mkstemp creates 0600 files; atomic writes give the mode open() would."""
    idx.write_idx(tmp_path / "labels.gz", np.zeros(3, dtype=np.uint8))
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "labels.gz").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["labels.gz"]  # no temp file left


# ----------------------------------------------------------------------------------------------------------
# Corruption: every defect is a one-line DataError naming the file and the defect
# ----------------------------------------------------------------------------------------------------------


def raw_idx(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


def put_raw(path: Path, content: bytes) -> None:
    path.write_bytes(gzip.compress(content, mtime=0))


def bad_magic(d: Path) -> str:
    p = d / "train-images-idx3-ubyte.gz"
    put_raw(p, b"\x12\x34\x56\x78" + raw_idx(p)[4:])
    return "bad magic number 305419896"


def images_in_labels_file(d: Path) -> str:
    idx.write_idx(d / "train-labels-idx1-ubyte.gz", synthetic_digits(512, 0)[0])
    return "bad magic number 2051 (expected 2049)"


def wrong_ndim(d: Path) -> str:
    idx.write_idx(d / "t10k-images-idx3-ubyte.gz", synthetic_digits(128, 1)[0].reshape(128, 784))
    return "bad magic number 2050 (expected 2051): 2 dimensions, expected 3"


def zero_sized_images(d: Path) -> str:
    idx.write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((128, 0, 28), dtype=np.uint8))
    return "bad dimensions [128, 0, 28]"


def truncated(d: Path) -> str:
    p = d / "train-images-idx3-ubyte.gz"
    put_raw(p, raw_idx(p)[:1000])
    return f"truncated: {16 + 512 * 784} bytes expected, 1000 found"


def truncated_header(d: Path) -> str:
    p = d / "train-images-idx3-ubyte.gz"
    put_raw(p, raw_idx(p)[:10])
    return "truncated: header needs 16 bytes, 10 found"


def absurd_header(d: Path) -> str:
    p = d / "train-images-idx3-ubyte.gz"
    put_raw(p, struct.pack(">IIII", 2051, 2**32 - 1, 2**32 - 1, 2**32 - 1) + b"\x00" * 64)
    return f"truncated: {16 + (2**32 - 1) ** 3} bytes expected, 80 found"


def trailing_bytes(d: Path) -> str:
    p = d / "t10k-labels-idx1-ubyte.gz"
    put_raw(p, raw_idx(p) + b"\x00\x01")
    return "trailing bytes: 136 bytes expected, 138 found"


def label_out_of_range(d: Path) -> str:
    labels = synthetic_digits(512, 0)[1].copy()
    labels[7] = 10
    idx.write_idx(d / "train-labels-idx1-ubyte.gz", labels)
    return "label 10 at index 7 is out of range 0-9"


def count_mismatch(d: Path) -> str:
    idx.write_idx(d / "t10k-labels-idx1-ubyte.gz", synthetic_digits(100, 1)[1])
    return "100 labels but t10k-images-idx3-ubyte.gz has 128 images"


def corrupt_gzip(d: Path) -> str:
    p = d / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:300])  # a gzip stream cut short
    return "corrupt gzip data"


def empty_file(d: Path) -> str:
    (d / "train-labels-idx1-ubyte.gz").write_bytes(b"")
    return "empty file"


CORRUPTIONS: dict[str, Callable[[Path], str]] = {
    f.__name__: f
    for f in (
        bad_magic,
        images_in_labels_file,
        wrong_ndim,
        zero_sized_images,
        truncated,
        truncated_header,
        absurd_header,
        trailing_bytes,
        label_out_of_range,
        count_mismatch,
        corrupt_gzip,
        empty_file,
    )
}
FILE_OF = {
    "bad_magic": "train-images-idx3-ubyte.gz",
    "images_in_labels_file": "train-labels-idx1-ubyte.gz",
    "wrong_ndim": "t10k-images-idx3-ubyte.gz",
    "zero_sized_images": "t10k-images-idx3-ubyte.gz",
    "truncated": "train-images-idx3-ubyte.gz",
    "truncated_header": "train-images-idx3-ubyte.gz",
    "absurd_header": "train-images-idx3-ubyte.gz",
    "trailing_bytes": "t10k-labels-idx1-ubyte.gz",
    "label_out_of_range": "train-labels-idx1-ubyte.gz",
    "count_mismatch": "t10k-labels-idx1-ubyte.gz",
    "corrupt_gzip": "train-images-idx3-ubyte.gz",
    "empty_file": "train-labels-idx1-ubyte.gz",
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_file_is_a_one_line_error(tmp_path, case):
    d = write_dataset(tmp_path / "bad")
    defect = CORRUPTIONS[case](d)
    with pytest.raises(DataError) as exc:
        data.load(d, download=False)
    assert_one_line_error(exc, FILE_OF[case], defect)


def test_file_read_errors(tmp_path):
    with pytest.raises(DataError) as exc:
        idx.read_images(tmp_path / "train-images-idx3-ubyte.gz")
    assert_one_line_error(exc, "train-images-idx3-ubyte.gz", "file not found")
    (tmp_path / "train-labels-idx1-ubyte.gz").mkdir()
    with pytest.raises(DataError) as exc:
        idx.read_labels(tmp_path / "train-labels-idx1-ubyte.gz")
    assert_one_line_error(exc, "train-labels-idx1-ubyte.gz", "is a directory")


def test_missing_file_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("DIGITLAB_DATA", raising=False)
    d = write_dataset(tmp_path / "partial")
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as exc:
        data.load(d, download=False)
    assert_one_line_error(exc, str(d), "no t10k-labels-idx1-ubyte")
    assert str(exc.value).startswith("MNIST not found: looked in ")


def test_directory_in_place_of_a_file_does_not_count(tmp_path, monkeypatch):
    monkeypatch.delenv("DIGITLAB_DATA", raising=False)
    d = write_dataset(tmp_path / "dirs")
    (d / "train-images-idx3-ubyte.gz").unlink()
    (d / "train-images-idx3-ubyte.gz").mkdir()
    with pytest.raises(DataError) as exc:
        data.load(d, download=False)
    assert_one_line_error(exc, str(d), "no train-images-idx3-ubyte")


# ----------------------------------------------------------------------------------------------------------
# Issue 11: gzip bombs (6), images of the wrong size (7), symbolic link loops (8)
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def gzip_bomb(claimed_images: int = 10, zeros: int = 200 << 20) -> bytes:
    """A valid IDX header claiming `claimed_images` 28x28 images, then `zeros` zero bytes, gzipped a megabyte at a
    time (never 200 MB in memory): about 200 kB that expand to 200 MB."""
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    parts = [packer.compress(struct.pack(">IIII", idx.IMAGES_MAGIC, claimed_images, 28, 28))]
    block = bytes(1 << 20)
    parts.extend(packer.compress(block) for _ in range(zeros >> 20))
    parts.append(packer.flush())
    return b"".join(parts)


def peak_traced_bytes(action: Callable[[], object]) -> int:
    """The peak of Python's allocations (all threads, bytes objects included) while `action` runs."""
    tracemalloc.start()
    try:
        with contextlib.suppress(DataError):
            action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_gzip_bomb_is_refused_after_the_size_its_header_gives(tmp_path):
    """Issue 11.6: a 200 kB gzip expanding to 200 MB was decompressed whole before the size check."""
    bomb = gzip_bomb()
    assert len(bomb) < 1_000_000
    d = write_dataset(tmp_path / "bomb")
    (d / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    with pytest.raises(DataError) as exc:
        data.load(d, download=False)
    assert_one_line_error(exc, "train-images-idx3-ubyte.gz", f"trailing bytes: {16 + 10 * 784} bytes expected")
    data._CACHE.clear()
    peak = peak_traced_bytes(lambda: data.load(d, download=False))
    assert peak < 20 << 20, f"{peak / 2**20:.0f} MB allocated reading a 200 MB gzip bomb"


def test_gzip_with_a_few_trailing_bytes_is_still_reported_exactly():
    raw = idx.encode_idx(np.zeros((2, 28, 28), np.uint8)) + b"\x00" * 3
    with pytest.raises(DataError, match=f"trailing bytes: {16 + 2 * 784} bytes expected, {19 + 2 * 784} found"):
        idx.parse_idx(idx.gunzip(gzip.compress(raw), "x.gz"), "x.gz")


def test_gzip_bomb_behind_an_absurd_header_stops_at_the_ceiling(tmp_path, monkeypatch):
    """A header that claims more than MAX_IDX_BYTES cannot stretch the cap: the stream stops at the ceiling."""
    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 8 << 20)
    bomb = gzip_bomb(claimed_images=2**31)
    peak = peak_traced_bytes(lambda: idx.gunzip(bomb, "big.gz"))
    with pytest.raises(DataError, match=r"^big.gz: header claims \d+ bytes, more than digitlab reads"):
        idx.gunzip(bomb, "big.gz")
    assert peak < 30 << 20, peak


def test_truncated_gzip_stream_is_corrupt_gzip():
    packed = gzip.compress(idx.encode_idx(np.arange(5 * 784, dtype=np.uint32).astype(np.uint8).reshape(5, 28, 28)))
    with pytest.raises(DataError, match="^x.gz: corrupt gzip data"):
        idx.gunzip(packed[:-20], "x.gz")


@pytest.mark.parametrize("shape", [(1, 784), (14, 56), (32, 32)])
def test_images_of_a_size_the_models_cannot_take_are_refused(tmp_path, shape):
    """Issue 11.7: 1x784 or 14x56 "MNIST" images were loaded, the MLP trained on them, the CNN crashed."""
    d = write_dataset(tmp_path / "odd")
    for stem, n in (("train-images-idx3-ubyte", 512), ("t10k-images-idx3-ubyte", 128)):
        images = np.zeros((n, *shape), dtype=np.uint8)
        idx.write_idx(d / f"{stem}.gz", images)
    with pytest.raises(DataError) as exc:
        data.load(d, download=False)
    assert_one_line_error(
        exc, "train-images-idx3-ubyte.gz", f"images are {shape[0]}x{shape[1]} pixels; MNIST images are 28x28"
    )


def test_only_the_test_images_of_the_wrong_size(tmp_path):
    d = write_dataset(tmp_path / "odd")
    idx.write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((128, 1, 784), dtype=np.uint8))
    with pytest.raises(DataError) as exc:
        data.load(d, download=False)
    assert_one_line_error(exc, "t10k-images-idx3-ubyte.gz", "images are 1x784 pixels")


def test_symlink_loop_in_place_of_a_file_is_named_and_nothing_is_downloaded(tmp_path, monkeypatch):
    """Issue 11.8: a link loop was taken for a missing file, and the files were downloaded."""
    monkeypatch.delenv("DIGITLAB_DATA", raising=False)
    monkeypatch.setattr(datafiles, "download_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    d = write_dataset(tmp_path / "looped")
    link = d / "train-images-idx3-ubyte.gz"
    link.unlink()
    link.symlink_to(link.name)
    with pytest.raises(DataError) as exc:
        data.load(d)
    assert_one_line_error(exc, str(link), "symbolic link loop")


def test_symlink_loop_as_the_data_dir_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("DIGITLAB_DATA", raising=False)
    monkeypatch.setattr(datafiles, "download_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    with pytest.raises(DataError) as exc:
        data.load(loop)
    assert str(exc.value) == f"{loop}: symbolic link loop (the link leads back to itself)"


# ----------------------------------------------------------------------------------------------------------
# Finding the data
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture()
def three_places(tmp_path, monkeypatch) -> dict[str, Path]:
    """Distinguishable datasets (by training size) in --data, $DIGITLAB_DATA and the XDG cache."""
    cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    places = {
        "flag": write_dataset(tmp_path / "flag", n_train=101, n_test=11),
        "env": write_dataset(tmp_path / "env", n_train=102, n_test=12),
        "cache": write_dataset(cache / "digitlab" / "mnist", n_train=103, n_test=13),
    }
    monkeypatch.setenv("DIGITLAB_DATA", str(places["env"]))
    return places


def test_lookup_order_flag_then_env_then_cache(three_places, monkeypatch, tmp_path):
    assert len(data.load(three_places["flag"], download=False).train_labels) == 101
    assert len(data.load(None, download=False).train_labels) == 102
    monkeypatch.delenv("DIGITLAB_DATA")
    assert len(data.load(None, download=False).train_labels) == 103
    # A --data dir without the files does not hide the places after it.
    assert len(data.load(tmp_path / "empty", download=False).train_labels) == 103


def test_candidate_dirs_order(three_places):
    dirs = datafiles.candidate_dirs(three_places["flag"], datafiles.get_spec("mnist"))
    assert dirs == [three_places["flag"], three_places["env"], three_places["cache"]]


def test_cache_dir_honours_xdg_and_defaults_to_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert datafiles.cache_dir() == tmp_path / "x" / "digitlab" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datafiles.cache_dir() == tmp_path / "home" / ".cache" / "digitlab" / "mnist"
    assert datafiles.cache_dir("fashion-mnist").name == "fashion-mnist"


def test_torchvision_layout_with_raw_files(tmp_path, monkeypatch):
    monkeypatch.delenv("DIGITLAB_DATA", raising=False)
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train_x, train_y = synthetic_digits(64, 5)
    test_x, test_y = synthetic_digits(32, 6)
    for stem, array in zip(STEMS, (train_x, train_y, test_x, test_y)):
        idx.write_idx(raw / stem, array)  # no .gz: raw IDX, as torchvision leaves them
    mnist = data.load(tmp_path / "tv", download=False)
    assert mnist.files["train_images"] == str(raw / "train-images-idx3-ubyte")
    torch.testing.assert_close(mnist.train_images, torch.from_numpy(train_x))
    torch.testing.assert_close(mnist.test_labels, torch.from_numpy(test_y.astype(np.int64)))


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'kmnist' \\(known: mnist, fashion-mnist\\)"):
        data.load(None, "kmnist")


def test_a_dir_holding_another_dataset_is_skipped(tmp_path, monkeypatch):
    """Every MNIST-format dataset has the same file names: the labels' MD5 tells them apart."""
    monkeypatch.delenv("DIGITLAB_DATA", raising=False)
    other = write_dataset(tmp_path / "other")
    labels_md5 = datafiles.md5_of(other / "train-labels-idx1-ubyte.gz")
    monkeypatch.setitem(
        datafiles.DATASETS,
        "other",
        datafiles.DatasetSpec(
            name="other", title="Other", class_names=tuple("0123456789"), md5={"train-labels-idx1-ubyte": labels_md5}
        ),
    )
    with pytest.raises(DataError) as exc:
        data.load(other, "mnist", download=False)
    assert f"{other} (holds Other)" in str(exc.value)
    assert len(data.load(other, "other", download=False).train_labels) == 512


def test_load_is_cached_and_reloads_changed_files(tiny_mnist_dir):
    first = data.load(tiny_mnist_dir, download=False)
    assert data.load(tiny_mnist_dir, download=False) is first
    write_dataset(tiny_mnist_dir, n_train=200)
    assert len(data.load(tiny_mnist_dir, download=False).train_labels) == 200


# ----------------------------------------------------------------------------------------------------------
# Download from a local HTTP server, and verification
# ----------------------------------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def serve_dir(directory: Path) -> Iterator[str]:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture()
def mirror(tmp_path) -> Iterator[tuple[str, dict[str, str]]]:
    """A local mirror serving synthetic .gz files; yields its URL and the MD5s of the decompressed files."""
    served = write_dataset(tmp_path / "served", n_train=64, n_test=16)
    md5 = {stem: hashlib.md5(gzip.decompress((served / f"{stem}.gz").read_bytes())).hexdigest() for stem in STEMS}
    with serve_dir(served) as url:
        yield url, md5


def synthetic_spec(mirrors: tuple[str, ...], md5: dict[str, str]) -> datafiles.DatasetSpec:
    return datafiles.DatasetSpec(
        name="synthetic", title="Synthetic", class_names=tuple(str(d) for d in range(10)), md5=md5, mirrors=mirrors
    )


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture()
def no_backoff(monkeypatch):
    monkeypatch.setattr(datafiles.time, "sleep", lambda seconds: None)


def test_download_writes_verified_files(mirror, tmp_path):
    url, md5 = mirror
    spec = synthetic_spec((url,), md5)
    target = tmp_path / "target"
    datafiles.download_dataset(spec, target, retries=1, show_progress=False)
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{stem}.gz" for stem in STEMS)
    assert len(datafiles.verify(target, spec)) == 4
    assert len(data.load(target, spec, download=False).train_labels) == 64


def test_locate_downloads_when_missing(mirror, tmp_path, monkeypatch):
    monkeypatch.delenv("DIGITLAB_DATA", raising=False)
    url, md5 = mirror
    spec = synthetic_spec((url,), md5)
    found = datafiles.locate(None, spec)  # with the progress bar; into the (isolated) user cache
    assert Path(found["train_images"]).parent == datafiles.cache_dir("synthetic")
    assert len(datafiles.verify(datafiles.cache_dir("synthetic"), spec)) == 4


def test_download_md5_mismatch_leaves_no_file(mirror, tmp_path, no_backoff):
    url, md5 = mirror
    spec = synthetic_spec((url,), {**md5, "train-images-idx3-ubyte": "0" * 32})
    target = tmp_path / "target"
    with pytest.raises(DataError) as exc:
        datafiles.download_dataset(spec, target, retries=2, show_progress=False)
    assert_one_line_error(
        exc, "train-images-idx3-ubyte.gz", f"MD5 mismatch: {md5['train-images-idx3-ubyte']} found, {'0' * 32} expected"
    )
    assert not target.exists() or list(target.iterdir()) == []


def test_download_falls_back_to_the_next_mirror(mirror, tmp_path, no_backoff):
    url, md5 = mirror
    spec = synthetic_spec((url + "no-such-dir/", url), md5)  # the first mirror answers 404
    datafiles.download_dataset(spec, tmp_path / "target", retries=1, show_progress=False)
    assert len(datafiles.verify(tmp_path / "target", spec)) == 4


def test_download_skips_files_already_verified(mirror, tmp_path, no_backoff):
    url, md5 = mirror
    target = tmp_path / "target"
    datafiles.download_dataset(synthetic_spec((url,), md5), target, retries=1, show_progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    # With the mirror gone, a second download must not need it.
    datafiles.download_dataset(synthetic_spec((closed_port_url(),), md5), target, retries=1, show_progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before


def test_offline_message_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch, no_backoff):
    monkeypatch.delenv("DIGITLAB_DATA", raising=False)
    spec = synthetic_spec((closed_port_url(),), {stem: "0" * 32 for stem in STEMS})
    with pytest.raises(DataError) as exc:
        datafiles.locate(tmp_path / "nothing-here", spec)
    message = str(exc.value)
    assert message.startswith(f"Synthetic not found: looked in {tmp_path / 'nothing-here'}, ")
    assert str(datafiles.cache_dir("synthetic")) in message
    assert "download failed (" in message and "offline?" in message
    assert "put the four files (train-images-idx3-ubyte.gz, " in message and "--data DIR" in message
    assert "\n" not in message
    assert not (tmp_path / "nothing-here").exists()


def test_no_download_when_told_not_to(tmp_path, monkeypatch):
    monkeypatch.delenv("DIGITLAB_DATA", raising=False)
    with pytest.raises(DataError, match="^MNIST not found: looked in .*; put the four files"):
        datafiles.locate(tmp_path / "nothing-here", "mnist", download=False)


def test_verify_ok_and_one_byte_changed(tiny_mnist_dir, tmp_path):
    md5 = {stem: datafiles.md5_of(tiny_mnist_dir / f"{stem}.gz") for stem in STEMS}
    spec = synthetic_spec((), md5)
    assert sorted(Path(p).name for p in datafiles.verify(tiny_mnist_dir, spec)) == sorted(f"{s}.gz" for s in STEMS)
    copy = Path(shutil.copytree(tiny_mnist_dir, tmp_path / "copy"))
    target = copy / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(raw_idx(target))
    content[20] ^= 1  # one byte of one label
    put_raw(target, bytes(content))
    with pytest.raises(DataError) as exc:
        datafiles.verify(copy, spec)
    assert_one_line_error(
        exc,
        str(target),
        f"MD5 mismatch: {hashlib.md5(content).hexdigest()} found, {md5['t10k-labels-idx1-ubyte']} expected",
    )


def test_verify_gzip_byte_changed_and_missing_file(tiny_mnist_dir, tmp_path):
    spec = synthetic_spec((), {stem: datafiles.md5_of(tiny_mnist_dir / f"{stem}.gz") for stem in STEMS})
    copy = Path(shutil.copytree(tiny_mnist_dir, tmp_path / "copy"))
    target = copy / "train-images-idx3-ubyte.gz"
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a byte of the compressed stream: the gzip CRC or the MD5 catches it
    target.write_bytes(bytes(blob))
    with pytest.raises(DataError) as exc:
        datafiles.verify(copy, spec)
    assert "train-images-idx3-ubyte.gz: " in str(exc.value)
    assert "corrupt gzip data" in str(exc.value) or "MD5 mismatch" in str(exc.value)
    target.unlink()
    with pytest.raises(DataError) as exc:
        datafiles.verify(copy, spec)
    assert_one_line_error(exc, str(target), "file not found")


# ----------------------------------------------------------------------------------------------------------
# The Dataset view, BatchLoader, split_train_val
# ----------------------------------------------------------------------------------------------------------


def test_dataset_semantics(tiny_mnist_dir):
    mnist = data.load(tiny_mnist_dir, download=False)
    train, test = data.datasets(mnist)
    assert (len(train), len(test)) == (512, 128)
    item = train[3]
    assert isinstance(item, tuple) and len(item) == 2
    image, label = item
    assert image.shape == torch.Size([1, 28, 28]) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.max()) == 1.0
    assert isinstance(label, int) and label == int(mnist.train_labels[3])
    torch.testing.assert_close(image[0] * 255, mnist.train_images[3].float())


def test_loaded_tensors(tiny_mnist_dir):
    mnist = data.load(tiny_mnist_dir, download=False)
    assert mnist.train_images.shape == (512, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.train_labels.dtype == torch.int64 and mnist.test_images.shape == (128, 28, 28)
    assert data.class_counts(mnist.train_labels) == np.bincount(synthetic_digits(512, 0)[1], minlength=10).tolist()
    assert mnist.md5["train-labels-idx1-ubyte.gz"] == datafiles.md5_of(tiny_mnist_dir / "train-labels-idx1-ubyte.gz")


def test_pixel_stats_match_a_direct_computation(tiny_mnist_dir):
    images = data.load(tiny_mnist_dir, download=False).train_images
    mean, std = data.pixel_stats(images)
    x = images.double() / 255
    assert mean == pytest.approx(float(x.mean()), abs=1e-12)
    assert std == pytest.approx(float(x.std()), abs=1e-12)


def make_loader(n: int = 100, **kwargs) -> data.BatchLoader:
    images, labels = synthetic_digits(n, seed=9)
    return data.BatchLoader(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), **kwargs)


def test_batch_shapes_and_last_partial_batch():
    loader = make_loader(100, batch_size=32, shuffle=False, normalize=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [tuple(x.shape) for x, _ in batches] == [(32, 1, 28, 28)] * 3 + [(4, 1, 28, 28)]
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    assert batches[0][0].dtype == torch.float32 and float(batches[0][0].max()) == 1.0
    assert len(make_loader(100, batch_size=32, drop_last=True)) == 3
    assert len(make_loader(100)) == 2  # default batch 64
    assert make_loader(100).batch_size == 64


def test_every_sample_once_per_epoch():
    loader = make_loader(100, batch_size=32, seed=4)
    labels = torch.cat([y for _, y in loader])
    assert sorted(labels.tolist()) == sorted(make_loader(100).y.tolist())


def test_seeded_shuffle_reproducible_and_differs_per_epoch():
    a, b = make_loader(seed=7), make_loader(seed=7)
    assert torch.equal(a.order(), b.order())
    first = a.order()
    a.set_epoch(1)
    assert not torch.equal(first, a.order())
    b.set_epoch(1)
    assert torch.equal(a.order(), b.order())
    assert not torch.equal(make_loader(seed=8).order(), first)
    assert torch.equal(make_loader(shuffle=False).order(), torch.arange(100))


def test_normalisation():
    plain = next(iter(make_loader(shuffle=False, normalize=False)))[0]
    normed = next(iter(make_loader(shuffle=False)))[0]
    torch.testing.assert_close(normed, (plain - datafiles.MNIST_MEAN) / datafiles.MNIST_STD)
    custom = next(iter(make_loader(shuffle=False, mean=0.5, std=0.25)))[0]
    torch.testing.assert_close(custom, (plain - 0.5) / 0.25)


@pytest.mark.parametrize("n", [128, 100, 97])
def test_two_ranks_partition_each_global_batch(n):
    whole = list(make_loader(n, batch_size=32, seed=3))
    ranks = [list(make_loader(n, batch_size=32, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, ranks[0], ranks[1]):
        torch.testing.assert_close(torch.cat([x0, x1]), x)
        assert torch.equal(torch.cat([y0, y1]), y)
        assert abs(len(y0) - len(y1)) <= 1


def test_loader_rejects_bad_batch_sizes():
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        make_loader(batch_size=0)
    with pytest.raises(ValueError, match="not divisible by 3"):
        make_loader(batch_size=64, world_size=3)


def test_split_train_val():
    images, labels = synthetic_digits(100, seed=1)
    x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    (tx, ty), (vx, vy) = data.split_train_val(x, y, 20, seed=0)
    assert (len(tx), len(ty), len(vx), len(vy)) == (80, 80, 20, 20)
    # Disjoint and complete: match rows back to the original by content.
    rows = {bytes(img.numpy().tobytes()): i for i, img in enumerate(x)}
    train_ids = {rows[bytes(img.numpy().tobytes())] for img in tx}
    val_ids = {rows[bytes(img.numpy().tobytes())] for img in vx}
    assert not train_ids & val_ids and len(train_ids | val_ids) == 100
    (tx2, _), (vx2, _) = data.split_train_val(x, y, 20, seed=0)
    assert torch.equal(vx, vx2)
    assert not torch.equal(data.split_train_val(x, y, 20, seed=1)[1][0], vx)
    with pytest.raises(ValueError, match="val size 100"):
        data.split_train_val(x, y, 100, seed=0)


# ----------------------------------------------------------------------------------------------------------
# The real datasets
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_mnist_sizes_counts_and_statistics(mnist):
    assert len(mnist.train_labels) == 60000 and len(mnist.test_labels) == 10000
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert data.class_counts(mnist.train_labels) == MNIST_TRAIN_COUNTS
    assert data.class_counts(mnist.test_labels) == MNIST_TEST_COUNTS
    mean, std = data.pixel_stats(mnist.train_images)
    assert (round(mean, 4), round(std, 4)) == (0.1307, 0.3081)


@pytest.mark.realdata
def test_real_mnist_verifies(mnist_dir):
    assert sorted(datafiles.verify(mnist_dir).values()) == sorted(datafiles.DATASETS["mnist"].md5.values())


@pytest.mark.realdata
def test_real_mnist_dataset_semantics(mnist):
    train, test = data.datasets(mnist)
    assert (len(train), len(test)) == (60000, 10000)
    image, label = train[0]
    assert image.shape == torch.Size([1, 28, 28]) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert label == 5


@pytest.mark.realdata
def test_real_mnist_loads_from_scratch(mnist_dir):
    files = datafiles.locate(mnist_dir, download=False)
    fresh = data.load_files(files, datafiles.get_spec("mnist"))  # bypasses the in-memory cache
    assert len(fresh.train_labels) + len(fresh.test_labels) == 70000


@pytest.mark.realdata
def test_fashion_mnist_from_the_debian_package():
    if not (FASHION_DIR / "train-labels-idx1-ubyte.gz").is_file():
        if REQUIRE_REALDATA:
            pytest.fail(f"{FASHION_DIR} missing (DIGITLAB_REQUIRE_REALDATA=1; apt-get install dataset-fashion-mnist)")
        pytest.skip(f"{FASHION_DIR} missing (apt-get install dataset-fashion-mnist)")
    fashion = data.load(None, "fashion-mnist", download=False)
    assert Path(fashion.files["train_labels"]).parent == FASHION_DIR
    assert len(fashion.train_labels) == 60000 and len(fashion.test_labels) == 10000
    assert data.class_counts(fashion.train_labels) == [6000] * 10
    assert data.class_counts(fashion.test_labels) == [1000] * 10
    assert fashion.class_names[9] == "Ankle boot"
    assert len(datafiles.verify(FASHION_DIR, "fashion-mnist")) == 4


@pytest.mark.realdata
def test_fashion_mnist_is_not_taken_from_an_mnist_dir(mnist_dir, monkeypatch):
    """$DIGITLAB_DATA usually holds MNIST; asking for Fashion-MNIST must not load MNIST under its name."""
    if not (FASHION_DIR / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"{FASHION_DIR} missing")
    monkeypatch.setenv("DIGITLAB_DATA", str(mnist_dir))
    found = datafiles.locate(mnist_dir, "fashion-mnist", download=False)
    assert Path(found["train_labels"]).parent == FASHION_DIR
