"""The dataset files: which datasets exist in MNIST's format, where to find them, how to download and verify
them, and reading the four files into numpy arrays.

numpy only, no torch: `digitlab train` starts reading the files (`prefetch`) while torch is still importing,
which takes longer than the read itself.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import DigitlabError
from .fileio import atomic_write_bytes
from .idx import DataError, gunzip, is_gzip, read_bytes, read_checked

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


# ----------------------------------------------------------------------------------------------------------
# Datasets in MNIST's format and where to find them
# ----------------------------------------------------------------------------------------------------------

SPLIT_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset in MNIST's format is called, where it is mirrored and what its files hash to."""

    name: str
    title: str
    class_names: tuple[str, ...]
    md5: dict[str, str]  # file stem -> MD5 of the decompressed file
    mirrors: tuple[str, ...] = ()
    system_dirs: tuple[str, ...] = ()
    mean: float = MNIST_MEAN
    std: float = MNIST_STD
    image_shape: tuple[int, int] = (28, 28)  # rows x cols: what digitlab's models take (the MLP: 784 inputs)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        title="MNIST",
        class_names=tuple(str(d) for d in range(10)),
        md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        # The mirrors torchvision uses, in its order.
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        title="Fashion-MNIST",
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        # Debian's package dataset-fashion-mnist installs the four files here.
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        mean=0.2860,
        std=0.3530,
    ),
}


def get_spec(dataset: str | DatasetSpec) -> DatasetSpec:
    if isinstance(dataset, DatasetSpec):
        return dataset
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DataError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})") from None


