"""Time to accuracy, side by side: digitlab's trainer vs the tutorial pipeline and vs pytorch/examples' CNN.

Each contender runs as its own process (so imports and data loading count), alternating, `--repeats` times.
The clock starts just before the process is spawned and stops when the process prints a test accuracy at
or above the target. Medians and ratios are printed at the end.

    python benchmarks/train_speed.py --data ../shared/datasets/mnist --task mlp --repeats 5
    python benchmarks/train_speed.py --data ../shared/datasets/mnist --task cnn-fast --repeats 3
    python benchmarks/train_speed.py --data ../shared/datasets/mnist --task cnn --repeats 1
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The CNN for a quick 99%: `--recipe quick` (two epochs, batches of 128, no augmentation; chosen by validation
# accuracy: docs/benchmarks.md lists what was tried).
CNN_FAST = ["--recipe", "quick"]
ACC_LINE = re.compile(r"^ACC ([\d.]+)")
DIGITLAB_LINE = re.compile(r"test accuracy ([\d.]+)%")


@dataclass
class Result:
    name: str
    seconds_to_target: float | None
    final_accuracy: float
    wall_seconds: float


def run_and_watch(name: str, command: list[str], target: float, cwd: Path, stop_at_target: bool) -> Result:
    """Spawn, read stdout line by line, note when the test accuracy first reaches `target`."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
    reached, accuracy, tail = None, 0.0, []
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter() - start
        tail = (tail + [line.rstrip()])[-5:]
        if m := ACC_LINE.match(line):
            accuracy = float(m.group(1))
        elif m := DIGITLAB_LINE.search(line):
            accuracy = float(m.group(1)) / 100
        else:
            continue
        if reached is None and accuracy >= target:
            reached = now
            if stop_at_target:  # the competitor has shown its time; no need to run out its epochs
                proc.terminate()
                break
    proc.wait()
    if proc.returncode != 0 and not (stop_at_target and reached is not None):
        raise SystemExit(f"{name} failed ({proc.returncode}):\n" + "\n".join(tail))
    return Result(name, reached, accuracy, time.perf_counter() - start)


def torchvision_root(data_dir: Path, tmp: Path) -> Path:
    """torchvision's MNIST wants MNIST/raw/ with decompressed files: lay them out once, outside the clock."""
    raw = tmp / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in data_dir.glob("*-ubyte.gz"):
        (raw / gz.name[:-3]).write_bytes(zlib.decompress(gz.read_bytes(), 31))
    return tmp


def contenders(task: str, data_dir: Path, root: Path, out: Path, competitor_epochs: int | None):
    py = sys.executable
    digitlab = [py, "-m", "digitlab", "train", "--data", str(data_dir)]
    if task == "mlp":
        return 0.98, [
            (
                "tutorial (torchvision + DataLoader, Adam 1e-3, batch 64)",
                [py, str(HERE / "competitors" / "tutorial_mlp.py"), str(root), str(competitor_epochs or 10)],
            ),
            ("digitlab train --model mlp", digitlab + ["--model", "mlp", "--out", str(out / "mlp")]),
        ]
    if task == "cnn-fast":
        return 0.99, [
            (
                "pytorch/examples CNN (Adadelta, StepLR, batch 64)",
                [py, str(HERE / "competitors" / "pytorch_examples_cnn.py"), str(root), str(competitor_epochs or 14)],
            ),
            (
                "digitlab train " + " ".join(CNN_FAST),
                digitlab + [*CNN_FAST, "--out", str(out / "cnn-fast")],
            ),
        ]
    if task == "cnn":
        return 0.995, [
            (
                "pytorch/examples CNN (Adadelta, StepLR, batch 64)",
                [py, str(HERE / "competitors" / "pytorch_examples_cnn.py"), str(root), str(competitor_epochs or 14)],
            ),
            ("digitlab train --model cnn", digitlab + ["--model", "cnn", "--out", str(out / "cnn")]),
        ]
    raise SystemExit(f"unknown task {task!r}")


def fmt(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="dir with the four MNIST .gz files")
    parser.add_argument("--task", choices=["mlp", "cnn-fast", "cnn"], default="mlp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--competitor-epochs",
        type=int,
        default=None,
        help="cap the competitor's epochs (it stops anyway at its recipe's count)",
    )
    parser.add_argument("--skip-competitor", action="store_true")
    parser.add_argument(
        "--full-competitor",
        action="store_true",
        help="let the competitor run all its epochs (default: stop it once it reaches the target)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="digitlab-bench-") as tmp_name:
        tmp = Path(tmp_name)
        root = torchvision_root(args.data, tmp / "tv")
        target, runs = contenders(args.task, args.data.resolve(), root, tmp / "runs", args.competitor_epochs)
        if args.skip_competitor:
            runs = runs[1:]
        results: dict[str, list[Result]] = {name: [] for name, _ in runs}
        for repeat in range(args.repeats):
            for name, command in runs:
                shutil.rmtree(tmp / "runs", ignore_errors=True)
                is_competitor = not name.startswith("digitlab")
                result = run_and_watch(name, command, target, HERE.parent, is_competitor and not args.full_competitor)
                results[name].append(result)
                print(
                    f"[{repeat + 1}/{args.repeats}] {name}: {target:.1%} at {fmt(result.seconds_to_target)}, "
                    f"last printed {result.final_accuracy:.2%}, process {result.wall_seconds:.2f} s",
                    flush=True,
                )

    print(f"\nmedians over {args.repeats} run(s), target test accuracy {target:.1%}, {os.cpu_count()} CPU cores:")
    medians = {}
    for name, rs in results.items():
        times = [r.seconds_to_target for r in rs]
        median = statistics.median(times) if None not in times else None
        medians[name] = median
        accuracy = statistics.median(r.final_accuracy for r in rs)
        wall = statistics.median(r.wall_seconds for r in rs)
        print(f"  {name}: time to target {fmt(median)}, last test accuracy {accuracy:.2%}, process wall {wall:.2f} s")
    names = list(medians)
    if len(names) == 2 and None not in medians.values():
        print(f"  speed-up of digitlab: {medians[names[0]] / medians[names[1]]:.1f}x")
        # digitlab's whole process (to exit, checkpoints and curves written) against the competitor's time to
        # the target (it was stopped there, so its own remaining epochs do not count against it)
        whole = statistics.median(r.wall_seconds for r in results[names[1]])
        print(f"  speed-up of digitlab's whole process: {medians[names[0]] / whole:.1f}x")


if __name__ == "__main__":
    main()
