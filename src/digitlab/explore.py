"""`digitlab explore` (what is in a dataset) and `digitlab tour` (the classic tutorial, run and explained).

Both are teaching texts: they print what they compute next to the code that computes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.markup import escape
from torch import nn

from . import data
from .datafiles import DatasetSpec, get_spec
from .devices import resolve_device
from .errors import DigitlabError
from .figures import new_figure, save_png
from .models import build_model, count_parameters

GRID_SIDE = 8  # the --grid PNG shows GRID_SIDE x GRID_SIDE training images
TOUR_BATCH = 64  # the tutorial's batch size
TOUR_LR = 1e-3
RAMP = " .:-=+*#%@"  # dark to bright, for drawing a digit with characters


class ExploreError(DigitlabError, ValueError):
    """A bad option of `explore` or `tour`."""


def _console(console):
    if console is not None:
        return console
    from rich.console import Console

    return Console()


def _syntax(code: str):
    from rich.syntax import Syntax

    return Syntax(code.strip("\n"), "python", theme="ansi_dark", background_color="default")


def ascii_digit(image: torch.Tensor) -> str:
    """A (28, 28) uint8 image as text, two characters per pixel so it keeps its shape in a terminal."""
    levels = (image.to(torch.int64) * len(RAMP)) // 256  # (28, 28), 0..len(RAMP)-1
    return "\n".join("".join(RAMP[v] * 2 for v in row) for row in levels.tolist())


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A float image in [0, 1] of shape (1, 28, 28) back to uint8 (28, 28) for drawing."""
    return image.squeeze(0).mul(255).round().clamp(0, 255).to(torch.uint8).cpu()


# ----------------------------------------------------------------------------------------------------------
# explore
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ExploreSummary:
    """What `explore` found, for callers and tests; the printed text says the same."""

    title: str
    train_size: int
    test_size: int
    train_counts: list[int]
    test_counts: list[int]
    mean: float
    std: float
    index: int
    label: int
    grid: Path | None


def explore(
    data_dir: str | Path | None = None,
    dataset: str = "mnist",
    grid: str | Path | None = None,
    index: int = 0,
    seed: int = 0,
    console=None,
) -> ExploreSummary:
    """Print a dataset's sizes, what an item is, class counts, pixel statistics and one digit; optionally a grid PNG."""
    if grid is not None and Path(grid).suffix.lower() != ".png":
        raise ExploreError(f"--grid {grid}: the grid is a PNG image; give a name ending in .png")
    out = _console(console)
    spec = get_spec(dataset)
    started = time.perf_counter()
    mnist = data.load(data_dir, spec)
    seconds = time.perf_counter() - started
    train_set, test_set = data.datasets(mnist)
    if not 0 <= index < len(train_set):
        raise ExploreError(f"--index {index}: out of range (the training split has images 0-{len(train_set) - 1})")

    folder = Path(mnist.files["train_images"]).parent
    out.print(f"[bold]{spec.title}[/bold] from {escape(str(folder))} (loaded in {seconds:.2f} s)")
    out.print()
    _print_sizes(out, len(train_set), len(test_set))
    label = _print_item(out, train_set, index, spec)
    train_counts = data.class_counts(mnist.train_labels, len(spec.class_names))
    test_counts = data.class_counts(mnist.test_labels, len(spec.class_names))
    _print_class_counts(out, spec, train_counts, test_counts)
    mean, std = data.pixel_stats(mnist.train_images)
    _print_pixel_stats(out, spec, mean, std)
    _print_digit(out, mnist.train_images[index], f"train[{index}]: {_class_text(spec, label)}")

    written = None
    if grid is not None:
        written = write_grid(mnist, grid, seed)
        out.print(f"grid: wrote {escape(str(written))} ({GRID_SIDE * GRID_SIDE} training images, seed {seed})")
    return ExploreSummary(
        spec.title, len(train_set), len(test_set), train_counts, test_counts, mean, std, index, label, written
    )


def _class_text(spec: DatasetSpec, label: int) -> str:
    name = spec.class_names[label]
    return f"label {label}" if name == str(label) else f"label {label} ({name})"


