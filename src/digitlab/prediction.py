"""Read digits from users' images: the library behind `digitlab predict`, the Python API and the web app.

    predictor = Predictor.from_checkpoint("runs/cnn")
    predictor.predict(["photo.jpg", "scans/"])          # paths, folders, IDX files, bytes, PIL, arrays
    predictor.predict_arrays(x)                          # (N, 28, 28) pixels in [0, 1] -> (N, 10)

Every input goes through `digitlab.preprocessing.preprocess` (the same function the web app uses), except
images from IDX files, which are MNIST's own format and reach the model exactly as in training. Errors are
per input: a bad file gives a Prediction with `error` set, the others are still read.

The model runs behind one callable, `run_logits(pixels (N, 1, 28, 28) float32 in [0, 1]) -> logits (N, 10)`,
the same contract as an exported ONNX model, so another backend only needs to supply that callable.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .calibration import softmax
from .errors import DigitlabError, first_line
from .figures import write_png
from .idx import IMAGES_MAGIC, gunzip, is_gzip, parse_idx
from .pixels import model_input
from .preprocessing import IMAGE_SUFFIXES, load_image, preprocess
from .tta import averaged as tta_average

IDX_SUFFIXES = (".idx", ".idx3", ".idx3-ubyte", "-ubyte", ".gz")
DEFAULT_BATCH_SIZE = 256

RunLogits = Callable[[np.ndarray], np.ndarray]


class PredictError(DigitlabError):
    """A prediction that cannot run at all (bad option, unusable model); per-input problems are not raised."""


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """What the model read in one input, or why it could not."""

    path: str | None
    digit: int | None  # None when rejected (confidence below the threshold) or failed
    confidence: float | None
    probabilities: list[float] | None
    top3: list[tuple[int, float]] | None
    error: str | None
    preprocessed: np.ndarray | None = field(default=None, repr=False)  # (28, 28) float32: what the model saw
    rejected: bool = False
    preprocessed_path: str | None = None  # where --save-preprocessed wrote it

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the preprocessed array is left out)."""
        out: dict[str, Any] = {
            "path": self.path,
            "digit": self.digit,
            "confidence": self.confidence,
            "probabilities": self.probabilities,
            "top3": [[d, p] for d, p in self.top3] if self.top3 is not None else None,
            "rejected": self.rejected,
            "error": self.error,
        }
        if self.preprocessed_path is not None:
            out["preprocessed_path"] = self.preprocessed_path
        return out


def failed(path: str | None, message: str) -> Prediction:
    return Prediction(path=path, digit=None, confidence=None, probabilities=None, top3=None, error=message)


def from_probabilities(
    path: str | None, probabilities: np.ndarray, preprocessed: np.ndarray | None, reject_below: float | None
) -> Prediction:
    """A Prediction from one row of probabilities (10,)."""
    p = [float(v) for v in probabilities]
    order = sorted(range(len(p)), key=lambda k: -p[k])
    best = order[0]
    rejected = reject_below is not None and p[best] < reject_below
    return Prediction(
        path=path,
        digit=None if rejected else best,
        confidence=p[best],
        probabilities=p,
        top3=[(k, p[k]) for k in order[:3]],
        error=None,
        preprocessed=preprocessed,
        rejected=rejected,
    )


# ----------------------------------------------------------------------------------------------------------
# Inputs: paths, folders, IDX files, stdin, in-memory images
# ----------------------------------------------------------------------------------------------------------


@dataclass
class InputItem:
    """One image to read: where it came from and what holds it."""

    path: str | None  # as given; IDX images as "file#index"
    source: Any = None  # a Path, encoded bytes, PIL image, numpy array or tensor
    mnist: np.ndarray | None = None  # (28, 28) uint8 from an IDX file: fed to the model as is
    error: str | None = None  # already failed while expanding (missing file, bad IDX file)


# The largest file (or stdin) `predict` reads: a 40-megapixel photo is ~20 MB as JPEG, MNIST's training images
# are 47 MB as raw IDX. Beyond it a file is refused unread, so /dev/zero or a huge file cannot fill memory.
MAX_INPUT_BYTES = 64 * 1024 * 1024

