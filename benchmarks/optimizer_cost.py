"""digitlab's optimizers against torch.optim: the cost of building one, and of a step, side by side.

Building: each measurement is a fresh process (`import torch` done, then the timer runs around building the
optimizer and its first step), since what differs is a one-off import of torch's compiler.
Stepping: the tutorial MLP's 670k parameters with random gradients, fused AdamW in both, plus digitlab's
public-API fallback (what a torch without the private kernels would run).

    python benchmarks/optimizer_cost.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

BUILD = """
import sys, time, torch
model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                            torch.nn.ReLU(), torch.nn.Linear(512, 10))
model(torch.randn(8, 784)).sum().backward()
start = time.perf_counter()
if sys.argv[1] == "torch":
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
else:
    from digitlab import optim
    opt = optim.make_optimizer("adamw", model.parameters(), lr=1e-3, weight_decay=0.0)
opt.step()
print(time.perf_counter() - start)
"""


def build_seconds(which: str) -> float:
    out = subprocess.run([sys.executable, "-c", BUILD, which], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def step_seconds(which: str, steps: int = 200) -> float:
    import torch

    from digitlab import optim

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    if which == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    elif which == "digitlab":
        opt = optim.make_optimizer("adamw", model.parameters(), lr=1e-3, weight_decay=0.0)
    else:  # the public fallback
        opt = optim.AdamW(model.parameters(), lr=1e-3, fused=False)
    for _ in range(10):
        opt.step()
    start = time.perf_counter()
    if which == "public":
        saved = optim.has_foreach
        optim.has_foreach = lambda: False
    try:
        for _ in range(steps):
            opt.step()
    finally:
        if which == "public":
            optim.has_foreach = saved
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    build = {w: [build_seconds(w) for _ in range(args.repeats)] for w in ("torch", "digitlab")}
    step = {w: [step_seconds(w) for _ in range(args.repeats)] for w in ("torch", "digitlab", "public")}
    print("| what | torch.optim.AdamW(fused) | digitlab AdamW | ratio |")
    print("| --- | --- | --- | --- |")
    t, d = statistics.median(build["torch"]), statistics.median(build["digitlab"])
    print(f"| build + first step (fresh process, median of {args.repeats}) | {t:.3f} s | {d:.3f} s | {t / d:.1f}x |")
    t, d = statistics.median(step["torch"]), statistics.median(step["digitlab"])
    print(f"| one step, MLP (670k parameters) | {t * 1e3:.2f} ms | {d * 1e3:.2f} ms | {t / d:.2f}x |")
    p = statistics.median(step["public"])
    print(f"| one step, public-API fallback (no private kernels) | | {p * 1e3:.2f} ms | {t / p:.2f}x |")


if __name__ == "__main__":
    main()
