"""Evaluation: accuracy and loss, per-class precision/recall/F1, the confusion matrix, the worst mistakes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import data
from .devices import autocast, resolve_device
from .errors import DigitlabError
from .figures import new_figure, save_png

SPLITS = ("test", "val", "train")


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    logits: torch.Tensor  # (N, classes) float32 on the CPU


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, mean: float | None, std: float | None,
                   device: torch.device, amp_dtype: torch.dtype | None = None, batch_size: int = 1000) -> torch.Tensor:
    """Logits for uint8 images (N, 28, 28), in batches."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        x = data.to_input(images[start:start + batch_size], mean, std).to(device)  # (B, 1, 28, 28)
        with autocast(device, amp_dtype):
            outputs.append(model(x).float().cpu())  # (B, classes)
    return torch.cat(outputs) if outputs else torch.empty(0, 10)


def evaluate_tensors(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: float | None,
                     std: float | None, device: torch.device, amp_dtype: torch.dtype | None = None) -> EvalResult:
    logits = predict_logits(model, images, mean, std, device, amp_dtype)
    labels = labels.cpu()
    return EvalResult(loss=float(F.cross_entropy(logits, labels)),
                      accuracy=float((logits.argmax(1) == labels).float().mean()), logits=logits)


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
    """What `digitlab evaluate` measured."""

    checkpoint: str
    model: str
    dataset: str
    split: str
    count: int
    accuracy: float
    loss: float
    per_class: list[dict[str, Any]]
    confusion: list[list[int]]
    class_names: list[str]
    mistakes: list[dict[str, Any]] = field(default_factory=list)  # worst first
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def split_images(dataset: data.MnistData, split: str, train_config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of a split; val/train are re-derived from the run's own val_size and seed."""
    if split not in SPLITS:
        raise DigitlabError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if split == "test":
        return dataset.test_images, dataset.test_labels
    (train_x, train_y), (val_x, val_y) = data.split_train_val(
        dataset.train_images, dataset.train_labels, int(train_config.get("val_size", 5000)),
        int(train_config.get("seed", 0)))
    if split == "val" and len(val_y) == 0:
        raise DigitlabError("--split val: this checkpoint was trained without a validation set (val_size 0)")
    return (val_x, val_y) if split == "val" else (train_x, train_y)


def evaluate(
    checkpoint: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    device: str = "auto",
    out_dir: str | Path | None = None,
    worst: int = 36,
    plots: bool = True,
) -> Report:
    """Evaluate a checkpoint on a split of the dataset it was trained on; optionally write the two plots."""
    model, info = ckpt.load(checkpoint)
    dev = resolve_device(device)
    model = model.to(dev)
    dataset = data.load(data_dir, info.dataset)
    images, labels = split_images(dataset, split, info.train_config)
    result = evaluate_tensors(model, images, labels, info.mean, info.std, dev)
    probabilities = result.logits.softmax(1)
    predicted = probabilities.argmax(1)
    confusion = confusion_matrix(labels, predicted, len(info.class_names))
    wrong = (predicted != labels).nonzero().flatten()
    confidence = probabilities[wrong, predicted[wrong]]
    order = wrong[confidence.argsort(descending=True)][:worst]  # most confident mistakes first
    mistakes = [{"index": int(i), "true": int(labels[i]), "predicted": int(predicted[i]),
                 "confidence": float(probabilities[i, predicted[i]])} for i in order]
    report = Report(
        checkpoint=str(ckpt.resolve(checkpoint)), model=info.model, dataset=info.dataset, split=split,
        count=len(labels), accuracy=result.accuracy, loss=result.loss,
        per_class=per_class_scores(confusion, info.class_names), confusion=confusion.tolist(),
        class_names=list(info.class_names), mistakes=mistakes)
    if plots:
        out = Path(out_dir) if out_dir else ckpt.resolve(checkpoint).parent
        out.mkdir(parents=True, exist_ok=True)
        report.files["confusion"] = str(plot_confusion(report, out / "confusion.png"))
        report.files["mistakes"] = str(plot_mistakes(report, images, out / "mistakes.png"))
    return report


def plot_confusion(report: Report, path: Path) -> Path:
    n = len(report.class_names)
    matrix = torch.tensor(report.confusion, dtype=torch.float64)
    fig = new_figure(figsize=(7, 6))
    ax = fig.subplots()
    # Log scale: the diagonal (~1000) would otherwise hide the handful of mistakes off it.
    image = ax.imshow((matrix + 1).log10(), cmap="Blues")
    for i in range(n):
        for j in range(n):
            value = int(matrix[i, j])
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                        color="white" if i == j else "black")
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
        ax.set_title(f"true {report.class_names[m['true']]}\npred {report.class_names[m['predicted']]} "
                     f"{m['confidence']:.0%}", fontsize=8)
    if not shown:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("most confident mistakes", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)
