"""Checkpoints: weights in safetensors (loading can never run code) plus a JSON sidecar that says what they are.

A checkpoint named NAME in a run dir is two or three files:
    NAME.safetensors   the model's weights and buffers
    NAME.state.pt      optimizer, scheduler and RNG state for --resume, `last` only (loaded with weights_only=True)
    NAME.json          the sidecar: model name and config, normalisation, class names, temperature, epoch, metrics,
                       dataset MD5s, versions, and the manifest: the SHA-256 of the weights and of the state file
One checkpoint is one atomic unit. Every file is written to a temp file first; then the weights and the state are
renamed into place and the sidecar last: renaming the sidecar commits the checkpoint. Loading checks each file
against the SHA-256 its sidecar records, so a checkpoint torn by a kill between two renames (new weights beside
an old sidecar), a flipped bit or a truncated file is refused with a one-line error, never used. Temp files
that a kill left behind are removed by the next save of the same checkpoint. Every sidecar field is validated
(types, ranges, finite values, sizes bounded) before anything is allocated, and its errors name the sidecar.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from dataclasses import MISSING, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import __version__
from .errors import DigitlabError, first_line, message_lines
from .fileio import temp_pattern, write_temp
from .models import MODELS, build_model, model_config, model_name

FORMAT = "digitlab-checkpoint"
FORMAT_VERSION = 1
# Bounds on what a sidecar may ask for, so that a damaged or hostile sidecar cannot allocate unbounded memory:
MAX_LAYER_SIZE = 8192  # widest layer (MLP hidden) or most channels of a conv layer
MAX_CLASSES = 1000
MAX_NAME_LENGTH = 100  # characters in one class name
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(DigitlabError):
    """A checkpoint that cannot be used, with a one-line message naming the file."""


@dataclass
class CheckpointInfo:
    """The sidecar's content."""

    model: str
    model_config: dict[str, Any]
    mean: float | None
    std: float | None
    class_names: list[str]
    # Softmax temperature fitted on the validation split after training (calibration.py); 1.0 = none.
    temperature: float = 1.0
    dataset: str = "mnist"
    dataset_md5: dict[str, str] = field(default_factory=dict)
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    digitlab_version: str = __version__
    torch_version: str = torch.__version__
    created: str = ""
    # The manifest: SHA-256 of the weights file and of the state file ("" for no state file). Empty in
    # checkpoints written before digitlab recorded them: those load without the check.
    weights_sha256: str = ""
    state_sha256: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def paths(base: str | Path) -> tuple[Path, Path, Path]:
    """(weights, sidecar, state) paths for a checkpoint base path like runs/x/best."""
    base = Path(base)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    return base.with_suffix(".safetensors"), base.with_suffix(".json"), base.with_name(base.name + ".state.pt")


