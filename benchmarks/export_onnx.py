"""Inference throughput of an exported model, side by side: onnxruntime (fp32 and int8) vs eager PyTorch.

Each checkpoint is exported (fp32 and int8 ONNX) to a temp dir; then the three contenders classify the same
MNIST test images at each batch size, in alternating order, `--repeats` times, with the same number of threads.
The figure is images per second over the whole pass (pixels prepared outside the clock); medians are printed
with the ratio to PyTorch, and each contender's accuracy on the images, so a fast but wrong result shows.

    python benchmarks/export_onnx.py --checkpoint runs/mlp runs/cnn --data ../shared/datasets/mnist
    python benchmarks/export_onnx.py --checkpoint runs/cnn --data DATA_DIR --threads 2 --batch-sizes 1 256
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from digitlab import checkpoint, data
from digitlab import export as exp


def onnx_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(["logits"], {"pixels": pixels})[0]


def torch_runner(ckpt: Path) -> Callable[[np.ndarray], np.ndarray]:
    model, info = checkpoint.load(ckpt)
    module = exp.pixel_model(model, info.mean, info.std, info.temperature)  # the same pixels-in graph the export holds

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(pixels)).numpy()

    return run


def images_per_second(run: Callable[[np.ndarray], np.ndarray], batches: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """One timed pass over all batches; returns (images/s, predicted classes)."""
    run(batches[0])  # warm-up: first-call allocations and kernel selection stay outside the clock
    start = time.perf_counter()
    predictions = [run(batch).argmax(1) for batch in batches]
    seconds = time.perf_counter() - start
    return sum(len(b) for b in batches) / seconds, np.concatenate(predictions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True, type=Path)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64, 1000])
    parser.add_argument("--images", type=int, default=10000, help="Test images per pass (batch 1 uses at most 2000).")
    parser.add_argument("--threads", type=int, default=1, help="Threads for both torch and onnxruntime.")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    mnist = data.load(args.data, download=False)
    images, labels = mnist.test_images.numpy()[: args.images], mnist.test_labels.numpy()[: args.images]
    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} thread(s), "
        f"{args.repeats} repeats, medians"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in args.checkpoint:
            fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            exp.export_onnx(ckpt, fp32)
            exp.export_onnx(ckpt, int8, quantize="int8")
            runners = {
                "torch eager": torch_runner(ckpt),
                "onnxruntime fp32": onnx_runner(fp32, args.threads),
                "onnxruntime int8": onnx_runner(int8, args.threads),
            }
            name = checkpoint.read_info(ckpt).model
            print(f"\n{name} ({checkpoint.resolve(ckpt)})")
            print(f"{'batch':>6}  {'contender':<17} {'images/s':>10}  {'vs torch':>8}  {'accuracy':>8}")
            for batch_size in args.batch_sizes:
                count = min(len(images), 2000) if batch_size == 1 else len(images)
                pixels = exp.to_pixels(images[:count])  # (N, 1, 28, 28) float32, outside the clock
                batches = [pixels[i : i + batch_size] for i in range(0, count, batch_size)]
                rates: dict[str, list[float]] = {k: [] for k in runners}
                accuracy: dict[str, float] = {}
                for repeat in range(args.repeats):
                    order = list(runners) if repeat % 2 == 0 else list(reversed(runners))  # alternate
                    for key in order:
                        rate, predicted = images_per_second(runners[key], batches)
                        rates[key].append(rate)
                        accuracy[key] = float((predicted == labels[:count]).mean())
                base = statistics.median(rates["torch eager"])
                for key in runners:
                    median = statistics.median(rates[key])
                    print(f"{batch_size:>6}  {key:<17} {median:>10,.0f}  {median / base:>7.2f}x  {accuracy[key]:>8.4f}")


if __name__ == "__main__":
    main()