_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def _file_problem(path: Path, name: str) -> str | None:
    """Why `path` is not an input predict reads (one line naming it), or None for a regular file within
    MAX_INPUT_BYTES. Checked before anything opens it: opening a FIFO waits for a writer, forever."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return f"{name}: file not found"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{name}: symbolic link loop (the link leads back to itself)"
        return f"{name}: cannot read: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "a special file")
        return f"{name}: {kind}, not a regular file (predict reads only regular files)"
    if info.st_size > MAX_INPUT_BYTES:
        return f"{name}: file too large: {info.st_size} bytes (the limit is {MAX_INPUT_BYTES} bytes)"
    return None


def _read_regular(path: Path, size: int) -> bytes:
    """Up to `size` bytes of a regular file. O_NONBLOCK: should a FIFO have replaced the file since it was
    checked, opening it returns at once instead of waiting for a writer, and fstat refuses it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return f.read(size)


def _sniff(path: Path) -> bytes:
    try:
        return _read_regular(path, 4)
    except OSError:
        return b""


def _looks_like_idx(head: bytes) -> bool:
    """IDX images start with 00 00 08 03; gzip with 1f 8b (image formats never do)."""
    return head[:4] == b"\x00\x00\x08\x03" or is_gzip(head)


def _idx_items(raw: bytes, name: str) -> list[InputItem]:
    """One item per image of an IDX images file (raw bytes, gzipped or not)."""
    try:
        raw = gunzip(raw, name)
        if raw[:4] == b"\x00\x00\x08\x01":
            return [InputItem(name, error=f"{name}: an IDX labels file, not images")]
        images = parse_idx(raw, name, expect_magic=IMAGES_MAGIC)
    except DigitlabError as exc:
        return [InputItem(name, error=str(exc))]
    if images.ndim != 3:
        return [InputItem(name, error=f"{name}: IDX images must have 3 dimensions, found {images.ndim}")]
    if images.shape[0] == 0:
        return [InputItem(name, error=f"{name}: IDX file holds no images")]
    mnist = images.shape[1:] == (28, 28)
    return [
        InputItem(f"{name}#{i}", source=None if mnist else image, mnist=image if mnist else None)
        for i, image in enumerate(images)
    ]


def _is_loop(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _walk(directory: Path) -> list[Path]:
    """Image and IDX files under a directory, recursively, sorted; hidden files and folders skipped.

    Symbolic links to folders are not followed (os.walk's default), so a link cycle cannot make the walk
    endless; a link that loops onto itself is listed whatever its name, so that it gets its own error line.
    """
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            lower = name.lower()
            if (
                lower.endswith(IMAGE_SUFFIXES)
                or lower.endswith(IDX_SUFFIXES)
                or "idx3" in lower
                or _is_loop(Path(root) / name)
            ):
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(directory).parts)


def _file_items(path: Path, name: str) -> list[InputItem]:
    """The items of one file: every image of an IDX file, else the file itself (decoded later); an error item
    for a missing file, a link loop, a FIFO, device or socket, or a file over MAX_INPUT_BYTES."""
    if (problem := _file_problem(path, name)) is not None:
        return [InputItem(name, error=problem)]
    head = _sniff(path)
    if _looks_like_idx(head):
        try:
            raw = _read_regular(path, MAX_INPUT_BYTES + 1)
        except OSError as exc:
            return [InputItem(name, error=f"{name}: cannot read: {exc.strerror or exc}")]
        if len(raw) > MAX_INPUT_BYTES:  # it grew since it was checked
            return [InputItem(name, error=f"{name}: file too large: over {MAX_INPUT_BYTES} bytes")]
        return _idx_items(raw, name)
    return [InputItem(name, source=path)]


def read_stdin() -> bytes:
    """stdin up to one byte past MAX_INPUT_BYTES: `predict - < /dev/zero` stops there instead of filling memory."""
    return sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)