def save(
    base: str | Path,
    model: nn.Module,
    info: CheckpointInfo,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint as one atomic unit (see the module doc); returns the weights path.

    One writer per checkpoint at a time: the save removes the temp files of earlier, killed saves of it.
    """
    weights_path, sidecar_path, state_path = paths(base)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    info.model = model_name(model)
    info.model_config = model_config(model)
    info.created = datetime.now(UTC).isoformat(timespec="seconds")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    files = [(weights_path, safetensors_bytes(tensors, metadata={"format": FORMAT}))]
    info.weights_sha256 = _sha256(files[0][1])
    info.state_sha256 = ""
    if state is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        files.append((state_path, buffer.getvalue()))
        info.state_sha256 = _sha256(buffer.getvalue())
    text = json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n"
    files.append((sidecar_path, text.encode()))  # last: renaming the sidecar commits the checkpoint

    directory = weights_path.parent
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(weights_path, sidecar_path, state_path)
    temps: list[Path] = []
    try:
        for path, payload in files:
            temps.append(_write_temp(path, payload))
        for tmp, (path, _) in zip(temps, files):
            _rename(tmp, path)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return weights_path


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


_write_temp = write_temp  # `payload` in a new, fsynced temp file beside `path` (a name tests can replace)


def _rename(tmp: Path, path: Path) -> None:
    """One commit step of a save (a function of its own so that tests can inject a crash between two)."""
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    """Make the renames durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(*targets: Path) -> list[Path]:
    """Delete the temp files that a killed write of any of `targets` left beside it; returns them."""
    removed = []
    for target in targets:
        for tmp in Path(target).parent.glob(temp_pattern(Path(target))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def resolve(path: str | Path) -> Path:
    """A checkpoint given as a run dir (its best, else last), a .safetensors/.json file or a base path."""
    path = Path(path)
    if path.is_dir():
        for name in ("best", "last"):
            if (path / f"{name}.json").is_file():
                return path / f"{name}.safetensors"
        raise CheckpointError(f"{path}: no checkpoint in this directory (expected best.json or last.json)")
    weights, sidecar, _ = paths(path)
    if not sidecar.is_file():
        what = "file not found" if not weights.exists() else f"sidecar {sidecar.name} not found"
        raise CheckpointError(f"{path}: {what}")
    return weights


def read_info(path: str | Path) -> CheckpointInfo:
    """Read and validate a checkpoint's sidecar: every field's type and range; errors name the sidecar."""
    weights = resolve(path)
    _, sidecar, _ = paths(weights)
    try:
        raw = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{sidecar}: not a valid checkpoint sidecar ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar}: not a digitlab checkpoint sidecar")
    version = raw.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{sidecar}: format_version {_show(version)}: must be an integer >= 1")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{sidecar}: checkpoint format version {version} is newer than this digitlab supports "
            f"({FORMAT_VERSION}); upgrade digitlab"
        )
    required = [
        f.name
        for f in CheckpointInfo.__dataclass_fields__.values()
        if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [name for name in required if name not in raw]
    if missing:
        raise CheckpointError(f"{sidecar}: incomplete sidecar (missing {', '.join(missing)})")
    known = set(CheckpointInfo.__dataclass_fields__)
    info = CheckpointInfo(**{k: v for k, v in raw.items() if k in known})
    problem = _sidecar_problem(info)
    if problem:
        raise CheckpointError(f"{sidecar}: {problem}")
    return info


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _config_problem(name: str, config: Any) -> str | None:
    """What is wrong with a sidecar's model_config (for model `name`), or None."""
    if not isinstance(config, dict):
        return f"model_config {_show(config)}: must be an object"
    defaults = MODELS[name].config_cls()
    for key, value in config.items():
        if not hasattr(defaults, key):
            return f"model_config: model {name!r} has no field {key!r}"
        default = getattr(defaults, key)
        what = f"model_config.{key} {_show(value)}"
        limit = MAX_CLASSES if key == "num_classes" else MAX_LAYER_SIZE
        if key == "in_features":
            if value != default or not _is_int(value):
                return f"{what}: must be {default} (28x28 pixels)"
        elif _is_int(default):
            if not _is_int(value) or not 1 <= value <= limit:
                return f"{what}: must be an integer from 1 to {limit}"
        elif isinstance(default, tuple):
            if (
                not isinstance(value, (list, tuple))
                or len(value) != len(default)
                or not all(_is_int(v) and 1 <= v <= limit for v in value)
            ):
                return f"{what}: must be a list of {len(default)} integers from 1 to {limit}"
        elif type(value) is not type(default):
            return f"{what}: must be a {type(default).__name__}"
    return None


def _sidecar_problem(info: CheckpointInfo) -> str | None:
    """The first defect of a sidecar's content, as "field value: rule", or None."""
    if not isinstance(info.model, str) or info.model not in MODELS:
        return f"model {_show(info.model)}: unknown (known: {', '.join(MODELS)})"
    problem = _config_problem(info.model, info.model_config)
    if problem:
        return problem
    names = info.class_names
    if (
        not isinstance(names, list)
        or not 1 <= len(names) <= MAX_CLASSES
        or not all(isinstance(n, str) and 0 < len(n) <= MAX_NAME_LENGTH for n in names)
    ):
        return (
            f"class_names {_show(names)}: must be a list of 1 to {MAX_CLASSES} names "
            f"(non-empty strings of at most {MAX_NAME_LENGTH} characters)"
        )
    if len(set(names)) != len(names):
        return f"class_names {_show(names)}: names must be unique"
    outputs = info.model_config.get("num_classes", MODELS[info.model].config_cls().num_classes)
    if outputs != len(names):
        return f"class_names: {len(names)} names, but the model has {outputs} outputs (model_config.num_classes)"
    if (info.mean is None) != (info.std is None):
        return f"mean {_show(info.mean)}, std {_show(info.std)}: give both or neither"
    if info.mean is not None:
        if not _is_number(info.mean) or not 0 <= info.mean <= 1:
            return f"mean {_show(info.mean)}: must be a finite number from 0 to 1 (pixels are in [0, 1])"
        if not _is_number(info.std) or not 1e-3 <= info.std <= 1:
            return f"std {_show(info.std)}: must be a finite number from 0.001 to 1 (pixels are in [0, 1])"
    if not _is_number(info.temperature) or info.temperature <= 0:
        return f"temperature {_show(info.temperature)}: must be a finite number > 0"
    if not _is_int(info.epoch) or info.epoch < 0:
        return f"epoch {_show(info.epoch)}: must be an integer >= 0"
    for key in ("dataset", "digitlab_version", "torch_version", "created"):
        if not isinstance(getattr(info, key), str):
            return f"{key} {_show(getattr(info, key))}: must be a string"
    if not info.dataset:
        return "dataset: must not be empty"
    md5 = info.dataset_md5
    if not isinstance(md5, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in md5.items()):
        return f"dataset_md5 {_show(md5)}: must be an object of strings"
    for key in ("metrics", "train_config"):
        if not isinstance(getattr(info, key), dict):
            return f"{key} {_show(getattr(info, key))}: must be an object"
    for key in ("weights_sha256", "state_sha256"):
        value = getattr(info, key)
        if not isinstance(value, str) or (value and not _SHA256.fullmatch(value)):
            return f"{key} {_show(value)}: must be 64 lowercase hex digits"
    return None


def _read_verified(path: Path, expected: str, sidecar: Path, what: str) -> bytes:
    """A checkpoint file's bytes, checked against the SHA-256 its sidecar records (when it records one)."""
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found" if what != "weights" else f"{path}: file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc.__class__.__name__}") from None
    if expected and _sha256(payload) != expected:
        raise CheckpointError(
            f"{path}: truncated or corrupt {what}: SHA-256 differs from the one {sidecar.name} records "
            f"(a damaged file, or a save that was interrupted)"
        )
    return payload


