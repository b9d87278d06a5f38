"""How well trained models read handwriting that is not MNIST: accuracy and calibration error per set.

Every set goes through `digitlab.Predictor.predict`, preprocessing included, as a user's files would
(except MNIST's own test set, which is read as tensors). The sets:

    mnist-test          MNIST's 10,000 test digits (the in-domain reference)
    optdigits           UCI optdigits, 43 other writers (32x32 binary originals), as 128 px dark-on-white
                        pictures; --optdigits-split test (13 writers, for reporting) or train (30 writers, for
                        choosing recipes: the shipped models never train on either)
    optdigits-scan16    the same, reduced to 16x16, binarised and enlarged again, as many scanned sets are
    fonts-*             digits in handwriting-style fonts (benchmarks/font_digits.py): tight crops, inside a
                        drawn box, 16x16 binary scans
    hard-*              MNIST test digits made hard as users' pictures are (benchmarks/userlike.py): tight
                        crops, stretched, binary 16x16/8x8 scans, thick marker, faint pencil, white ink on
                        transparent, inside a box

Usage (each --run is NAME=DIR[,DIR...]; several dirs are seeds of one recipe, reported as mean ± std):
    python benchmarks/cross_domain.py --data ../shared/datasets/mnist \
        --run cnn=runs/cnn-s0,runs/cnn-s1,runs/cnn-s2 --run mlp=runs/mlp-s0 --json out.json

The script uses only digitlab's public API, so it can score an older checkout too: put that checkout's src
first on PYTHONPATH (ECE is then computed with this checkout's calibration module).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.*` when run as a script

import digitlab  # noqa: E402  (after the path set-up above)


def _calibration():
    """digitlab.calibration, or this checkout's copy of it when an older digitlab is being scored."""
    try:
        from digitlab import calibration

        return calibration
    except ImportError:
        spec = importlib.util.spec_from_file_location("calibration", ROOT / "src/digitlab/calibration.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["calibration"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module


# ----------------------------------------------------------------------------------------------------------
# The sets: name -> (images or a factory of PIL images, labels)
# ----------------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def optdigits(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "test"
    return (
        read_idx(directory / f"{prefix}-images-idx3-ubyte.gz"),
        read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64),
    )


def as_picture(ink: np.ndarray, size: int = 128) -> Image.Image:
    """A binary ink bitmap (ink 255) as a dark-on-white grayscale picture, enlarged with hard edges."""
    return Image.fromarray(255 - ink).resize((size, size), Image.Resampling.NEAREST)


def scan16(ink: np.ndarray, size: int = 128) -> Image.Image:
    """Reduced to 16x16 (area average), binarised at half, enlarged again: a low-resolution form scan."""
    small = np.asarray(Image.fromarray(ink).resize((16, 16), Image.Resampling.BOX), dtype=np.uint8)
    return as_picture(np.where(small >= 128, 255, 0).astype(np.uint8), size)


def png_bytes(image: Image.Image) -> bytes:
    """Pictures reach the predictor as encoded PNG files, the way users' pictures do (a palette picture
    keeps its palette and transparency, as a drawing program writes it)."""
    buffer = io.BytesIO()
    extra = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
    image.save(buffer, format="PNG", **extra)
    return buffer.getvalue()


def build_sets(args: argparse.Namespace) -> dict[str, tuple[Callable[[], Iterator[bytes]], np.ndarray]]:
    sets: dict[str, tuple[Callable[[], Iterator[bytes]], np.ndarray]] = {}
    opt_dir = Path(args.optdigits)
    if (opt_dir / "test-images-idx3-ubyte.gz").exists():
        images, labels = optdigits(opt_dir, args.optdigits_split)
        sets["optdigits"] = (lambda: (png_bytes(as_picture(i)) for i in images), labels)
        sets["optdigits-scan16"] = (lambda: (png_bytes(scan16(i)) for i in images), labels)
    else:
        print(f"optdigits not found in {opt_dir}: skipped", file=sys.stderr)
    if "fonts" in args.sets:
        try:
            from benchmarks import font_digits

            fonts = font_digits.find_fonts()
        except ImportError:
            fonts = []
        if fonts:
            pictures, labels, styles = font_digits.render_set(fonts, seed=0, per_font_digit=args.per_font_digit)
            for style in sorted(set(styles)):
                keep = [k for k, s in enumerate(styles) if s == style]
                chosen = [pictures[k] for k in keep]
                sets[f"fonts-{style}"] = (
                    lambda chosen=chosen: (png_bytes(p) for p in chosen),
                    np.asarray(labels)[keep].astype(np.int64),
                )
        else:
            print("no handwriting fonts installed: the fonts sets are skipped", file=sys.stderr)
    if "hard" in args.sets:
        try:
            from benchmarks import userlike
        except ImportError:
            userlike = None
        if userlike is not None and hasattr(userlike, "hard_variants"):
            from digitlab.datafiles import find_files

            files = find_files(Path(args.data))
            test_images = read_idx(files["test_images"])[: args.hard_count] if files else None
            test_labels = read_idx(files["test_labels"])[: args.hard_count].astype(np.int64) if files else None
            if test_images is not None:
                for name in userlike.hard_variants():
                    sets[f"hard-{name}"] = (
                        lambda name=name: (png_bytes(p) for p in userlike.make_hard(test_images, name, seed=0)),
                        test_labels,
                    )
    return sets


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------


