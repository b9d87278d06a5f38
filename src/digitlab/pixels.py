"""Pixels to model input, computed in one place for training, evaluation, prediction and export.

uint8 pixels (0-255) are divided by 255 in float32; float pixels are taken as already in [0, 1]; then, when the
checkpoint gives both, (x - mean) / std. numpy arrays stay numpy (so the ONNX path needs no torch) and torch
tensors stay torch tensors on their device (and trace into an exported graph). float32 arithmetic either way,
with the constants rounded to float32 first, so numpy and torch on the CPU give bit-identical results.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def model_input(pixels: Any, mean: float | None = None, std: float | None = None) -> Any:
    """uint8 0-255 or float in [0, 1] -> float32 in [0, 1], then (x - mean) / std when mean and std are given.

    The shape is kept; a numpy array (or anything numpy takes) gives a numpy array, a torch tensor a tensor on
    the same device. The caller's data is never modified (a float32 input with no normalisation is returned as
    it is)."""
    normalise = mean is not None and std is not None
    if hasattr(pixels, "is_floating_point"):  # a torch tensor: torch is already imported
        import torch

        if pixels.dtype == torch.uint8:
            x = pixels.float().div_(255.0)  # a fresh tensor: normalised in place, saving a copy of MNIST
            return x.sub_(mean).div_(std) if normalise else x
        x = pixels if pixels.dtype == torch.float32 else pixels.float()  # nothing added to a traced graph
        return (x - mean) / std if normalise else x  # not in place: x may be the caller's tensor
    x = np.asarray(pixels)
    x = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
    return (x - np.float32(mean)) / np.float32(std) if normalise else x


__all__ = ["model_input"]