def expand_inputs(args: Iterable[Any], stdin: Callable[[], bytes] = read_stdin) -> list[InputItem]:
    """Turn what the user gave into one item per image.

    Strings and Paths are files (an IDX file gives one item per image, named "file#i"), folders (searched
    recursively for image and IDX files, in sorted order) or "-" (stdin, read once). Anything else (bytes,
    PIL images, arrays, tensors) is one image. A missing path becomes an item with an error.
    """
    items: list[InputItem] = []
    stdin_data: bytes | None = None
    for arg in args:
        if isinstance(arg, InputItem):
            items.append(arg)
        elif isinstance(arg, str) and arg == "-":
            if stdin_data is None:
                stdin_data = stdin()
            if len(stdin_data) > MAX_INPUT_BYTES:
                items.append(InputItem("-", error=f"<stdin>: input too large: over {MAX_INPUT_BYTES} bytes"))
            elif _looks_like_idx(stdin_data[:4]):
                items.extend(_idx_items(stdin_data, "-"))
            else:
                items.append(InputItem("-", source=stdin_data))
        elif isinstance(arg, (str, Path)):
            name, path = str(arg), Path(arg)
            if path.is_dir():
                files = _walk(path)
                if not files:
                    items.append(InputItem(name, error=f"{name}: no image or IDX files in this folder"))
                for file in files:
                    items.extend(_file_items(file, str(file)))
            else:  # a file, or what stands in its place: _file_items names a missing file, a loop, a FIFO
                items.extend(_file_items(path, name))
        else:
            items.append(InputItem(None, source=arg))
    return items


def _prepare(item: InputItem) -> tuple[np.ndarray | None, str | None]:
    """(pixels (28, 28) float32 in [0, 1], None) or (None, error message) for one item."""
    if item.error is not None:
        return None, item.error
    if item.mnist is not None:
        return model_input(item.mnist), None  # exactly what training saw (data.to_input computes the same)
    name = "<stdin>" if item.path == "-" else (item.path or "<image>")  # how error messages name the input
    try:
        source = item.source
        if isinstance(source, (Path, bytes, bytearray, memoryview, io.IOBase)):
            source = load_image(source, name=name)
        return preprocess(source), None
    except DigitlabError as exc:
        message = str(exc)
        return None, message if message.startswith(f"{name}: ") else f"{name}: {message}"
    except Exception as exc:  # noqa: BLE001 - one bad input must never stop the others
        return None, f"{name}: cannot read this image ({exc.__class__.__name__}: {first_line(exc, 100)})"


BIG_INPUT_BYTES = 32_000  # smaller images (an MNIST PNG is under 1 kB) are quicker inline than on a thread


def _is_big(item: InputItem) -> bool:
    """Worth a thread: a large file or buffer (a photo), whose decoding and preprocessing release the GIL."""
    source = item.source
    if item.mnist is not None or item.error is not None:
        return False
    if isinstance(source, Path):
        try:
            return source.stat().st_size > BIG_INPUT_BYTES
        except OSError:
            return False
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source) > BIG_INPUT_BYTES
    if isinstance(source, Image.Image):
        return source.width * source.height > BIG_INPUT_BYTES
    if isinstance(source, np.ndarray):
        return source.size > BIG_INPUT_BYTES
    numel = getattr(source, "numel", None)  # a torch tensor
    return callable(numel) and numel() > BIG_INPUT_BYTES


def _prepare_all(pool: ThreadPoolExecutor, workers: int, batch: Sequence[InputItem]) -> list:
    """_prepare for a batch: photos on the pool's threads, one contiguous share per thread; small images
    (MNIST PNGs, IDX images) inline, where a thread hand-off would cost more than the work."""
    big = [k for k, item in enumerate(batch) if _is_big(item)] if workers > 1 else []
    results: list = [None] * len(batch)
    share = -(-len(big) // workers) if big else 1
    parts = pool.map(
        lambda start: [(k, _prepare(batch[k])) for k in big[start : start + share]], range(0, len(big), share)
    )
    chosen = set(big)
    for k, item in enumerate(batch):
        if k not in chosen:
            results[k] = _prepare(item)
    for part in parts:
        for k, result in part:
            results[k] = result
    return results


# ----------------------------------------------------------------------------------------------------------
# The predictor
# ----------------------------------------------------------------------------------------------------------


def _torch_runner(model: Any, mean: float | None, std: float | None, device: Any) -> RunLogits:
    """run_logits for a PyTorch model: pixels -> normalised as in training (`model_input`) -> logits."""
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)  # (N, 1, 28, 28)
            return model(model_input(t, mean, std)).float().cpu().numpy()  # (N, 10)

    return run