def _print_sizes(out, train_size: int, test_size: int) -> None:
    out.print("[bold]Sizes[/bold]")
    out.print(f"  len(train_set) = {train_size}")
    out.print(f"  len(test_set)  = {test_size}")
    out.print()


def _print_item(out, train_set: data.MnistDataset, index: int, spec: DatasetSpec) -> int:
    """What indexing the Dataset returns, in the terms the tutorial uses."""
    item = train_set[index]
    image, label = item
    out.print(f"[bold]What an item is[/bold]: item = train_set[{index}]")
    out.print(f"  type(item)   {type(item).__name__}")
    out.print(f"  len(item)    {len(item)}: (image, label)")
    out.print(
        f"  image        {type(image).__name__}, shape {list(image.shape)}, dtype {image.dtype}, "
        f"values {float(image.min()):.1f} to {float(image.max()):.1f}"
    )
    out.print(
        f"  label        {type(label).__name__}, {label}"
        + (f" ({spec.class_names[label]})" if spec.class_names[label] != str(label) else "")
    )
    out.print("  (1 channel x 28 rows x 28 columns; bytes 0-255 on disk, divided by 255)")
    out.print()
    return label


def _print_class_counts(out, spec: DatasetSpec, train_counts: list[int], test_counts: list[int]) -> None:
    from rich.table import Table

    named = any(name != str(i) for i, name in enumerate(spec.class_names))
    table = Table(title="Class counts", title_justify="left", title_style="bold")
    table.add_column("class", justify="right")
    if named:
        table.add_column("name")
    table.add_column("train", justify="right")
    table.add_column("%", justify="right")
    table.add_column("test", justify="right")
    table.add_column("%", justify="right")
    n_train, n_test = max(sum(train_counts), 1), max(sum(test_counts), 1)
    for i, (a, b) in enumerate(zip(train_counts, test_counts)):
        cells = [str(i)] + ([spec.class_names[i]] if named else [])
        table.add_row(*cells, str(a), f"{100 * a / n_train:.1f}", str(b), f"{100 * b / n_test:.1f}")
    out.print(table)
    out.print()


def _print_pixel_stats(out, spec: DatasetSpec, mean: float, std: float) -> None:
    out.print("[bold]Pixel statistics[/bold] (training images, pixel / 255)")
    out.print(f"  mean {mean:.4f}  std {std:.4f}")
    out.print(f"  networks get (x - {spec.mean}) / {spec.std}: centred on 0, spread 1, which trains faster")
    out.print()


def _print_digit(out, image: torch.Tensor, title: str) -> None:
    from rich.panel import Panel
    from rich.text import Text

    out.print(Panel(Text(ascii_digit(image)), title=title, expand=False))


def write_grid(mnist: data.MnistData, path: str | Path, seed: int = 0) -> Path:
    """Write a labelled GRID_SIDE x GRID_SIDE grid of seeded random training images as a PNG, atomically."""
    path = Path(path)
    n = len(mnist.train_labels)
    picks = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: GRID_SIDE * GRID_SIDE].tolist()
    # One mosaic image in one axes: 64 separate axes take about a second longer to draw.
    height, width = mnist.train_images.shape[1:]
    cell_h, cell_w, label_h = height + 12, width + 4, 10  # each cell: a label strip above a padded digit
    mosaic = np.zeros((GRID_SIDE * cell_h, GRID_SIDE * cell_w), dtype=np.uint8)  # 0 draws as white (gray_r)
    fig = new_figure(figsize=(GRID_SIDE * 1.1, GRID_SIDE * 1.1 * cell_h / cell_w + 0.4), dpi=100)
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.98 - 0.4 / fig.get_figheight()))
    ax.axis("off")
    named = any(name != str(i) for i, name in enumerate(mnist.spec.class_names))
    for k, i in enumerate(picks):
        row, col = divmod(k, GRID_SIDE)
        top, left = row * cell_h + label_h, col * cell_w + 2
        mosaic[top : top + height, left : left + width] = mnist.train_images[i].numpy()
        label = int(mnist.train_labels[i])
        text = f"{label}: {mnist.spec.class_names[label]}" if named else str(label)
        ax.text(left + width / 2, top - 1.5, text, ha="center", va="bottom", fontsize=7 if named else 9)
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    fig.suptitle(
        f"{mnist.spec.title}: {len(picks)} training images with their labels (seed {seed})",
        y=1 - 0.1 / fig.get_figheight(),
        va="top",
    )
    try:
        save_png(fig, path)
    except OSError as exc:
        raise ExploreError(f"--grid {path}: cannot write: {exc.strerror or exc}") from None
    return path