def score_set(predictor, pictures: Iterator[bytes], labels: np.ndarray) -> dict[str, float]:
    """Accuracy and ECE of the predictor on encoded pictures; a refused picture counts as wrong, with a
    uniform (uninformed) answer in the ECE."""
    calibration = _calibration()
    probabilities, failed, no_ink = [], [], 0
    batch: list[bytes] = []

    def flush() -> None:
        nonlocal no_ink
        for prediction in predictor.predict(batch):
            failed.append(prediction.error is not None)
            if prediction.error is not None:
                no_ink += "no ink" in prediction.error
                probabilities.append(np.full(10, 0.1))
            else:
                probabilities.append(np.asarray(prediction.probabilities, dtype=np.float64))
        batch.clear()

    for picture in pictures:
        batch.append(picture)
        if len(batch) == 256:
            flush()
    if batch:
        flush()
    p = np.stack(probabilities)
    right = (p.argmax(1) == labels) & ~np.array(failed)
    return {
        "accuracy": float(right.mean()),
        "ece": calibration.expected_calibration_error(p, labels),
        "errors": int(sum(failed)),
        "no_ink": no_ink,
        "count": len(labels),
    }


def score_mnist(run_dir: str, data_dir: str) -> dict[str, float]:
    import torch

    from digitlab import checkpoint
    from digitlab import data as datasets

    calibration = _calibration()
    model, info = checkpoint.load(run_dir)
    data = datasets.load(data_dir, info.dataset)
    x = data.test_images.float().div(255).unsqueeze(1)
    if info.mean is not None:
        x = (x - info.mean) / info.std
    with torch.inference_mode():
        logits = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)]).numpy()
    p = calibration.softmax(logits, float(getattr(info, "temperature", 1.0)))
    labels = data.test_labels.numpy()
    return {
        "accuracy": float((p.argmax(1) == labels).mean()),
        "ece": calibration.expected_calibration_error(p, labels),
        "errors": 0,
        "no_ink": 0,
        "count": len(labels),
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2%}"
    return f"{statistics.mean(values):.2%} ± {statistics.stdev(values):.2%}"


def print_table(results: dict[str, dict[str, list[dict[str, float]]]]) -> None:
    """One row per set; per name: accuracy (mean ± std over its runs), mean ECE, mean errors."""
    set_names = list(next(iter(results.values())))
    print("| set | " + " | ".join(f"{n} accuracy | {n} ECE | {n} errors" for n in results) + " |")
    print("| --- |" + " --- | --- | --- |" * len(results))
    for set_name in set_names:
        cells = []
        for name in results:
            rows = results[name].get(set_name, [])
            if not rows:
                cells += ["", "", ""]
                continue
            errors, no_ink = statistics.mean(r["errors"] for r in rows), statistics.mean(r["no_ink"] for r in rows)
            cells.append(mean_std([r["accuracy"] for r in rows]))
            cells.append(f"{statistics.mean(r['ece'] for r in rows):.4f}")
            cells.append(f"{errors:.0f} ({no_ink:.0f} no ink)")
        print(f"| {set_name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("DIGITLAB_DATA"), help="MNIST dir (or $DIGITLAB_DATA)")
    parser.add_argument("--optdigits", default=str(ROOT.parent / "shared/datasets/optdigits32"))
    parser.add_argument("--optdigits-split", choices=("test", "train"), default="test")
    parser.add_argument("--run", action="append", default=[], help="NAME=DIR[,DIR...]")
    parser.add_argument(
        "--sets", default="mnist,optdigits,fonts,hard", help="comma-separated groups: mnist, optdigits, fonts, hard"
    )
    parser.add_argument("--per-font-digit", type=int, default=12)
    parser.add_argument("--hard-count", type=int, default=1000, help="MNIST test digits per hard variant")
    parser.add_argument("--json", help="also write every figure here")
    parser.add_argument(
        "--merge", action="append", default=[], help="add the figures a previous run wrote with --json (repeatable)"
    )
    args = parser.parse_args()
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for path in args.merge:
        for name, sets_of_name in json.loads(Path(path).read_text()).items():
            for set_name, rows in sets_of_name.items():
                results.setdefault(name, {}).setdefault(set_name, []).extend(rows)
    if not args.run and not results:
        parser.error("give --run NAME=DIR (or --merge FILE)")
    if args.run and not args.data:
        parser.error("--data DIR (or $DIGITLAB_DATA) is required")
    groups = set(args.sets.split(","))
    sets = build_sets(args) if args.run and groups & {"optdigits", "fonts", "hard"} else {}
    if "optdigits" not in groups:
        sets = {k: v for k, v in sets.items() if not k.startswith("optdigits")}
    for spec in args.run:
        name, _, dirs = spec.partition("=")
        for run_dir in dirs.split(","):
            start = time.perf_counter()
            predictor = digitlab.Predictor.from_checkpoint(run_dir, device="cpu")
            scores = {}
            if "mnist" in groups:
                scores["mnist-test"] = score_mnist(run_dir, args.data)
            for set_name, (pictures, labels) in sets.items():
                scores[set_name] = score_set(predictor, pictures(), labels)
            for set_name, s in scores.items():
                results.setdefault(name, {}).setdefault(set_name, []).append(s)
            summary = ", ".join(f"{k} {v['accuracy']:.2%}" for k, v in scores.items())
            print(f"{name} {run_dir}: {summary} ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
