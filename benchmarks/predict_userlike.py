"""Accuracy on user-like photos vs clean MNIST, same checkpoint, through the library's predict path.

Renders the MNIST test images as users' pictures (benchmarks/userlike.py: 200-600 px, dark ink on grey paper,
off-centre, lighting gradient and shadow, noise, specks, rotation, JPEG/PNG/16-bit/transparent), reads them
with Predictor.predict (decode -> preprocess -> model) and compares with Predictor.predict on the clean IDX
file. The target: user-like accuracy within 1.5 points of clean. For comparison it also reads the same
photos the way tutorials do (grayscale, invert, resize to 28x28, no other preprocessing).

    python benchmarks/predict_userlike.py --checkpoint runs/cnn --data ../shared/datasets/mnist
    python benchmarks/predict_userlike.py --checkpoint runs/cnn --count 1000 --workers 2

Work is split over worker processes (each renders and predicts its share with its own Predictor); the
pictures are rendered in memory and never written.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageOps

from common import add_data_option, mnist_files, mnist_test_set
from digitlab.prediction import Predictor
from userlike import make_userlike


def naive(data: bytes) -> np.ndarray:
    """The usual tutorial recipe, for comparison: grayscale, invert, resize to 28x28."""
    image = ImageOps.invert(Image.open(io.BytesIO(data)).convert("L")).resize((28, 28), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def _predict_share(
    checkpoint: str, images: np.ndarray, seed: int, start: int
) -> list[tuple[int | None, int, str, str | None]]:
    """Render images[i] (the test set's image start + i) and read it: [(digit, naive digit, kind, error)]."""
    import torch

    torch.set_num_threads(1)  # one process per core: no oversubscription
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    renders = list(make_userlike(images, seed=seed, start=start))
    result = predictor.predict([r.data for r in renders])
    naive_digits = predictor.predict_arrays(np.stack([naive(r.data) for r in renders])).argmax(1)
    return [(p.digit, int(d), r.kind, p.error) for p, d, r in zip(result, naive_digits, renders)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    add_data_option(parser)
    parser.add_argument("--count", type=int, default=10_000, help="test images to render (from the first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    images, labels = mnist_test_set(parser, args.data, args.count)
    files = mnist_files(parser, args.data)
    n = len(images)

    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    start = time.perf_counter()
    clean = [p.digit for p in predictor.predict(str(files["test_images"]))][:n]  # the IDX path
    clean_seconds = time.perf_counter() - start
    clean_accuracy = float(np.mean(np.array(clean) == labels))

    chunk = -(-n // (args.workers * 4))
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [
            pool.submit(_predict_share, args.checkpoint, images[i : i + chunk], args.seed, i)
            for i in range(0, n, chunk)
        ]
        results = [row for f in futures for row in f.result()]
    userlike_seconds = time.perf_counter() - start

    digits = np.array([-1 if d is None else d for d, _, _, _ in results])
    errors = [e for _, _, _, e in results if e is not None]
    userlike_accuracy = float(np.mean(digits == labels))
    naive_accuracy = float(np.mean(np.array([d for _, d, _, _ in results]) == labels))
    kinds = collections.defaultdict(list)
    for (d, _, kind, _), label in zip(results, labels):
        kinds[kind].append(d == label)

    print(
        f"checkpoint   {args.checkpoint} ({predictor.info.model}, recorded test accuracy "
        f"{predictor.info.metrics.get('test_accuracy', float('nan')):.4f})"
    )
    print(f"images       {n} MNIST test images, user-like seed {args.seed}, {args.workers} worker processes")
    print(f"clean        accuracy {clean_accuracy:.4f}  (predict on the IDX file, {clean_seconds:.1f} s)")
    print(
        f"user-like    accuracy {userlike_accuracy:.4f}  (render + decode + preprocess + predict, "
        f"{userlike_seconds:.1f} s, {n / userlike_seconds:.0f} images/s)"
    )
    print(f"gap          {100 * (clean_accuracy - userlike_accuracy):+.2f} points (target: at most 1.50)")
    print(f"naive        accuracy {naive_accuracy:.4f}  (the same photos through grayscale, invert, resize to 28x28)")
    print(f"failed       {len(errors)} inputs" + (f", first: {errors[0]}" if errors else ""))
    print("by kind      " + ", ".join(f"{k} {np.mean(v):.4f} (n={len(v)})" for k, v in sorted(kinds.items())))
    return 0 if clean_accuracy - userlike_accuracy <= 0.015 else 1


if __name__ == "__main__":
    sys.exit(main())