def load(
    path: str | Path, expect_model: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointInfo]:
    """Build the model a checkpoint describes and load its weights; validates everything on the way."""
    weights = resolve(path)
    _, sidecar, _ = paths(weights)
    info = read_info(weights)
    if expect_model is not None and info.model != expect_model:
        raise CheckpointError(f"{weights}: checkpoint is a {info.model!r} model, expected {expect_model!r}")
    payload = _read_verified(weights, info.weights_sha256, sidecar, "weights")
    try:
        tensors = safetensors_load(payload)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: truncated or corrupt weights ({first_line(exc, 120)})") from None
    try:
        model = build_model(info.model, info.model_config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{sidecar}: {first_line(exc, 160)}") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        detail = (message_lines(exc)[1:2] or ["shape or key mismatch"])[0]  # line 1 names the model class only
        raise CheckpointError(
            f"{weights}: weights do not fit a {info.model!r} model (as {sidecar.name} describes it): {detail[:160]}"
        ) from None
    return model.to(device).eval(), info


def load_state(path: str | Path) -> dict[str, Any]:
    """The resume state of a checkpoint (optimizer, scheduler, RNG), checked against its sidecar."""
    weights = resolve(path)
    _, sidecar, state_path = paths(weights)
    info = read_info(weights)
    if info.weights_sha256 and not info.state_sha256:
        raise CheckpointError(f"{state_path}: resume state not found ({sidecar.name} lists none)")
    payload = _read_verified(state_path, info.state_sha256, sidecar, "resume state")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{state_path}: corrupt resume state ({exc.__class__.__name__})") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a checkpoint, in eval mode."""
    return load(path, device=device)[0]