# ----------------------------------------------------------------------------------------------------------
# tour
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TourResult:
    """What the tour computed, for callers and tests."""

    device: str
    batch_shape: list[int]  # [64, 1, 28, 28]
    logits_shape: list[int]  # [64, 10]
    parameters: int
    label: int  # the first image's true digit
    predicted_before: int
    predicted_after: int
    probs_before: list[float]
    probs_after: list[float]
    accuracy_before: float
    accuracy_after: float
    first_loss: float
    last_loss: float
    steps: int
    train_seconds: float


def tour(
    data_dir: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    steps: int = 300,
    console=None,
) -> TourResult:
    """The PyTorch quickstart on MNIST, step by step: data, batches, the network, a prediction, training."""
    if steps < 1:
        raise ExploreError(f"--steps {steps}: must be at least 1")
    out = _console(console)
    dev = resolve_device(device)
    torch.manual_seed(seed)  # the network's initial weights

    out.print(
        "[bold]The tutorial, run for real[/bold]: PyTorch's quickstart network reading MNIST digits, "
        f"one step at a time (device {dev}, seed {seed})."
    )
    images, labels, mnist = _step_load(out, data_dir, seed)
    model = _step_build(out, dev)
    images, labels = images.to(dev), labels.to(dev)
    logits = _step_forward(out, model, images)
    probs_before = _step_probabilities(out, logits[0], int(labels[0]), images[0], trained=False)
    accuracy_before = accuracy(model, mnist, dev)
    first_loss, last_loss, seconds = _step_train(out, model, mnist, dev, seed, steps)
    model.eval()
    with torch.no_grad():
        logits_after = model(images[:1])  # (1, 10)
    out.rule("[bold]Step 6. The same image again")
    probs_after = _step_probabilities(out, logits_after[0], int(labels[0]), images[0], trained=True)
    accuracy_after = accuracy(model, mnist, dev)
    out.print(
        f"Test accuracy: [bold]{accuracy_after:.1%}[/bold] of the {len(mnist.test_labels):,} test images, "
        f"which the network never trained on (untrained it was {accuracy_before:.1%}: about one in ten is "
        "chance)."
    )
    out.print()
    _step_next(out)
    return TourResult(
        device=str(dev),
        batch_shape=list(images.shape),
        logits_shape=list(logits.shape),
        parameters=count_parameters(model),
        label=int(labels[0]),
        predicted_before=max(range(10), key=probs_before.__getitem__),
        predicted_after=max(range(10), key=probs_after.__getitem__),
        probs_before=probs_before,
        probs_after=probs_after,
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        first_loss=first_loss,
        last_loss=last_loss,
        steps=steps,
        train_seconds=seconds,
    )


