"""Why the model read this digit: a 28x28 map of how much each input pixel pushed the answer towards the
predicted digit and away from the runner-up (the second most likely digit).

    result = integrated_gradients(model, x, mean, std)   # x: (28, 28) float in [0, 1], MNIST-like
    result.map        # (28, 28) float32: > 0 pushed towards result.digit, < 0 towards result.runner_up
    saliency_image(x, result)                             # a PIL picture of it, the digit in grey underneath

The method is integrated gradients (Sundararajan et al. 2017) on the margin logit[digit] - logit[runner-up],
from a black image (no ink) to the input, with `steps` points on the path run as one batch. Against a black
baseline a pixel without ink gets exactly 0, so the map lights up the strokes themselves: "because of these
strokes". Occlusion (blacking out patches) reads similarly but blurrier, and costs one forward pass per
patch position; integrated gradients cost one batched forward and backward pass (see docs/serving.md for
the measured ms). The map's sum equals the margin's change from the black image to the input (completeness),
so values are in logit units.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .pixels import model_input

DEFAULT_STEPS = 32


@dataclass
class Saliency:
    """A saliency map and the two digits it compares."""

    map: np.ndarray  # (28, 28) float32; > 0: towards `digit`, < 0: towards `runner_up`
    digit: int
    runner_up: int
    logits: np.ndarray  # (10,) float32 for the input itself


def integrated_gradients(
    model: Any,
    x: np.ndarray,
    mean: float | None = None,
    std: float | None = None,
    steps: int = DEFAULT_STEPS,
    device: Any = "cpu",
) -> Saliency:
    """Integrated gradients of logit[digit] - logit[runner-up] for one MNIST-like image (28, 28) in [0, 1].

    `model` is a torch module in eval mode taking normalised input (x - mean) / std of shape (N, 1, 28, 28);
    the pixels are used as they are (no preprocessing). Not thread-safe on a shared model: hold its lock.
    """
    import torch

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    pixels = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(1, 1, 28, 28)).to(device)

    def run(batch: torch.Tensor) -> torch.Tensor:
        return model(model_input(batch, mean, std)).float()

    with torch.inference_mode():
        logits = run(pixels)[0]
    order = torch.argsort(logits, descending=True)
    digit, runner_up = int(order[0]), int(order[1])
    # Midpoints of `steps` equal intervals on the straight path from black to x: one batch, one backward pass.
    alphas = (torch.arange(steps, dtype=torch.float32, device=device) + 0.5) / steps
    with torch.enable_grad():
        path = (alphas.view(-1, 1, 1, 1) * pixels).requires_grad_(True)
        out = run(path)
        margin = (out[:, digit] - out[:, runner_up]).sum()
        # autograd.grad, not backward(): nothing accumulates in the shared model's .grad
        (grads,) = torch.autograd.grad(margin, path)
    attribution = (pixels * grads.mean(dim=0, keepdim=True))[0, 0]
    return Saliency(
        map=attribution.detach().cpu().numpy().astype(np.float32),
        digit=digit,
        runner_up=runner_up,
        logits=logits.cpu().numpy().astype(np.float32),
    )


def saliency_image(x: np.ndarray, result: Saliency, scale: int = 8) -> Image.Image:
    """The digit in dim grey with the map over it: orange where pixels pushed towards the digit, blue where
    they pushed towards the runner-up; the stronger, the more opaque. Enlarged `scale` times, square pixels."""
    gray = np.clip(np.asarray(x, dtype=np.float32).reshape(28, 28), 0, 1) * 0.45
    rgb = np.repeat(gray[..., None], 3, axis=2)
    span = float(np.abs(result.map).max()) or 1.0
    strength = np.clip(np.abs(result.map) / span, 0, 1)[..., None] ** 0.7  # lift the weaker pixels a little
    colour = np.where(result.map[..., None] >= 0, np.array([1.0, 0.55, 0.1]), np.array([0.2, 0.55, 1.0]))
    rgb = rgb * (1 - strength) + colour * strength
    image = Image.fromarray(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), mode="RGB")
    return image.resize((28 * scale, 28 * scale), Image.Resampling.NEAREST)


def prepare_explain_dir(directory: Path) -> None:
    """Create the --explain folder; a DigitlabError names it when that fails."""
    from .errors import DigitlabError

    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DigitlabError(f"--explain {directory}: cannot create the folder ({exc.strerror or exc})") from None


def write_saliency_png(directory: Path, index: int, path: str | None, x: np.ndarray, result: Saliency) -> Path:
    """`saliency_image` as DIR/<index>-<input name>-<digit>-vs-<runner-up>.png, written crash-safely."""
    from .figures import write_png
    from .prediction import _safe_name

    target = Path(directory) / f"{index:05d}-{_safe_name(path)}-{result.digit}-vs-{result.runner_up}.png"
    return write_png(target, saliency_image(x, result))
