"""Evaluation: accuracy and loss, per-class precision/recall/F1, the confusion matrix, the worst mistakes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import calibration, data, extras
from . import checkpoint as ckpt
from .devices import autocast, resolve_device
from .errors import DigitlabError
from .figures import new_figure, save_png
from .tta import averaged as tta_average

SPLITS = ("test", "val", "train")


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    logits: torch.Tensor  # (N, classes) float32 on the CPU


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    mean: float | None,
    std: float | None,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Logits for uint8 images (N, 28, 28), in batches."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        x = data.to_input(images[start : start + batch_size], mean, std).to(device)  # (B, 1, 28, 28)
        with autocast(device, amp_dtype):
            outputs.append(model(x).float().cpu())  # (B, classes)
    return torch.cat(outputs) if outputs else torch.empty(0, 10)


def evaluate_tensors(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: float | None,
    std: float | None,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> EvalResult:
    logits = predict_logits(model, images, mean, std, device, amp_dtype)
    labels = labels.cpu()
    return EvalResult(
        loss=float(F.cross_entropy(logits, labels)),
        accuracy=float((logits.argmax(1) == labels).float().mean()),
        logits=logits,
    )


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true, predicted) counts: row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_scores(confusion: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    scores = []
    for k, name in enumerate(class_names):
        tp = int(confusion[k, k])
        predicted, actual = int(confusion[:, k].sum()), int(confusion[k, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": actual})
    return scores


@dataclass
class Report:
    """What `digitlab evaluate` measured. Probabilities are calibrated (each member's temperature applied;
    an ensemble averages its members' probabilities)."""

    checkpoint: str  # the checkpoints, joined by ", " for an ensemble
    model: str
    dataset: str
    split: str
    count: int
    accuracy: float
    loss: float  # the negative log-likelihood of the calibrated probabilities
    ece: float  # expected calibration error, 15 equal-width bins (a fraction)
    temperature: float | list[float]  # each member's
    per_class: list[dict[str, Any]]
    confusion: list[list[int]]
    class_names: list[str]
    selective: list[dict[str, float]] = field(default_factory=list)  # what --reject-below T keeps and scores
    mistakes: list[dict[str, Any]] = field(default_factory=list)  # worst first
    files: dict[str, str] = field(default_factory=dict)
    tta: bool = False  # each member averaged over five shifted views (tta.py)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def split_images(
    dataset: data.MnistData, split: str, train_config: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of a split; val/train are re-derived from the run's own val_size and seed."""
    if split not in SPLITS:
        raise DigitlabError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if split == "test":
        return dataset.test_images, dataset.test_labels
    (train_x, train_y), (val_x, val_y) = data.split_train_val(
        dataset.train_images,
        dataset.train_labels,
        int(train_config.get("val_size", 5000)),
        int(train_config.get("seed", 0)),
    )
    if split == "val" and len(val_y) == 0:
        raise DigitlabError("--split val: this checkpoint was trained without a validation set (val_size 0)")
    return (val_x, val_y) if split == "val" else (train_x, train_y)


def _as_paths(checkpoint: str | Path | Sequence[str | Path]) -> list[str | Path]:
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    if not paths:
        raise DigitlabError("--checkpoint: give at least one checkpoint")
    return paths


def _check_members(infos: list[ckpt.CheckpointInfo], paths: list[str | Path]) -> None:
    """Ensemble members must read the same dataset with the same classes."""
    first = infos[0]
    for info, path in zip(infos[1:], paths[1:]):
        if info.dataset != first.dataset or list(info.class_names) != list(first.class_names):
            raise DigitlabError(
                f"{path}: an ensemble needs members trained on the same dataset and classes "
                f"({info.dataset} vs {first.dataset})"
            )


def evaluate(
    checkpoint: str | Path | Sequence[str | Path],
    data_dir: str | Path | None = None,
    split: str = "test",
    device: str = "auto",
    out_dir: str | Path | None = None,
    worst: int = 36,
    plots: bool = True,
    tta: bool = False,
) -> Report:
    """Evaluate a checkpoint, or an ensemble of them (a list: their calibrated probabilities are averaged),
    on a split of the dataset it was trained on; optionally write the plots. tta: average each member over
    the image and four one-pixel shifts of it (tta.py)."""
    paths = _as_paths(checkpoint)
    members = [ckpt.load(path) for path in paths]
    infos = [info for _, info in members]
    _check_members(infos, paths)
    info = infos[0]
    dev = resolve_device(device)
    dataset = data.load(data_dir, info.dataset)
    images, labels = split_images(dataset, split, info.train_config)
    probabilities = torch.zeros(len(labels), len(info.class_names), dtype=torch.float64)
    for model, member in members:
        model = model.to(dev)

        def member_probabilities(views: torch.Tensor, model=model, member=member) -> torch.Tensor:
            logits = predict_logits(model, views, member.mean, member.std, dev)
            return torch.from_numpy(calibration.softmax(logits.numpy(), member.temperature))

        probabilities += tta_average(member_probabilities, images) if tta else member_probabilities(images)
    probabilities /= len(members)
    predicted = probabilities.argmax(1)
    right_probability = probabilities[torch.arange(len(labels)), labels].clamp_min(1e-12)
    confusion = confusion_matrix(labels, predicted, len(info.class_names))
    wrong = (predicted != labels).nonzero().flatten()
    confidence = probabilities[wrong, predicted[wrong]]
    order = wrong[confidence.argsort(descending=True)][:worst]  # most confident mistakes first
    mistakes = [
        {
            "index": int(i),
            "true": int(labels[i]),
            "predicted": int(predicted[i]),
            "confidence": float(probabilities[i, predicted[i]]),
        }
        for i in order
    ]
    as_numpy = probabilities.numpy(), labels.numpy()
    report = Report(
        checkpoint=", ".join(str(ckpt.resolve(p)) for p in paths),
        model=info.model if len(members) == 1 else "ensemble of " + " + ".join(i.model for i in infos),
        dataset=info.dataset,
        split=split,
        count=len(labels),
        accuracy=float((predicted == labels).double().mean()) if len(labels) else 0.0,
        loss=float(-right_probability.log().mean()) if len(labels) else 0.0,
        ece=calibration.expected_calibration_error(*as_numpy),
        temperature=info.temperature if len(members) == 1 else [i.temperature for i in infos],
        per_class=per_class_scores(confusion, info.class_names),
        confusion=confusion.tolist(),
        class_names=list(info.class_names),
        selective=calibration.selective_accuracy(*as_numpy),
        mistakes=mistakes,
        tta=tta,
    )
    if plots and not extras.plots_available():
        extras.plots_skipped(["confusion.png", "mistakes.png", "reliability.png"])
    elif plots:
        out = Path(out_dir) if out_dir else ckpt.resolve(paths[0]).parent
        out.mkdir(parents=True, exist_ok=True)
        report.files["confusion"] = str(plot_confusion(report, out / "confusion.png"))
        report.files["mistakes"] = str(plot_mistakes(report, images, out / "mistakes.png"))
        report.files["reliability"] = str(plot_reliability(report, *as_numpy, out / "reliability.png"))
    return report


def plot_reliability(report: Report, probabilities: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """The reliability diagram: accuracy against confidence per bin (a calibrated model follows the diagonal),
    and how many answers each bin holds."""
    table = calibration.reliability(probabilities, labels)
    fig = new_figure(figsize=(9, 4))
    ax, ax_count = fig.subplots(1, 2)
    width = 1 / len(table)
    used = [b for b in table if b.count]
    ax.bar(
        [b.low for b in used],
        [b.accuracy for b in used],
        width=width,
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    ax.plot([b.confidence for b in used], [b.confidence for b in used], "r.", label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability: ECE {report.ece:.4f}")
    ax.legend(loc="upper left", fontsize=8)
    ax_count.bar([b.low for b in table], [max(b.count, 0) for b in table], width=width, align="edge", edgecolor="black")
    ax_count.set_yscale("log")
    ax_count.set_xlim(0, 1)
    ax_count.set_xlabel("confidence")
    ax_count.set_title("answers per bin (log scale)")
    fig.tight_layout()
    return save_png(fig, path, dpi=100)


def plot_confusion(report: Report, path: Path) -> Path:
    n = len(report.class_names)
    matrix = torch.tensor(report.confusion, dtype=torch.float64)
    fig = new_figure(figsize=(7, 6))
    ax = fig.subplots()
    # Log scale: the diagonal (~1000) would otherwise hide the handful of mistakes off it.
    image = ax.imshow((matrix + 1).log10().numpy(), cmap="Blues")
    for i in range(n):
        for j in range(n):
            value = int(matrix[i, j])
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color="white" if i == j else "black")
    ax.set_xticks(range(n), report.class_names, rotation=45 if n and len(report.class_names[0]) > 2 else 0)
    ax.set_yticks(range(n), report.class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{report.model} on {report.dataset} {report.split}: {report.accuracy:.2%}")
    fig.colorbar(image, ax=ax, label="log10(count + 1)")
    fig.tight_layout()
    return save_png(fig, path, dpi=100)


def plot_mistakes(report: Report, images: torch.Tensor, path: Path) -> Path:
    shown = report.mistakes
    cols = 6
    rows = max(1, -(-len(shown) // cols))
    fig = new_figure(figsize=(cols * 1.6, rows * 1.9))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, shown):
        ax.imshow(images[m["index"]].numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"true {report.class_names[m['true']]}\npred {report.class_names[m['predicted']]} {m['confidence']:.0%}",
            fontsize=8,
        )
    if not shown:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("most confident mistakes", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)