class Predictor:
    """A loaded model (or an ensemble of them) plus preprocessing: images in, Predictions out. Safe to share
    between threads.

    `run_logits` takes pixels (N, 1, 28, 28) float32 in [0, 1] and returns logits (N, 10); `info` is the
    checkpoint's CheckpointInfo (or anything with model, mean, std and class_names). `model` (a torch
    module, optional) is needed only by `explain`. Probabilities are softmax(logits / temperature), with the
    temperature fitted after training (calibration.py), so that a 90% answer is right about 90% of the time.
    An ensemble (`from_checkpoints`) averages its members' calibrated probabilities.
    """

    def __init__(
        self,
        run_logits: RunLogits,
        info: Any,
        model: Any = None,
        device: Any = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
        temperature: float | None = None,
        tta: bool = False,
    ):
        if batch_size < 1:
            raise PredictError(f"--batch-size {batch_size}: must be >= 1")
        if temperature is None:
            temperature = float(getattr(info, "temperature", 1.0) or 1.0)
        if not (math.isfinite(temperature) and temperature > 0):
            raise PredictError(f"temperature {temperature}: must be a positive number")
        self.members: list[tuple[RunLogits, float]] = [(run_logits, float(temperature))]
        self.info = info
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.tta = tta  # average each answer over the image and four one-pixel shifts of it (tta.py)
        self._lock = threading.Lock()  # one forward pass at a time on the shared model

    @property
    def temperature(self) -> float:
        """The (first) member's softmax temperature."""
        return self.members[0][1]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", batch_size: int = DEFAULT_BATCH_SIZE) -> Predictor:
        """Load a checkpoint (a run dir or a .safetensors/.json file) for inference."""
        from .checkpoint import load
        from .devices import resolve_device

        torch_device = resolve_device(device)
        model, info = load(path, device=torch_device)
        return cls(
            _torch_runner(model, info.mean, info.std, torch_device),
            info,
            model=model,
            device=torch_device,
            batch_size=batch_size,
        )

    @classmethod
    def from_onnx(cls, path: str | Path, device: str = "auto", batch_size: int = DEFAULT_BATCH_SIZE) -> Predictor:
        """Load a model written by `digitlab export` and run it with onnxruntime: torch is never imported.
        The exported graph already divides its logits by the checkpoint's temperature."""
        from .export import OnnxModel, onnx_providers

        model = OnnxModel(path, providers=onnx_providers(device))
        return cls(model.logits, model.info, device=device, batch_size=batch_size, temperature=1.0)

    @classmethod
    def from_checkpoints(
        cls,
        paths: Sequence[str | Path],
        device: str = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
        onnx: bool | None = None,
        tta: bool = False,
    ) -> Predictor:
        """An ensemble: each checkpoint (or exported .onnx file) is loaded, and their calibrated probabilities
        are averaged. One path gives a plain Predictor. `explain` and `activations` show the first member.
        onnx: True loads every path with onnxruntime, False as a checkpoint; None decides by the .onnx suffix.
        tta: test-time augmentation (tta.py), five forward passes per image and member."""
        if not paths:
            raise PredictError("--checkpoint: give at least one checkpoint")

        def load_one(path: str | Path) -> Predictor:
            if onnx or (onnx is None and str(path).endswith(".onnx")):
                return cls.from_onnx(path, device=device, batch_size=batch_size)
            return cls.from_checkpoint(path, device=device, batch_size=batch_size)

        first = load_one(paths[0])
        for path in paths[1:]:
            member = load_one(path)
            if list(member.info.class_names) != list(first.info.class_names):
                raise PredictError(
                    f"{path}: an ensemble needs members with the same classes "
                    f"({', '.join(member.info.class_names)} vs {', '.join(first.info.class_names)})"
                )
            first.members.extend(member.members)
        first.tta = tta
        return first

    # -- the model ---------------------------------------------------------------------------------------

    def _probabilities(self, x: np.ndarray) -> np.ndarray:
        """Pixels (N, 1, 28, 28) float32 in [0, 1] -> calibrated probabilities (N, 10), averaged over the
        members; the only place the models run."""
        total = None
        with self._lock:
            for run_logits, temperature in self.members:

                def probabilities(views: np.ndarray, run_logits=run_logits, temperature=temperature) -> np.ndarray:
                    return softmax(np.asarray(run_logits(views)), temperature).astype(np.float32)

                p = tta_average(probabilities, x) if self.tta else probabilities(x)
                total = p if total is None else total + p
        return total / len(self.members)

    def predict_arrays(self, x: np.ndarray) -> np.ndarray:
        """Already MNIST-like pixels (N, 28, 28), float in [0, 1] or uint8 -> probabilities (N, 10).

        No preprocessing; batched by `batch_size`.
        """
        x = np.ascontiguousarray(model_input(x)).reshape(-1, 1, 28, 28)  # (N, 1, 28, 28) float32 in [0, 1]
        if len(x) == 0:
            return np.zeros((0, 10), dtype=np.float32)
        return np.concatenate(
            [self._probabilities(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        )

    # -- images ------------------------------------------------------------------------------------------

    def iter_predict(
        self,
        items: Sequence[InputItem],
        reject_below: float | None = None,
        save_dir: str | Path | None = None,
        workers: int | None = None,
    ) -> Iterator[Prediction]:
        """Predictions for expanded items, in order, a batch at a time (preprocessing on `workers` threads)."""
        if reject_below is not None and not 0.0 <= reject_below <= 1.0:
            raise PredictError(f"--reject-below {reject_below}: must be between 0 and 1")
        workers = workers or min(4, os.cpu_count() or 1)
        save = Path(save_dir) if save_dir is not None else None
        if save is not None:
            try:
                save.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PredictError(
                    f"--save-preprocessed {save}: cannot create the folder ({exc.strerror or exc})"
                ) from None
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                prepared = _prepare_all(pool, workers, batch)
                ok = [k for k, (x, _) in enumerate(prepared) if x is not None]
                probabilities = self.predict_arrays(np.stack([prepared[k][0] for k in ok])) if ok else None
                rows = dict(zip(ok, probabilities)) if ok else {}
                for k, item in enumerate(batch):
                    x, error = prepared[k]
                    if x is None:
                        yield failed(item.path, error or "unknown error")
                        continue
                    prediction = from_probabilities(item.path, rows[k], x, reject_below)
                    if save is not None:
                        prediction.preprocessed_path = str(save_preprocessed(save, start + k, item.path, x))
                    yield prediction

    def predict(self, images: Any, reject_below: float | None = None) -> list[Prediction]:
        """Predictions for one image or a list of them: paths (files, folders, IDX files), encoded bytes, PIL
        images, numpy arrays or tensors. A batch array (N, H, W) with N > 4, or (N, C, H, W), counts as N
        images. Bad inputs give a Prediction with `error` set; nothing is raised for them."""
        return list(self.iter_predict(expand_inputs(_as_list(images)), reject_below=reject_below))

    def predict_one(self, image: Any) -> Prediction:
        """The Prediction for one image (not a folder or an IDX file)."""
        x, error = _prepare(InputItem(_name_of(image), source=image))
        if x is None:
            return failed(_name_of(image), error or "unknown error")
        return from_probabilities(_name_of(image), self.predict_arrays(x[None])[0], x, None)

    def _require_layers(self) -> None:
        if self.model is None or not hasattr(self.model, "hidden_activations"):
            raise PredictError("explain needs a PyTorch checkpoint (this model has no hidden activations)")

    def activations(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Each layer's activations for one MNIST-like image (28, 28) in [0, 1], used as it is (no preprocessing):
        {layer: array without the batch dimension}. CNN feature maps keep their first 8 channels; "logits" (10,)
        are before softmax."""
        self._require_layers()
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(1, 1, 28, 28))  # (1, 1, 28, 28)
        with self._lock, torch.inference_mode():
            layers = self.model.hidden_activations(model_input(t.to(self.device), self.info.mean, self.info.std))
            values = {name: value[0].float().cpu().numpy() for name, value in layers.items()}  # drop batch dim
        # (C, H, W): the first 8 feature maps are plenty to look at
        return {name: value[:8] if value.ndim == 3 else value for name, value in values.items()}

    def explain(self, image: Any) -> dict[str, Any]:
        """The prediction and each layer's activations for one image, preprocessed as `predict` does:
        {"prediction", "activations": {layer: nested lists}} (see `activations`)."""
        self._require_layers()
        x, error = _prepare(InputItem(_name_of(image), source=image))
        if x is None:
            raise PredictError(error or "cannot read this image")
        values = self.activations(x)
        prediction = from_probabilities(_name_of(image), self.predict_arrays(x[None])[0], x, None)
        return {"prediction": prediction, "activations": {name: value.tolist() for name, value in values.items()}}

    def saliency(self, image: np.ndarray, steps: int = 32) -> Any:
        """Why this digit: a digitlab.saliency.Saliency (a 28x28 map, the digit and the runner-up) for one
        MNIST-like image (28, 28) in [0, 1], used as it is, like `activations` (integrated gradients)."""
        self._require_layers()
        from .saliency import integrated_gradients

        with self._lock:  # one pass at a time on the shared model
            return integrated_gradients(
                self.model, image, self.info.mean, self.info.std, steps=steps, device=self.device
            )


def _name_of(image: Any) -> str | None:
    return str(image) if isinstance(image, (str, Path)) else None


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return list(images)
    shape = getattr(images, "shape", None)
    if shape is not None and not isinstance(images, Image.Image):
        if len(shape) == 4 or (len(shape) == 3 and shape[0] > 4 and shape[-1] not in (1, 2, 3, 4)):
            return [images[i] for i in range(shape[0])]
    return [images]


def _safe_name(path: str | None) -> str:
    if not path:
        return "image"
    keep = [c if c.isalnum() or c in "-_." else "_" for c in path.replace("#", "_")]
    return "".join(keep).strip("._")[-80:] or "image"


def save_preprocessed(directory: Path, index: int, path: str | None, x: np.ndarray) -> Path:
    """Write the 28x28 image the model saw as a PNG named after its position and input; returns its path."""
    return write_png(directory / f"{index:05d}-{_safe_name(path)}.png", x)


# ----------------------------------------------------------------------------------------------------------
# The table `digitlab predict` prints
# ----------------------------------------------------------------------------------------------------------


def path_width(items: Sequence[InputItem], limit: int = 60) -> int:
    return max([4] + [min(limit, len(i.path or "")) for i in items])


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def table_header(width: int) -> str:
    return f"{'path':<{width}}  digit  confidence  top-3"


def table_row(prediction: Prediction, width: int) -> str:
    """One readable line: path, digit, confidence, the three likeliest digits (or the error)."""
    path = _fit(prediction.path or "<image>", width)
    if prediction.error is not None:
        message = prediction.error
        if prediction.path and message.startswith(prediction.path + ": "):
            message = message[len(prediction.path) + 2 :]
        return f"{path:<{width}}  {'-':>5}  {'-':>10}  error: {message}"
    digit = "-" if prediction.digit is None else str(prediction.digit)
    top3 = ", ".join(f"{d} {p:.3f}" for d, p in prediction.top3 or [])
    note = "  (rejected: below --reject-below)" if prediction.rejected else ""
    return f"{path:<{width}}  {digit:>5}  {prediction.confidence:>10.4f}  {top3}{note}"
