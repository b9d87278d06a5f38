"""Draw the figures of docs/preprocessing.md from real MNIST test digits rendered as users' photos.

    python benchmarks/make_preprocessing_figures.py --data ../shared/datasets/mnist [--out docs/img]

Writes preprocessing-stages.png (each step of the pipeline on four pictures), preprocessing-userlike.png
(MNIST digits, the user-like photos made from them, and what preprocessing gives back) and
preprocessing-hard.png (each hard variant: the picture, the ink kept as the digit, the 28x28 result).
Deterministic: the same seeds give the same pictures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from common import add_data_option, mnist_test_set  # noqa: E402
from digitlab.figures import save_png  # noqa: E402
from digitlab.preprocessing import load_image, preprocess, preprocess_stages  # noqa: E402
from userlike import hard_variants, make_userlike, render  # noqa: E402

STAGE_TITLES = {
    "grayscale": "grayscale",
    "polarity": "ink made bright",
    "background": "background\n(lighting, shadow)",
    "flattened": "lighting\nflattened",
    "denoised": "noise and\npaper removed",
    "digit": "the digit\n(specks, edges out)",
    "cropped": "cropped",
    "scaled": "longer side\n20 px",
    "final": "28x28, centre\nof mass centred",
}
# Test images whose user-like renders show the steps well: a shadow across the page, the table beyond the
# page's edge, a scan app's crop with transparent corners.
STAGE_EXAMPLES = (17, 31, 25)


def _rgb(image: Image.Image) -> np.ndarray:
    """For display: transparency over a checkerboard, so it shows."""
    image = image.convert("RGBA")
    w, h = image.size
    ys, xs = np.mgrid[0:h, 0:w]
    board = np.where(((ys // 12 + xs // 12) % 2)[..., None] == 0, 200, 150).astype(np.uint8)
    base = Image.fromarray(np.repeat(board, 3, axis=2)).convert("RGBA")
    return np.asarray(Image.alpha_composite(base, image).convert("RGB"))


def _save(fig, path: Path) -> None:
    fig.tight_layout(pad=0.3)
    save_png(fig, path, dpi=72)
    plt.close(fig)


def chalk_on_board(digit: np.ndarray) -> Image.Image:
    """A light-ink example: a user-like photo with its brightness flipped (chalk on a dark board)."""
    photo = load_image(render(digit, np.random.default_rng([7, 7])).data).convert("L")
    return Image.fromarray(255 - np.asarray(photo))


def stages_figure(images: np.ndarray, path: Path) -> None:
    pictures = [load_image(render(images[i], np.random.default_rng([0, i])).data) for i in STAGE_EXAMPLES]
    pictures.append(chalk_on_board(images[3]))
    columns = ["photo", *STAGE_TITLES]
    fig, axes = plt.subplots(len(pictures), len(columns), figsize=(1.25 * len(columns), 1.3 * len(pictures) + 0.5))
    for row, picture in enumerate(pictures):
        stages = preprocess_stages(picture)
        for col, name in enumerate(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if name == "photo":
                ax.imshow(_rgb(picture))
            else:
                ax.imshow(
                    stages[name],
                    cmap="gray",
                    vmin=0,
                    vmax=1,
                    interpolation="nearest" if name in ("scaled", "final") else "antialiased",
                )
            if row == 0:
                ax.set_title(STAGE_TITLES.get(name, "the picture"), fontsize=8)
    _save(fig, path)


def userlike_figure(images: np.ndarray, path: Path, count: int = 10) -> None:
    renders = list(make_userlike(images[:count], seed=0))
    fig, axes = plt.subplots(3, count, figsize=(1.1 * count, 3.7))
    for col, (digit, r) in enumerate(zip(images, renders)):
        picture = load_image(r.data)
        rows = [(digit / 255.0, "MNIST"), (None, r.kind), (preprocess(picture), "preprocessed")]
        for row, (shown, label) in enumerate(rows):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if shown is None:
                ax.imshow(_rgb(picture))
                ax.set_xlabel(f"{picture.size[0]}x{picture.size[1]}\n{label}", fontsize=7)
            else:
                ax.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                if col == 0:
                    ax.set_ylabel(label, fontsize=8)
    axes[1, 0].set_ylabel("user-like", fontsize=8)
    _save(fig, path)


def hard_figure(images: np.ndarray, path: Path) -> None:
    """Each hard variant (one MNIST test digit each): the picture, what preprocessing kept, the result."""
    variants = list(hard_variants().items())
    fig, axes = plt.subplots(3, len(variants), figsize=(1.25 * len(variants), 4.1))
    for col, (name, variant) in enumerate(variants):
        picture = variant(images[col], np.random.default_rng([0, col]))
        stages = preprocess_stages(picture)
        shown = [(_rgb(picture), None), (stages["digit"], "antialiased"), (stages["final"], "nearest")]
        for row, (image, interpolation) in enumerate(shown):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if interpolation is None:
                ax.imshow(image)
                ax.set_title(name.replace("-", "\n", 1), fontsize=7)
            else:
                ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation=interpolation)
    for row, label in enumerate(["picture", "kept as\nthe digit", "28x28"]):
        axes[row, 0].set_ylabel(label, fontsize=8)
    _save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(parser)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "img"))
    args = parser.parse_args()
    images, _ = mnist_test_set(parser, args.data, 100)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages_figure(images, out / "preprocessing-stages.png")
    userlike_figure(images, out / "preprocessing-userlike.png")
    hard_figure(images, out / "preprocessing-hard.png")
    for name in ("preprocessing-stages.png", "preprocessing-userlike.png", "preprocessing-hard.png"):
        print(f"wrote {out / name} ({(out / name).stat().st_size / 1000:.0f} kB)")


if __name__ == "__main__":
    main()
