"""Batch inference throughput of the MLP and the CNN, next to this machine's measured matrix-multiply rate.

    python benchmarks/inference_throughput.py [--data ../shared/datasets/mnist] [--repeats 7]

Runs on the 10,000 MNIST test images when the data is found (else on 10,000 random images: throughput does
not depend on pixel values). Prints images/s and the model's achieved GFLOP/s as a share of the GEMM rate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from digitlab import data, datafiles, idx
from digitlab.devices import autocast
from digitlab.models import build_model


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first calls pick kernels and allocate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_gflops(dtype: torch.dtype, repeats: int, n: int = 2048) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats) / 1e9


def flops_per_image(model: nn.Module) -> float:
    """Multiply-adds of convolutions and linear layers, x2, counted with forward hooks on one image."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    for h in handles:
        h.remove()
    return 2.0 * total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()

    try:
        images = data.load(args.data, download=False).test_images
        source = "MNIST test images"
    except idx.DataError:
        images = torch.randint(0, 256, (10_000, 28, 28), dtype=torch.uint8)
        source = "random images"
    x = data.to_input(images, datafiles.MNIST_MEAN, datafiles.MNIST_STD)  # (10000, 1, 28, 28)
    device = torch.device("cpu")
    print(f"{torch.get_num_threads()} threads, {len(x):,} {source}, batch {args.batch_size}, median of {args.repeats}")
    rates = {"fp32": gemm_gflops(torch.float32, args.repeats), "bf16": gemm_gflops(torch.bfloat16, args.repeats)}
    print(f"GEMM 2048x2048: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s")
    for name in ("mlp", "cnn"):
        model = build_model(name).eval()
        if name == "cnn":
            model = model.to(memory_format=torch.channels_last)
        flops = flops_per_image(model)
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):

            def run(model=model, dtype=dtype) -> None:
                with torch.inference_mode(), autocast(device, dtype):
                    for start in range(0, len(x), args.batch_size):
                        model(x[start : start + args.batch_size])

            seconds = median_seconds(run, args.repeats)
            per_second = len(x) / seconds
            achieved = per_second * flops / 1e9
            print(
                f"{name} {precision}: {per_second:,.0f} images/s, {flops / 1e6:.2f} MFLOP/image, "
                f"{achieved:.0f} GFLOP/s = {achieved / rates[precision]:.0%} of the {precision} GEMM rate"
            )


if __name__ == "__main__":
    main()