def cache_dir(dataset: str = "mnist") -> Path:
    """The per-user cache dir: $XDG_CACHE_HOME/digitlab/<dataset>, by default ~/.cache/digitlab/<dataset>."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "digitlab" / dataset


def find_file(directory: Path, stem: str) -> Path | None:
    """The file for `stem` in a data dir: .gz or raw, flat or in torchvision's MNIST/raw/ layout.

    A symbolic link loop on the way is a DataError naming it: Path.is_file() alone would call the files
    missing, and `locate` would then try to download them.
    """
    for sub in ("", "raw", "MNIST/raw", "FashionMNIST/raw"):
        for suffix in (".gz", ""):
            candidate = directory / sub / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
            if (loop := symlink_loop(candidate)) is not None:
                raise DataError(f"{loop}: symbolic link loop (the link leads back to itself)")
    return None


def symlink_loop(path: Path) -> Path | None:
    """The first component of `path` that is a symbolic link loop (stat fails with ELOOP), or None."""
    try:
        os.stat(path)
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            return None
    for part in reversed(path.parents):  # the shortest prefix that loops is the one to name
        try:
            os.stat(part)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return part
    return path


def find_files(directory: Path) -> dict[str, Path] | None:
    """All four files of a dataset in `directory`, or None when any is missing."""
    found = {key: find_file(directory, stem) for key, stem in SPLIT_FILES.items()}
    if any(path is None for path in found.values()):
        return None
    return found  # type: ignore[return-value]


def candidate_dirs(data: str | Path | None, spec: DatasetSpec) -> list[Path]:
    """Where data is looked for, in order: --data, $DIGITLAB_DATA, system dirs, the user cache."""
    dirs: list[Path] = []
    if data is not None:
        dirs.append(Path(data).expanduser())
    env = os.environ.get("DIGITLAB_DATA")
    if env:
        dirs.append(Path(env).expanduser())
    dirs.extend(Path(d) for d in spec.system_dirs)
    dirs.append(cache_dir(spec.name))
    # An explicit dir that holds the dataset in a subdir named after it (DATA/fashion-mnist/...) counts too.
    with_subdirs: list[Path] = []
    for d in dirs:
        with_subdirs.append(d)
        if spec.name != "mnist" and d not in (Path(s) for s in spec.system_dirs):
            with_subdirs.append(d / spec.name)
    return with_subdirs


def locate(
    data: str | Path | None = None, dataset: str | DatasetSpec = "mnist", download: bool = True
) -> dict[str, Path]:
    """Find the four files of `dataset`, downloading them into the first writable place when missing."""
    spec = get_spec(dataset)
    dirs = candidate_dirs(data, spec)
    holds_other: dict[Path, str] = {}
    for directory in dirs:
        found = find_files(directory)
        if found and (other := _other_dataset(found, spec)) is not None:
            holds_other[directory] = other.title  # e.g. MNIST in $DIGITLAB_DATA when Fashion-MNIST is asked for
            continue
        if found:
            return found
    target = (
        Path(data).expanduser()
        if data is not None
        else (
            Path(os.environ["DIGITLAB_DATA"]).expanduser() if os.environ.get("DIGITLAB_DATA") else cache_dir(spec.name)
        )
    )
    if target in holds_other:
        target = target / spec.name  # never download one dataset over another's files of the same names
    looked = ", ".join(f"{d} (holds {holds_other[d]})" if d in holds_other else f"{d}{_missing_note(d)}" for d in dirs)
    files = ", ".join(f"{stem}.gz" for stem in SPLIT_FILES.values())
    how = f"put the four files ({files}) in one of them, or pass --data DIR"
    if not download or not spec.mirrors:
        raise DataError(f"{spec.title} not found: looked in {looked}; {how}")
    try:
        download_dataset(spec, target)
    except DataError as exc:
        raise DataError(
            f"{spec.title} not found: looked in {looked}; download failed ({exc}); offline? {how}"
        ) from None
    found = find_files(target)
    assert found is not None
    return found


def _missing_note(directory: Path) -> str:
    """' (no FILE, ...)' for a dir holding some but not all four files, so the message names what is missing."""
    if not directory.is_dir():
        return ""
    missing = [stem for stem in SPLIT_FILES.values() if find_file(directory, stem) is None]
    if len(missing) == len(SPLIT_FILES):
        return ""
    return f" (no {', '.join(missing)}, as .gz or raw)"


def _other_dataset(found: dict[str, Path], spec: DatasetSpec) -> DatasetSpec | None:
    """The registered dataset other than `spec` whose training labels these files are (by MD5), if any.

    Every dataset in MNIST's format uses the same four file names: only the content tells them apart.
    """
    stem = SPLIT_FILES["train_labels"]
    others = {other.md5[stem]: other for other in DATASETS.values() if other.name != spec.name and stem in other.md5}
    try:
        return others.get(md5_of(found["train_labels"]))
    except DataError:
        return None  # a broken file is reported, naming the defect, when it is loaded


# ----------------------------------------------------------------------------------------------------------
# Download and verification
# ----------------------------------------------------------------------------------------------------------


def md5_of(path: str | Path) -> str:
    """MD5 of a file's decompressed content (what the dataset's checksums are of)."""
    path = Path(path)
    return hashlib.md5(read_bytes(path)).hexdigest()


def verify(directory: str | Path, dataset: str | DatasetSpec = "mnist") -> dict[str, str]:
    """Check the MD5 of each of the four files in `directory`; raise DataError on the first problem."""
    spec = get_spec(dataset)
    directory = Path(directory)
    results: dict[str, str] = {}
    for stem, expected in spec.md5.items():
        path = find_file(directory, stem)
        if path is None:
            raise DataError(f"{directory / (stem + '.gz')}: file not found")
        actual = md5_of(path)
        if actual != expected:
            raise DataError(f"{path}: MD5 mismatch: {actual} found, {expected} expected")
        results[str(path)] = actual
    return results


def _fetch(url: str, timeout: float, progress: Callable[[int, int | None], None] | None) -> bytes:
    import urllib.request  # here, not at the top: it costs 50 ms at every start and only downloads need it

    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = response.headers.get("Content-Length")
        total_bytes = int(total) if total and total.isdigit() else None
        chunks: list[bytes] = []
        done = 0
        while chunk := response.read(1 << 16):
            chunks.append(chunk)
            done += len(chunk)
            if progress:
                progress(done, total_bytes)
    return b"".join(chunks)


def download_dataset(
    spec: DatasetSpec,
    directory: str | Path,
    retries: int = 3,
    timeout: float = 30.0,
    show_progress: bool = True,
) -> None:
    """Download the four files from the spec's mirrors, verify each MD5, write each atomically."""
    directory = Path(directory)
    for stem, expected in spec.md5.items():
        if (path := find_file(directory, stem)) is not None and md5_of(path) == expected:
            continue
        data = _download_verified(spec, stem, expected, retries, timeout, show_progress)
        try:
            atomic_write_bytes(directory / f"{stem}.gz", data)
        except OSError as exc:
            raise DataError(f"{directory / (stem + '.gz')}: cannot write: {exc.strerror or exc}") from None


def _download_verified(
    spec: DatasetSpec, stem: str, expected: str, retries: int, timeout: float, show_progress: bool
) -> bytes:
    """Gzipped bytes of `stem` from the first mirror that serves them with the right MD5."""
    import http.client
    import urllib.error

    last_error = f"no mirror for {stem}"
    for mirror in spec.mirrors:
        url = f"{mirror}{stem}.gz"
        for attempt in range(retries):
            try:
                data = _download_with_progress(url, timeout, show_progress)
                content = gunzip(data, url)  # decompressed no further than its IDX header says
                actual = hashlib.md5(content).hexdigest()
                if actual == expected:
                    return data if is_gzip(data) else gzip.compress(data, mtime=0)
                last_error = f"{url}: MD5 mismatch: {actual} found, {expected} expected"
            except DataError as exc:
                last_error = str(exc)
            except (urllib.error.URLError, OSError, zlib.error, http.client.HTTPException) as exc:
                last_error = f"{url}: {getattr(exc, 'reason', None) or exc}"
            if attempt + 1 < retries:
                time.sleep(0.5 * 2**attempt)  # back off: mirrors rate-limit bursts
    raise DataError(last_error)


