"""Choosing the device and the numeric precision: one rule for every command."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from .errors import DigitlabError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class DeviceError(DigitlabError, ValueError):
    """A device or precision that is unknown or not present."""


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda if present, else mps, else cpu. Asking for a missing device is an error, not a fallback."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise DeviceError(f"--device {name!r}: expected one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 is faster."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting (None = plain fp32).

    auto: bf16 on CPUs with native bf16 and on CUDA GPUs that support it, fp16 on other CUDA GPUs, else fp32.
    """
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise DeviceError("--precision fp16: not supported on CPU (use bf16 or fp32)")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
