"""Export a checkpoint for engines outside PyTorch (ONNX for onnxruntime, TorchScript), checked after export.

An exported model takes raw pixels: float32 (N, 1, 28, 28) in [0, 1], white ink on black, MNIST-preprocessed
(digitlab.preprocessing makes them from any image). The checkpoint's normalisation (x - mean) / std is part
of the exported graph, so a deployment needs no magic constants. Input "pixels", output "logits" (N, classes),
batch dimension "batch" dynamic.

Every export is verified before it is written: the exported model and the PyTorch model run on the same
images (the 10,000 test images when the data is found, else seeded random images) and the export fails when
the logits differ by more than 1e-4 or any predicted class differs. The file is written to a temp file and
renamed, so a failed export leaves nothing behind. An existing file at the output path is replaced only with
force=True (`--force`), never when it is read-only; the path is checked before any work.

An exported ONNX model carries the SHA-256 of its graph (operators and all weights, as serialized) in its
metadata ("graph_sha256"); `OnnxModel` checks it on load, so a flipped bit is an error, not a wrong digit.

torch is imported inside the export functions only: `OnnxModel`, the deployment side, runs an exported model
with onnxruntime and numpy and must work where importing torch is impossible or too slow.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from . import __version__
from .errors import DigitlabError, first_line
from .extras import require
from .fileio import atomic_write_bytes
from .pixels import model_input

if TYPE_CHECKING:
    import onnx
    import torch

FORMATS = ("onnx", "torchscript")
QUANTIZATIONS = ("int8",)
# Opset 18 runs on onnxruntime >= 1.14 (early 2023), so exported files load on older deployments too;
# the exporter writes its native opset (20) and converts down, which these models' operators survive.
DEFAULT_OPSET = 18
TOLERANCE = 1e-4  # max abs logit difference allowed between the exported model and PyTorch
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
INPUT_DESCRIPTION = "pixels in [0,1], white ink on black, MNIST-preprocessed"
IMAGE_SHAPE = (1, 28, 28)
SYNTHETIC_COUNT = 1000
SYNTHETIC_SEED = 0
TORCHSCRIPT_METADATA = "digitlab.json"  # name of the metadata file inside a TorchScript archive
DIGEST_KEY = "graph_sha256"  # ONNX metadata: SHA-256 of the serialized GraphProto (operators and weights)


class ExportError(DigitlabError):
    """An export that cannot be done or did not pass its check, or an exported model that cannot be used."""


# ----------------------------------------------------------------------------------------------------------
# What an export reports
# ----------------------------------------------------------------------------------------------------------


@dataclass
class VerifySet:
    """Images an export is checked on: uint8 (N, 28, 28), labels (N,) when known, and what they are."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str


