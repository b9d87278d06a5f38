"""Checkpoints: weights in safetensors (loading can never run code) plus a JSON sidecar that says what they are.

A checkpoint named NAME in a run dir is three files:
    NAME.safetensors   the model's weights and buffers
    NAME.json          model name and config, normalisation, class names, epoch, metrics, dataset MD5s, versions
    NAME.state.pt      optimizer, scheduler and RNG state for --resume (tensors only: loaded with weights_only=True)
Each is written to a temp file and renamed; the sidecar is written last, so a checkpoint whose sidecar exists
is complete.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import __version__
from .errors import DigitlabError
from .idx import atomic_write_bytes
from .models import build_model, model_config, model_name

FORMAT = "digitlab-checkpoint"
FORMAT_VERSION = 1


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
    dataset: str = "mnist"
    dataset_md5: dict[str, str] = field(default_factory=dict)
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    digitlab_version: str = __version__
    torch_version: str = torch.__version__
    created: str = ""
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
    """Write a checkpoint crash-safely; returns the weights path."""
    weights_path, sidecar_path, state_path = paths(base)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    info.model = model_name(model)
    info.model_config = model_config(model)
    info.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(weights_path, safetensors_bytes(tensors, metadata={"format": FORMAT}))
    if state is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(state_path, buffer.getvalue())
    text = json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(sidecar_path, text.encode())
    return weights_path


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
    """Read and validate a checkpoint's sidecar."""
    weights = resolve(path)
    _, sidecar, _ = paths(weights)
    try:
        raw = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{sidecar}: not a valid checkpoint sidecar ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar}: not a digitlab checkpoint sidecar")
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{sidecar}: checkpoint format version {version} is newer than this digitlab supports "
            f"({FORMAT_VERSION}); upgrade digitlab")
    known = set(CheckpointInfo.__dataclass_fields__)
    try:
        return CheckpointInfo(**{k: v for k, v in raw.items() if k in known})
    except TypeError as exc:
        raise CheckpointError(f"{sidecar}: incomplete sidecar ({exc})") from None


def load(path: str | Path, expect_model: str | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointInfo]:
    """Build the model a checkpoint describes and load its weights; validates everything on the way."""
    weights = resolve(path)
    info = read_info(weights)
    if expect_model is not None and info.model != expect_model:
        raise CheckpointError(f"{weights}: checkpoint is a {info.model!r} model, expected {expect_model!r}")
    try:
        model = build_model(info.model, info.model_config)
    except ValueError as exc:
        raise CheckpointError(f"{weights}: {exc}") from None
    try:
        tensors = load_file(str(weights))
    except FileNotFoundError:
        raise CheckpointError(f"{weights}: file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: truncated or corrupt weights ({str(exc).splitlines()[0][:120]})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = [line.strip() for line in str(exc).splitlines() if line.strip()][1:2] or ["shape or key mismatch"]
        raise CheckpointError(f"{weights}: weights do not fit a {info.model!r} model: {first[0][:160]}") from None
    return model.to(device).eval(), info


def load_state(path: str | Path) -> dict[str, Any]:
    """The resume state of a checkpoint (optimizer, scheduler, RNG)."""
    _, _, state_path = paths(resolve(path))
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{state_path}: resume state not found") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{state_path}: corrupt resume state ({exc.__class__.__name__})") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a checkpoint, in eval mode."""
    return load(path, device=device)[0]