def _download_with_progress(url: str, timeout: float, show_progress: bool) -> bytes:
    if not show_progress:
        return _fetch(url, timeout, None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True
    ) as bar:
        task = bar.add_task(f"downloading {url.rsplit('/', 1)[-1]}", total=None)
        return _fetch(url, timeout, lambda done, total: bar.update(task, completed=done, total=total))


# ----------------------------------------------------------------------------------------------------------
# Reading the four files
# ----------------------------------------------------------------------------------------------------------

Arrays = dict[str, np.ndarray]  # split key (train_images, ...) -> array


def read_arrays(files: dict[str, Path], spec: DatasetSpec) -> tuple[Arrays, dict[str, str]]:
    """Read and cross-check the four files: (arrays, MD5 of each decompressed file).

    Images come back as writable uint8 (N, H, W) arrays, labels as int64 (N,): ready for torch.from_numpy.
    """
    # zlib and hashlib release the GIL, so the four files decompress in parallel.
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            key: pool.submit(read_checked, key, Path(path), len(spec.class_names)) for key, path in files.items()
        }
        results = {key: future.result() for key, future in futures.items()}
    arrays = {key: array for key, (array, _) in results.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(
                f"{Path(files[f'{split}_labels']).name}: {len(labels)} labels but "
                f"{Path(files[f'{split}_images']).name} has {len(images)} images"
            )
    for key in ("train_images", "test_images"):
        check_image_shape(arrays[key], Path(files[key]).name, spec)
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(
            f"{Path(files['test_images']).name}: image size {arrays['test_images'].shape[1:]} differs "
            f"from the training images' {arrays['train_images'].shape[1:]}"
        )
    # parse_idx's arrays are read-only views of the file's bytes; torch wants writable memory and int64 labels.
    ready = {key: array.astype(np.int64) if key.endswith("labels") else array.copy() for key, array in arrays.items()}
    return ready, {Path(files[key]).name: md5 for key, (_, md5) in results.items()}


def check_image_shape(images: np.ndarray, name: str, spec: DatasetSpec) -> None:
    """Images the models cannot take (1x784, 14x56: the same bytes, another shape) are refused, naming the file:
    the MLP would otherwise train on them silently and the CNN fail deep inside a convolution."""
    rows, cols = spec.image_shape
    if tuple(images.shape[1:]) != (rows, cols):
        found = "x".join(str(n) for n in images.shape[1:])
        raise DataError(
            f"{name}: images are {found} pixels; {spec.title} images are {rows}x{cols}, the size digitlab's models take"
        )


def files_key(spec: DatasetSpec, files: dict[str, Path]) -> tuple:
    """Identifies one version of a file set: a file replaced on disk gets a new key."""
    return (spec.name,) + tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files.values())


_PREFETCHED: dict[tuple, Future] = {}
_PREFETCH_LOCK = threading.Lock()


def prefetch(data: str | Path | None = None, dataset: str | DatasetSpec = "mnist") -> None:
    """Start reading a dataset that is already on disk in a background thread; `take_prefetched` collects it.

    Best effort: when the files are not found (or anything else goes wrong) it does nothing, and the real
    load reports the problem. It never downloads.
    """
    try:
        spec = get_spec(dataset)
        files = locate(data, spec, download=False)
        key = files_key(spec, files)
    except (DigitlabError, OSError):
        return
    with _PREFETCH_LOCK:
        if key not in _PREFETCHED:
            future: Future = Future()
            _PREFETCHED[key] = future
            threading.Thread(target=_fill, args=(future, files, spec), name="digitlab-prefetch", daemon=True).start()


def _fill(future: Future, files: dict[str, Path], spec: DatasetSpec) -> None:
    try:
        future.set_result(read_arrays(files, spec))
    except BaseException as exc:  # handed to the reader, who reports it
        future.set_exception(exc)


def take_prefetched(key: tuple) -> tuple[Arrays, dict[str, str]] | None:
    """The result of an earlier `prefetch` of this file set (waiting for it to finish), or None."""
    with _PREFETCH_LOCK:
        future = _PREFETCHED.pop(key, None)
    return None if future is None else future.result()