@dataclass
class Check:
    """How an exported model's outputs compare with the reference model's on the same images."""

    source: str
    count: int
    max_abs_diff: float
    argmax_agreement: int  # images on which both predict the same class
    reference_accuracy: float | None  # None without labels
    exported_accuracy: float | None

    def passes(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance and self.argmax_agreement == self.count


@dataclass
class ExportReport:
    """What `export_onnx` / `export_torchscript` wrote and measured."""

    path: Path
    format: str
    model: str
    checkpoint: Path
    exporter: str
    opset: int | None
    size_bytes: int
    tolerance: float
    check: Check  # the fp32 export against PyTorch
    quantize: str | None = None
    quantized_check: Check | None = None  # the int8 model against the fp32 export (reported, not enforced)
    metadata: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["path"], raw["checkpoint"] = str(self.path), str(self.checkpoint)
        return raw

    def lines(self) -> list[str]:
        """A human summary, one fact per line."""
        c = self.check
        kind = f"{self.format}, opset {self.opset}" if self.opset else self.format
        engine = "onnxruntime" if self.format == "onnx" else "torchscript"
        out = [
            f"exported {self.model} ({self.checkpoint}) to {self.path} "
            f"({kind}{', int8 dynamic quantisation' if self.quantize else ''}; {self.exporter}; "
            f"{self.size_bytes / 1e6:.2f} MB) in {self.seconds:.1f} s",
            f"check on {c.source}: max |logit diff| {c.max_abs_diff:.2e} (limit {self.tolerance:.0e}), "
            f"same class on {c.argmax_agreement:,}/{c.count:,} images",
        ]
        if c.reference_accuracy is not None:
            out.append(f"accuracy: pytorch {c.reference_accuracy:.4f}, {engine} fp32 {c.exported_accuracy:.4f}")
        q = self.quantized_check
        if q is not None:
            line = (
                f"int8: same class as fp32 on {q.argmax_agreement:,}/{q.count:,} images, "
                f"max |logit diff| vs fp32 {q.max_abs_diff:.3f}"
            )
            if q.exported_accuracy is not None and q.reference_accuracy is not None:
                change = 100 * (q.exported_accuracy - q.reference_accuracy)
                line += f"; accuracy {q.exported_accuracy:.4f} ({change:+.2f} points vs fp32)"
            out.append(line)
        return out


# ----------------------------------------------------------------------------------------------------------
# Verification: reference and exported model on the same pixels
# ----------------------------------------------------------------------------------------------------------


def synthetic_verify_set(count: int = SYNTHETIC_COUNT, seed: int = SYNTHETIC_SEED) -> VerifySet:
    """Seeded random uint8 images: enough to compare two implementations of one function, no labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    return VerifySet(images, None, f"{count:,} seeded random images (seed {seed}; MNIST test set not used)")


def mnist_verify_set(data_dir: str | Path | None, dataset: str = "mnist") -> VerifySet | None:
    """The test split when found: in `data_dir` if given (an error if it is not there), else wherever
    digitlab finds it without downloading; None when it is nowhere."""
    from . import data
    from .idx import DataError

    try:
        loaded = data.load(data_dir, dataset, download=False)
    except DataError:
        if data_dir is not None:
            raise
        return None
    return VerifySet(
        loaded.test_images.numpy(),
        loaded.test_labels.numpy(),
        f"{loaded.spec.title} test set ({len(loaded.test_labels):,} images)",
    )


def _as_verify_set(images: VerifySet | np.ndarray | Any | None) -> VerifySet:
    if images is None:
        return synthetic_verify_set()
    if isinstance(images, VerifySet):
        return images
    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1:] != (28, 28) or len(array) == 0:
        raise ExportError(
            f"verify images: expected uint8 (N, 28, 28) with N >= 1, got {array.dtype} {tuple(array.shape)}"
        )
    return VerifySet(array, None, f"{len(array):,} given images")


def to_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]: what an exported model takes."""
    return model_input(images)[:, None]


def compare(
    reference: Callable[[np.ndarray], np.ndarray],
    exported: Callable[[np.ndarray], np.ndarray],
    verify: VerifySet,
    batch_size: int = 1000,
) -> Check:
    """Run both logit functions on the same pixels in batches and compare their outputs."""
    max_diff = 0.0
    agree = ref_correct = exp_correct = 0
    for start in range(0, len(verify.images), batch_size):
        pixels = to_pixels(verify.images[start : start + batch_size])  # (B, 1, 28, 28)
        ref, out = reference(pixels), exported(pixels)  # (B, classes) each
        if ref.shape != out.shape:
            raise ExportError(f"exported model returned logits of shape {out.shape}, PyTorch {ref.shape}")
        if not np.isfinite(out).all():
            raise ExportError("exported model returned non-finite logits")
        max_diff = max(max_diff, float(np.abs(ref.astype(np.float64) - out.astype(np.float64)).max()))
        ref_class, out_class = ref.argmax(1), out.argmax(1)
        agree += int((ref_class == out_class).sum())
        if verify.labels is not None:
            labels = verify.labels[start : start + batch_size]
            ref_correct += int((ref_class == labels).sum())
            exp_correct += int((out_class == labels).sum())
    n = len(verify.images)
    known = verify.labels is not None
    return Check(
        source=verify.source,
        count=n,
        max_abs_diff=max_diff,
        argmax_agreement=agree,
        reference_accuracy=ref_correct / n if known else None,
        exported_accuracy=exp_correct / n if known else None,
    )


def _tolerance_message(path: Path, check: Check, tolerance: float) -> str:
    return (
        f"{path}: exported model does not match PyTorch on {check.source}: max |logit diff| "
        f"{check.max_abs_diff:.2e} (limit {tolerance:.0e}), same class on {check.argmax_agreement}/"
        f"{check.count} images; nothing written"
    )


# ----------------------------------------------------------------------------------------------------------
# The exported module: pixels in [0, 1] -> normalise -> model -> logits
# ----------------------------------------------------------------------------------------------------------


def pixel_model(
    model: torch.nn.Module, mean: float | None, std: float | None, temperature: float = 1.0
) -> torch.nn.Module:
    """Wrap a model that takes normalised input into one that takes pixels in [0, 1] (N, 1, 28, 28) and
    returns calibrated logits (divided by the checkpoint's temperature: softmax gives calibrated
    probabilities)."""
    from torch import nn

    class PixelModel(nn.Module):
        """(pixels - mean) / std, then the model, then / temperature: the constants travel inside the graph."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.mean = mean
            self.std = std
            self.temperature = float(temperature)

        def forward(self, pixels):
            logits = self.model(model_input(pixels, self.mean, self.std))  # (N, classes)
            return logits if self.temperature == 1.0 else logits / self.temperature

    return PixelModel().eval()


def ensemble_model(members: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """Several pixel models (see `pixel_model`) as one graph: the log of their mean calibrated probabilities.

    softmax(log p) = p, so whoever applies softmax to the output, as to any digitlab export, gets the
    members' averaged probabilities."""
    import torch
    from torch import nn

    class Ensemble(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList(members)

        def forward(self, pixels):
            probabilities = torch.stack([m(pixels).softmax(dim=1) for m in self.members])  # (M, N, classes)
            return probabilities.mean(dim=0).clamp_min(1e-30).log()  # (N, classes)

    return Ensemble().eval()


def _pixel_module(checkpoints: Sequence[str | Path]) -> tuple[Path, torch.nn.Module, Any]:
    """The graph to export for one checkpoint or an ensemble: (first weights path, module, info). An
    ensemble's info says so in its model name and lists its members' checkpoints."""
    loaded = [_load_checkpoint(c) for c in checkpoints]
    weights, model, info = loaded[0]
    if len(loaded) == 1:
        return weights, pixel_model(model, info.mean, info.std, info.temperature), info
    for path, _, other in loaded[1:]:
        if list(other.class_names) != list(info.class_names):
            raise ExportError(f"{path}: an ensemble needs members with the same classes")
    module = ensemble_model([pixel_model(m, i.mean, i.std, i.temperature) for _, m, i in loaded])
    info = copy.copy(info)
    info.model = "ensemble"
    info.model_config = {
        "members": [
            {"checkpoint": str(w), "model": i.model, "model_config": i.model_config, "temperature": i.temperature}
            for w, _, i in loaded
        ]
    }
    info.temperature = 1.0  # applied per member, inside the graph
    info.metrics = {}
    return weights, module, info


def _example_input() -> torch.Tensor:
    """The tracing input: (2, 1, 28, 28) pixels from a private generator (the global RNG is left alone)."""
    import torch

    return torch.rand(2, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))


def _torch_logits(module: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(pixels)).float().numpy()

    return run


def _load_checkpoint(checkpoint: str | Path):
    from . import checkpoint as ckpt

    weights = ckpt.resolve(checkpoint)
    model, info = ckpt.load(weights, device="cpu")
    return weights, model, info


def _metadata(weights: Path, info: Any, exporter: str, check: Check | None = None) -> dict[str, str]:
    """What a deployment needs to know about an exported model, as strings (ONNX metadata_props)."""
    import torch

    meta = {
        "digitlab_version": __version__,
        "model": info.model,
        "model_config": json.dumps(info.model_config, sort_keys=True),
        "class_names": json.dumps(list(info.class_names)),
        "input": INPUT_DESCRIPTION,
        "input_shape": f"({BATCH_AXIS}, 1, 28, 28) float32",
        "normalisation": (
            "none"
            if info.mean is None or info.std is None
            else f"(pixels - {info.mean}) / {info.std}, inside the graph"
        ),
        "temperature": f"{getattr(info, 'temperature', 1.0)!r}, applied inside the graph (the outputs are "
        "calibrated logits)",
        "dataset": info.dataset,
        "checkpoint": weights.name,
        "checkpoint_epoch": str(info.epoch),
        "checkpoint_metrics": json.dumps(info.metrics, sort_keys=True),
        "torch_version": torch.__version__,
        "exporter": exporter,
    }
    if isinstance(info.metrics.get("test_accuracy"), (int, float)):
        meta["test_accuracy"] = f"{info.metrics['test_accuracy']:.4f}"
    if check is not None:
        meta["verified"] = (
            f"max |logit diff| {check.max_abs_diff:.2e} vs PyTorch on {check.source}, "
            f"same class on {check.argmax_agreement}/{check.count}"
        )
    return meta


def _write(path: Path, data: bytes, force: bool = False) -> None:
    """Atomically write the exported bytes; an unwritable place is a one-line error."""
    check_output(path, force)  # again: the file may have appeared while the export ran
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise ExportError(f"{path}: cannot write: {exc.strerror or exc}") from None


def check_output(path: str | Path, force: bool = False) -> None:
    """Fail before the (slow) export when the output cannot or must not be written: a directory, an unwritable
    place, an existing file without `force` (--force), a read-only file."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path}: is a directory; give a file name for --out")
    if path.exists() or path.is_symlink():
        if not os.access(path, os.W_OK):
            raise ExportError(f"{path}: exists and is read-only; make it writable or remove it to replace it")
        if not force:
            raise ExportError(f"{path}: already exists; pass --force to replace it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"{path}: cannot write: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{path}: cannot write: permission denied in {parent}")


_check_writable = check_output


# The loggers of the exporters and the quantizer; below ERROR they only narrate progress.
_EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir", "onnxruntime")
# onnxruntime's quantizer calls logging.warning(...), i.e. logs on the root logger: only those records (by
# the file they come from) are dropped there, not the rest of the process's root-logger records.
_EXPORTER_FILES = re.compile(r"[/\\](onnxruntime|onnxscript|onnx_ir|onnx|torch[/\\](onnx|export|_dynamo))[/\\]")


class _ExporterNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not _EXPORTER_FILES.search(record.pathname)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' progress lines and deprecation notices: the report says what happened.

    Scoped: only the exporters' own loggers are raised to ERROR (and restored afterwards), and the root
    logger drops only the records the exporters log on it directly."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    noise = _ExporterNoise()
    root = logging.getLogger()
    root.addFilter(noise)
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
            warnings.filterwarnings("ignore", module=r"onnxscript.*")
            yield
    finally:
        root.removeFilter(noise)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ----------------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------------


def _onnx_proto(module: torch.nn.Module, opset: int, exporter: str) -> tuple[onnx.ModelProto, str]:
    """Export to an in-memory ModelProto with a dynamic batch axis; returns (proto, exporter used).

    The torch.export-based ("dynamo") exporter is torch's supported path since 2.9 and runs offline (onnxscript
    is a dependency). The TorchScript-based exporter is deprecated and slated for removal, so it is only the
    fallback for a torch without the new one (before 2.5) or a model it cannot trace, and can be asked for
    with exporter="legacy".
    """
    import onnx
    import torch

    example = _example_input()  # batch 2, so the exporter cannot specialise the batch axis to 1
    errors: list[str] = []
    if exporter in ("auto", "dynamo"):
        try:
            with _quiet_export():
                program = torch.onnx.export(
                    module,
                    (example,),
                    None,
                    dynamo=True,
                    opset_version=opset,
                    verbose=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    external_data=False,
                    dynamic_shapes={INPUT_NAME: {0: torch.export.Dim(BATCH_AXIS)}},
                )
            return program.model_proto, f"torch.onnx dynamo exporter (torch {torch.__version__})"
        except Exception as exc:  # the new exporter raises many types; fall back and say why on failure
            errors.append(f"dynamo exporter: {exc.__class__.__name__}: {first_line(exc)}")
            if exporter == "dynamo":
                raise ExportError(f"ONNX export failed: {errors[0]}") from None
    if exporter in ("auto", "legacy"):
        try:
            buffer = io.BytesIO()
            with _quiet_export():
                torch.onnx.export(
                    module,
                    (example,),
                    buffer,
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
                )
            used = f"torch.onnx TorchScript exporter (torch {torch.__version__})"
            return onnx.load_from_string(buffer.getvalue()), used
        except Exception as exc:
            errors.append(f"TorchScript exporter: {exc.__class__.__name__}: {first_line(exc)}")
    if not errors:
        raise ExportError(f"unknown ONNX exporter {exporter!r} (choose auto, dynamo or legacy)")
    raise ExportError(f"ONNX export failed: {'; '.join(errors)}")


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def graph_bytes(model_bytes: bytes) -> bytes:
    """The serialized GraphProto inside a serialized ModelProto (field 7), exactly as stored in the file.

    A minimal protobuf wire-format walk over the top-level fields (numpy and onnx are not needed), so the
    digest covers the stored bytes themselves, not a re-serialization. ValueError when the bytes are not a
    ModelProto with one graph.
    """
    pos, found = 0, None
    while pos < len(model_bytes):
        key, pos = _read_varint(model_bytes, pos)
        field_number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(model_bytes, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(model_bytes, pos)
            if field_number == 7:
                if found is not None:
                    raise ValueError("more than one graph")
                found = model_bytes[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire_type}")
        if pos > len(model_bytes):
            raise ValueError("truncated field")
    if found is None:
        raise ValueError("no graph")
    return found


def graph_digest(model_bytes: bytes) -> str:
    """SHA-256 of the graph (operators and all weights) of a serialized ONNX model."""
    return hashlib.sha256(graph_bytes(model_bytes)).hexdigest()


def _sealed(proto: onnx.ModelProto, metadata: dict[str, str]) -> bytes:
    """The model's bytes with `metadata` plus the digest of its graph (the graph is not changed by metadata)."""
    _set_metadata(proto, metadata)
    digest = graph_digest(proto.SerializeToString())
    metadata[DIGEST_KEY] = digest
    _set_metadata(proto, metadata)
    sealed = proto.SerializeToString()
    if graph_digest(sealed) != digest:  # protobuf serialized the graph differently the second time
        raise ExportError("ONNX serialization is not stable: cannot record the graph's SHA-256")
    return sealed