def _step_load(out, data_dir, seed: int):
    """Step 1: the tutorial's way, a Dataset of (image, label) items batched by a DataLoader."""
    from torch.utils.data import DataLoader

    out.rule("[bold]Step 1. Load the data and batch it")
    out.print(
        _syntax("""
from torch.utils.data import DataLoader
from digitlab import data

mnist = data.load()                         # 70,000 images as uint8 tensors
train_set, test_set = data.datasets(mnist)  # Datasets: item = (image, label)
train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
images, labels = next(iter(train_loader))   # the first batch
""")
    )
    mnist = data.load(data_dir)
    train_set, test_set = data.datasets(mnist)
    loader = DataLoader(train_set, batch_size=TOUR_BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    images, labels = next(iter(loader))  # (64, 1, 28, 28) float in [0, 1], (64,) int64
    image, label = train_set[0]
    out.print(f"len(train_set) = {len(train_set):,}   len(test_set) = {len(test_set):,}")
    out.print(
        f"train_set[0] is a tuple: an image of shape {list(image.shape)} ({image.dtype}, values 0 to 1) "
        f"and the label {label}"
    )
    out.print(
        f"images.shape = {list(images.shape)}   labels.shape = {list(labels.shape)}   "
        f"labels[:16] = {labels[:16].tolist()}"
    )
    out.print(
        f"The DataLoader stacks {TOUR_BATCH} items into one tensor: \\[batch, channel, height, width]. "
        "Networks work on batches, because one big matrix product is much faster than many small ones."
    )
    out.print()
    return images, labels, mnist


def _step_build(out, dev: torch.device) -> nn.Module:
    """Step 2: the tutorial's network and where its parameters are."""
    from rich.table import Table

    out.rule("[bold]Step 2. Build the network")
    out.print(
        _syntax("""
# digitlab.models.build_model("mlp") builds the tutorial's network:
model = nn.Sequential(nn.Flatten(),
                      nn.Linear(28 * 28, 512), nn.ReLU(),
                      nn.Linear(512, 512), nn.ReLU(),
                      nn.Linear(512, 10))
""")
    )
    model = build_model("mlp").to(dev)
    out.print(str(model))
    table = Table(
        title="Parameters: a weight for every input of every unit, plus a bias per unit", title_justify="left"
    )
    table.add_column("layer")
    table.add_column("weights + biases", justify="right")
    table.add_column("parameters", justify="right")
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            table.add_row(
                f"{name}: Linear({layer.in_features}, {layer.out_features})",
                f"{layer.in_features} x {layer.out_features} + {layer.out_features}",
                f"{count_parameters(layer):,}",
            )
    table.add_row("total", "", f"[bold]{count_parameters(model):,}[/bold]")
    out.print(table)
    out.print("The weights start random (seeded by --seed): the network knows nothing yet.")
    out.print()
    return model


def _step_forward(out, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Step 3: one batch through the network."""
    out.rule("[bold]Step 3. Run one batch through it")
    out.print(_syntax("logits = model(images)"))
    with torch.no_grad():
        logits = model(images)  # (64, 10)
    out.print(f"input shape  {list(images.shape)}")
    out.print(f"output shape {list(logits.shape)}")
    out.print(
        "Flatten turns each 1x28x28 image into 784 numbers; the Linear layers map 784 -> 512 -> 512 -> 10. "
        "Out come 10 numbers per image, the logits: one raw score per digit, any size, any sign."
    )
    out.print(f"logits[0] = {[round(v, 3) for v in logits[0].tolist()]}")
    out.print()
    return logits


def _step_probabilities(out, logits: torch.Tensor, label: int, image: torch.Tensor, trained: bool) -> list[float]:
    """Steps 4 and 6: softmax turns the first image's logits into probabilities; compare with the truth."""
    from rich.table import Table

    if not trained:
        out.rule("[bold]Step 4. From logits to a prediction")
        out.print(
            _syntax("""
probs = torch.softmax(logits[0], dim=0)  # 10 numbers > 0, summing to 1
predicted = probs.argmax().item()        # the most probable digit
""")
        )
        _print_digit(out, _to_uint8(image), f"images[0]: the digit {label}")
    probs = F.softmax(logits.float(), dim=0).cpu()  # (10,)
    predicted = int(probs.argmax())
    table = Table(show_header=True, box=None)
    table.add_column("digit", justify="right")
    table.add_column("probability", justify="right")
    table.add_column("", min_width=30, no_wrap=True)
    table.add_column("", no_wrap=True)
    for digit, p in enumerate(probs.tolist()):
        mark = " and ".join(
            word for word, hit in (("predicted", digit == predicted), ("actual", digit == label)) if hit
        )
        table.add_row(str(digit), f"{p:.3f}", "#" * round(p * 30), mark)
    out.print(table)
    verdict = "right" if predicted == label else "wrong"
    out.print(f"predicted {predicted}, actual {label}: [bold]{verdict}[/bold]")
    if not trained:
        if predicted == label:
            out.print(
                "Right, but by luck: with random weights the scores are noise, every probability is near 0.1, "
                "and a guess is right about one time in ten. Training is what gives the scores meaning."
            )
        else:
            out.print(
                "Wrong, as expected: with random weights the scores are noise, every probability is near 0.1, "
                "and a guess is right only about one time in ten. Training is what gives the scores meaning."
            )
    else:
        out.print(
            f"After training the network puts {float(probs[label]):.1%} on the right digit (it was about 10% before)."
        )
    out.print()
    return probs.tolist()


def _step_train(
    out, model: nn.Module, mnist: data.MnistData, dev: torch.device, seed: int, steps: int
) -> tuple[float, float, float]:
    """Step 5: the tutorial's training step, repeated `steps` times on batches of 64."""
    from rich.table import Table

    out.rule("[bold]Step 5. Train briefly")
    out.print(
        _syntax(f"""
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr={TOUR_LR})
for images, labels in loader:       # {steps} batches of 64
    logits = model(images)          # forward: scores for the batch
    loss = loss_fn(logits, labels)  # one number: how wrong they are
    optimizer.zero_grad()           # clear the last step's gradients
    loss.backward()                 # gradient of the loss for each parameter
    optimizer.step()                # move each parameter against its gradient
""")
    )
    out.print(
        "The batches now come from digitlab's BatchLoader: the whole training set is already one tensor in "
        "memory, so it slices each shuffled batch out of it instead of building it item by item like the "
        "DataLoader. Same batches (64 images in [0, 1], reshuffled every epoch), many times faster. The "
        "tutorial uses SGD for 5 epochs; Adam gets most of the way in a few hundred steps."
    )
    # normalize=False: the same [0, 1] pixels the DataLoader gave the network in steps 1-4.
    loader = data.BatchLoader(
        mnist.train_images, mnist.train_labels, batch_size=TOUR_BATCH, seed=seed, normalize=False, device=dev
    )
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=TOUR_LR)
    report_at = sorted({1, *(round(steps * k / 5) for k in range(1, 6))} - {0})
    table = Table(box=None)
    table.add_column("step", justify="right")
    table.add_column("loss (mean since last row)", justify="right")
    table.add_column("seconds", justify="right")
    model.train()
    losses: list[torch.Tensor] = []
    started = time.perf_counter()
    step, epoch, last_row = 0, 0, 0
    while step < steps:
        loader.set_epoch(epoch)
        for images, labels in loader:
            logits = model(images)  # (64, 10)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())  # no .item() per step: that would wait for the GPU every time
            step += 1
            if step in report_at:
                window = torch.stack(losses[last_row:step]).mean().item()
                table.add_row(str(step), f"{window:.4f}", f"{time.perf_counter() - started:.2f}")
                last_row = step
            if step == steps:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    out.print(table)
    first, last = losses[0].item(), losses[-1].item()
    out.print(
        f"{steps} steps ({steps * TOUR_BATCH:,} images, {steps * TOUR_BATCH / len(mnist.train_labels):.2f} "
        f"epochs) in {seconds:.1f} s on {dev}. The loss fell from {first:.3f} to {last:.3f}; "
        f"a network guessing uniformly scores ln(10) = 2.303."
    )
    out.print()
    return first, last, seconds


def accuracy(model: nn.Module, mnist: data.MnistData, dev: torch.device, chunk: int = 2000) -> float:
    """Fraction of the test images the model reads correctly (inputs in [0, 1], as in the tour)."""
    from .evaluation import predict_logits

    logits = predict_logits(model, mnist.test_images, None, None, dev, batch_size=chunk)  # (N, 10) on the CPU
    model.train()
    return int((logits.argmax(1) == mnist.test_labels.cpu()).sum()) / max(len(mnist.test_labels), 1)


def _step_next(out) -> None:
    out.rule("[bold]Next")
    out.print("digitlab train               this network, trained properly, with checkpoints")
    out.print("digitlab train --model cnn   a small convolutional network, more accurate")
    out.print("digitlab evaluate --checkpoint RUN   scores per class, the worst mistakes")
    out.print("digitlab serve --checkpoint RUN      draw a digit, watch the network read it")