def _set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "digitlab"
    proto.producer_version = __version__
    proto.doc_string = f"digitlab {metadata.get('model', '')} digit reader: input '{INPUT_NAME}' = {INPUT_DESCRIPTION}"


def _ort_session(model: bytes | str | Path, providers: Sequence[str] | None = None):
    """An onnxruntime session for a model (its bytes or path) that logs errors only, on `providers` (CPU by
    default). onnxruntime's own exception types pass through."""
    ort = _onnxruntime("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=list(providers or ["CPUExecutionProvider"]))


def _ort_logits(session) -> Callable[[np.ndarray], np.ndarray]:
    def run(pixels: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]

    return run


def _quantize_int8(model_bytes: bytes) -> bytes:
    """onnxruntime dynamic quantisation: int8 weights, activations quantised on the fly per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="digitlab-quantize-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model_bytes)
        try:
            with _quiet_export():
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        except Exception as exc:
            raise ExportError(f"int8 quantisation failed: {exc.__class__.__name__}: {first_line(exc)}") from None
        return dst.read_bytes()


def export_onnx(
    checkpoint: str | Path | Sequence[str | Path],
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    verify_images: VerifySet | np.ndarray | None = None,
    tolerance: float = TOLERANCE,
    exporter: str = "auto",
    force: bool = False,
) -> ExportReport:
    """Export a checkpoint to ONNX (pixels in [0, 1] -> calibrated logits), verify it against PyTorch with
    onnxruntime, optionally quantise it to int8, and write it atomically to `out`. Several checkpoints make
    one ensemble graph (see `ensemble_model`).

    verify_images: a VerifySet (e.g. `mnist_verify_set(...)`), uint8 images (N, 28, 28), or None for
    seeded random images. The fp32 model must match PyTorch within `tolerance` with identical argmax, else
    ExportError and nothing is written. With quantize="int8" the file at `out` is the int8 model; its
    agreement and accuracy against the fp32 export are reported, not enforced.
    """
    onnx = require("onnx", "onnx")
    require("onnx", "onnxscript")  # torch's ONNX exporter
    require("onnx", "onnxruntime")  # the check against PyTorch

    started = time.perf_counter()
    out = Path(out)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize {quantize!r}: unknown (choose {', '.join(QUANTIZATIONS)})")
    if not 7 <= opset <= 23:
        raise ExportError(f"opset {opset}: must be between 7 and 23 (default {DEFAULT_OPSET})")
    _check_writable(out, force)
    weights, module, info = _pixel_module([checkpoint] if isinstance(checkpoint, (str, Path)) else checkpoint)
    verify = _as_verify_set(verify_images)

    proto, exporter_used = _onnx_proto(module, opset, exporter)
    _set_metadata(proto, _metadata(weights, info, exporter_used))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # ValidationError or shape inference errors
        raise ExportError(f"{out}: exported graph fails onnx.checker: {first_line(exc)}") from None

    fp32_bytes = proto.SerializeToString()
    fp32_logits = _ort_logits(_ort_session(fp32_bytes))
    check = compare(_torch_logits(module), fp32_logits, verify)
    if not check.passes(tolerance):
        raise ExportError(_tolerance_message(out, check, tolerance))
    metadata = _metadata(weights, info, exporter_used, check)
    final_bytes = _sealed(proto, metadata)

    quantized_check = None
    if quantize == "int8":
        int8 = onnx.load_from_string(_quantize_int8(final_bytes))
        metadata["quantization"] = "int8 dynamic (onnxruntime.quantization.quantize_dynamic, QInt8 weights)"
        try:
            int8_logits = _ort_logits(_ort_session(int8.SerializeToString()))
        except Exception as exc:  # onnxruntime raises its own types for a graph it cannot load
            raise ExportError(f"{out}: int8 model does not load in onnxruntime: {first_line(exc)}") from None
        quantized_check = compare(fp32_logits, int8_logits, verify)
        metadata["verified_int8"] = (
            f"same class as fp32 on {quantized_check.argmax_agreement}/"
            f"{quantized_check.count} of {quantized_check.source}"
        )
        final_bytes = _sealed(int8, metadata)

    _write(out, final_bytes, force)
    return ExportReport(
        path=out,
        format="onnx",
        model=info.model,
        checkpoint=weights,
        exporter=exporter_used,
        opset=opset,
        size_bytes=len(final_bytes),
        tolerance=tolerance,
        check=check,
        quantize=quantize,
        quantized_check=quantized_check,
        metadata=metadata,
        seconds=time.perf_counter() - started,
    )


# ----------------------------------------------------------------------------------------------------------
# TorchScript
# ----------------------------------------------------------------------------------------------------------


def export_torchscript(
    checkpoint: str | Path,
    out: str | Path,
    verify_images: VerifySet | np.ndarray | None = None,
    tolerance: float = TOLERANCE,
    force: bool = False,
) -> ExportReport:
    """Trace a checkpoint to TorchScript (pixels in [0, 1] -> logits), reload it, verify it against the eager
    model, and write it atomically; the metadata travels as an extra file named digitlab.json.

    torch.jit is deprecated upstream (it still loads in C++ libtorch, which is its use here); prefer ONNX.
    """
    import torch

    started = time.perf_counter()
    out = Path(out)
    _check_writable(out, force)
    weights, model, info = _load_checkpoint(checkpoint)
    verify = _as_verify_set(verify_images)
    module = pixel_model(model, info.mean, info.std, info.temperature)

    exporter = f"torch.jit.trace (torch {torch.__version__})"
    example = _example_input()
    try:
        with _quiet_export(), torch.no_grad():
            traced = torch.jit.trace(module, example)
    except Exception as exc:
        raise ExportError(f"TorchScript export failed: {exc.__class__.__name__}: {first_line(exc)}") from None

    def archive(metadata: dict[str, str]) -> bytes:
        buffer = io.BytesIO()
        with _quiet_export():
            torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata, indent=2)})
        return buffer.getvalue()

    # Verify what a deployment will load: the saved archive, not the in-memory trace.
    with _quiet_export():
        reloaded = torch.jit.load(io.BytesIO(archive(_metadata(weights, info, exporter))), map_location="cpu")
    check = compare(_torch_logits(module), _torch_logits(reloaded), verify)
    if not check.passes(tolerance):
        raise ExportError(_tolerance_message(out, check, tolerance))
    metadata = _metadata(weights, info, exporter, check)
    final_bytes = archive(metadata)
    _write(out, final_bytes, force)
    return ExportReport(
        path=out,
        format="torchscript",
        model=info.model,
        checkpoint=weights,
        exporter=exporter,
        opset=None,
        size_bytes=len(final_bytes),
        tolerance=tolerance,
        check=check,
        metadata=metadata,
        seconds=time.perf_counter() - started,
    )


def export(
    checkpoint: str | Path | Sequence[str | Path],
    out: str | Path,
    format: str = "onnx",
    quantize: str | None = None,
    verify_images: VerifySet | np.ndarray | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
) -> ExportReport:
    """Export in the named format ("onnx" or "torchscript"); an existing `out` is replaced only with force."""
    if format == "onnx":
        return export_onnx(checkpoint, out, opset=opset, quantize=quantize, verify_images=verify_images, force=force)
    if format == "torchscript":
        if quantize is not None:
            raise ExportError("--quantize works with --format onnx only")
        if not isinstance(checkpoint, (str, Path)):
            if len(checkpoint) != 1:
                raise ExportError("an ensemble (several --checkpoint) exports to --format onnx only")
            checkpoint = checkpoint[0]
        return export_torchscript(checkpoint, out, verify_images=verify_images, force=force)
    raise ExportError(f"--format {format!r}: unknown (choose {' or '.join(FORMATS)})")


# ----------------------------------------------------------------------------------------------------------
# Deployment: run an exported .onnx with onnxruntime and numpy only (no torch)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ExportedInfo:
    """What an exported model says about itself, shaped like a checkpoint's info for `Predictor`.

    mean and std are None: the normalisation is inside the graph, so callers feed pixels in [0, 1].
    """

    model: str
    class_names: list[str]
    dataset: str = "mnist"
    metrics: dict[str, Any] = field(default_factory=dict)
    mean: float | None = None
    std: float | None = None


def _onnxruntime(what: str):
    """onnxruntime, or MissingExtra naming `pip install "digitlab[onnx]"` (`what`: the caller, unused)."""
    return require("onnx", "onnxruntime")


def onnx_providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for a --device value: CUDA when asked for (or auto and present), else CPU."""
    has_cuda = "CUDAExecutionProvider" in _onnxruntime("onnxruntime").get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda else ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        if not has_cuda:
            raise ExportError(f"--device {device}: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ExportError(f"--device {device!r}: an ONNX model runs on auto, cpu or cuda")


class OnnxModel:
    """An exported digit reader run by onnxruntime. Takes pixels in [0, 1] (N, 1, 28, 28); needs no torch."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: file not found" if not self.path.exists() else f"{self.path}: not a file")
        _onnxruntime(str(self.path))  # MissingExtra before the file is read
        try:
            model_bytes = self.path.read_bytes()
        except OSError as exc:
            raise ExportError(f"{self.path}: cannot read: {exc.strerror or exc.__class__.__name__}") from None
        try:
            self.session = _ort_session(model_bytes, providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ExportError(f"{self.path}: not a loadable ONNX model ({first_line(exc, 160)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or list(inputs[0].shape[1:]) != list(IMAGE_SHAPE):
            found = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise ExportError(
                f"{self.path}: not a digitlab export: expected one input '{INPUT_NAME}' "
                f"(batch, 1, 28, 28), found {found}"
            )
        self.output_name = outputs[0].name
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self._verify_digest(model_bytes)
        self.model_name = self.metadata.get("model", "onnx")
        self.class_names = self._class_names(outputs[0].shape)
        try:
            metrics = json.loads(self.metadata.get("checkpoint_metrics", "{}"))
        except ValueError:
            metrics = {}
        self.info = ExportedInfo(
            model=self.model_name,
            class_names=self.class_names,
            dataset=self.metadata.get("dataset", "mnist"),
            metrics=metrics if isinstance(metrics, dict) else {},
        )

    def _verify_digest(self, model_bytes: bytes) -> None:
        """The graph must hash to the digest recorded at export (exports without one, made by digitlab before it
        recorded digests, are not checked)."""
        expected = self.metadata.get(DIGEST_KEY)
        if expected is None:
            return
        try:
            actual = graph_digest(model_bytes)
        except ValueError as exc:
            raise ExportError(f"{self.path}: corrupt ONNX model ({exc})") from None
        if actual != expected:
            raise ExportError(
                f"{self.path}: corrupt ONNX model: the SHA-256 of its graph does not match the "
                f"{DIGEST_KEY} recorded at export (a damaged or modified file)"
            )

    def _class_names(self, output_shape: list) -> list[str]:
        try:
            names = json.loads(self.metadata["class_names"])
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                return names
        except (KeyError, ValueError):
            pass
        count = output_shape[-1] if isinstance(output_shape[-1], int) else 10
        return [str(k) for k in range(count)]

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """float32 pixels in [0, 1] (N, 1, 28, 28) -> logits (N, classes)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim == 3:
            pixels = pixels[:, None]  # (N, 28, 28) -> (N, 1, 28, 28)
        if pixels.ndim != 4 or pixels.shape[1:] != IMAGE_SHAPE:
            raise ExportError(f"{self.path}: input must be (N, 1, 28, 28), got {tuple(pixels.shape)}")
        return self.session.run([self.output_name], {INPUT_NAME: pixels})[0]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.logits(pixels)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exported model: ONNX metadata_props, or the digitlab.json inside a TorchScript file."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxModel(path).metadata
    import torch

    extra = {TORCHSCRIPT_METADATA: ""}
    try:
        with _quiet_export():
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise ExportError(f"{path}: not a loadable TorchScript file ({exc.__class__.__name__})") from None
    return json.loads(extra[TORCHSCRIPT_METADATA] or "{}")


__all__ = [
    "ExportError",
    "ExportReport",
    "Check",
    "VerifySet",
    "OnnxModel",
    "ExportedInfo",
    "onnx_providers",
    "export",
    "export_onnx",
    "export_torchscript",
    "mnist_verify_set",
    "synthetic_verify_set",
    "compare",
    "pixel_model",
    "read_metadata",
    "to_pixels",
    "FORMATS",
    "QUANTIZATIONS",
    "DEFAULT_OPSET",
    "TOLERANCE",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "BATCH_AXIS",
    "check_output",
    "graph_digest",
    "DIGEST_KEY",
]
