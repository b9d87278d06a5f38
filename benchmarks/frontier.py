"""The accuracy/time frontier: every recipe (3 seeds) and ensembles of them, as whole processes on this machine.

Three steps, each adding to one JSON file (--book), so a long campaign can stop and go on:

    # 1. train: each recipe and seed as its own `digitlab train` process, timed from spawn to exit
    python benchmarks/frontier.py train --book frontier.json --runs runs/frontier \
        --data ../shared/datasets/mnist --recipes mlp,quick,cnn,best --seeds 0,1,2
    #    (a run timed elsewhere, e.g. under /usr/bin/time, is added with `record`)
    python benchmarks/frontier.py record --book frontier.json --recipe best --seed 0 \
        --run-dir runs/frontier/best-s0 --seconds 1001.3
    # 2. ensembles: `digitlab evaluate --checkpoint A --checkpoint B ...` on the test set, timed the same way
    python benchmarks/frontier.py ensembles --book frontier.json --data ../shared/datasets/mnist \
        --ensemble cnn:2,3,5 --ensemble best:3,5
    #    ... and with test-time augmentation (5 forward passes per image and member; k = 1 is a single model)
    python benchmarks/frontier.py ensembles --book frontier.json --data ../shared/datasets/mnist \
        --ensemble cnn:1,3 --tta --disjoint
    # 3. the table (markdown) and the plot (accuracy against seconds, log scale)
    python benchmarks/frontier.py report --book frontier.json --plot docs/img/frontier.png \
        --competitor "tutorial MLP (torchvision + DataLoader)=144.2:0.9824"

A recipe's row is the mean ± std of its seeds' test accuracy against the median whole-process time. An
ensemble of k members costs the k members' training processes one after another plus the evaluate process;
its members are the recipe's first k seeds, or with --disjoint every disjoint group of k seeds (mean ± std).
Each test accuracy is the one `digitlab train` printed after its run: the test set chose nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent

# Published MNIST results to place the frontier against (test accuracy, no time: other hardware, other budgets).
PUBLISHED = [
    ("ttdoucet/mnist, single model", 0.9982),
    ("ttdoucet/mnist, committee", 0.9984),
]


def load_book(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": [], "ensembles": []}


def save_book(path: Path, book: dict[str, Any]) -> None:
    """Through a temp file and a rename: a campaign stopped mid-write keeps its last good book."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(book, indent=2) + "\n")
    os.replace(tmp, path)


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command as its own process; seconds from spawn to exit."""
    env = {**os.environ, "COLUMNS": "200"}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done


def run_record(recipe: str, seed: int, run_dir: Path, seconds: float | None, command: str) -> dict[str, Any]:
    """A run's entry in the book; seconds None for a run whose whole process was not timed (its accuracy
    counts, its time does not)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "recipe": recipe,
        "seed": seed,
        "run_dir": str(run_dir),
        "seconds": round(seconds, 2) if seconds is not None else None,
        "test_accuracy": summary["test_accuracy"],
        "test_ece": summary.get("test_ece"),
        "best_val_accuracy": summary["best_val_accuracy"],
        "command": command,
    }


def update_book(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Read the book afresh, change it, write it back: two steps running at once (a long `train` and an
    `ensembles`) each keep the other's records."""
    book = load_book(path)
    change(book)
    save_book(path, book)


def find_run(book: dict[str, Any], recipe: str, seed: int) -> dict[str, Any] | None:
    return next((r for r in book["runs"] if r["recipe"] == recipe and r["seed"] == seed), None)


def put_run(book: dict[str, Any], record: dict[str, Any]) -> None:
    book["runs"] = [r for r in book["runs"] if (r["recipe"], r["seed"]) != (record["recipe"], record["seed"])]
    book["runs"].append(record)


def cmd_train(args: argparse.Namespace) -> None:
    book = load_book(args.book)
    for recipe in args.recipes.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            if find_run(book, recipe, seed) and not args.again:
                print(f"{recipe} seed {seed}: already in {args.book}")
                continue
            run_dir = args.runs / f"{recipe}-s{seed}"
            command = [sys.executable, "-m", "digitlab", "train", "--recipe", recipe, "--seed", str(seed)]
            command += ["--data", str(args.data), "--out", str(run_dir), "--overwrite"]
            seconds, _ = timed(command)
            shown = f"digitlab train --recipe {recipe} --seed {seed} --data DATA --out {run_dir}"
            record = run_record(recipe, seed, run_dir, seconds, shown)
            update_book(args.book, lambda book, record=record: put_run(book, record))
            print(f"{recipe} seed {seed}: {record['test_accuracy']:.2%} in {seconds:.1f} s", flush=True)


def cmd_record(args: argparse.Namespace) -> None:
    shown = args.command or f"digitlab train --recipe {args.recipe} --seed {args.seed} (timed outside this script)"
    record = run_record(args.recipe, args.seed, args.run_dir, args.seconds, shown)
    update_book(args.book, lambda book: put_run(book, record))


def evaluate_group(members: list[dict[str, Any]], data: Path, tta: bool, typical: float) -> dict[str, Any]:
    """One ensemble (or one model, with TTA) evaluated on the test set as a timed `digitlab evaluate` process."""
    command = [sys.executable, "-m", "digitlab", "evaluate", "--data", str(data), "--json", "--no-plots"]
    for r in members:
        command += ["--checkpoint", r["run_dir"]]
    command += ["--tta"] if tta else []
    seconds, done = timed(command)
    report = json.loads(done.stdout)
    training = sum(typical if r["seconds"] is None else r["seconds"] for r in members)
    return {
        "seeds": [r["seed"] for r in members],
        "evaluate_seconds": round(seconds, 2),
        "seconds": round(training + seconds, 2),
        "test_accuracy": report["accuracy"],
        "test_ece": report["ece"],
    }


def cmd_ensembles(args: argparse.Namespace) -> None:
    book = load_book(args.book)
    for spec in args.ensemble:
        recipe, sizes = spec.split(":")
        runs = sorted((r for r in book["runs"] if r["recipe"] == recipe), key=lambda r: r["seed"])
        typical = statistics.median(r["seconds"] for r in runs if r["seconds"] is not None)  # for untimed members
        for k in (int(s) for s in sizes.split(",")):
            if len(runs) < k:
                print(f"{recipe} x{k}: only {len(runs)} runs in {args.book}; train more seeds first")
                continue
            # The first k seeds; with --disjoint every disjoint group of k (seeds 0-1, 2-3, ...), for a mean.
            count = len(runs) // k if args.disjoint else 1
            done = {tuple(g["seeds"]): g for g in known_groups(load_book(args.book), recipe, k, args.tta)}
            groups = []
            for i in range(count):  # a group already evaluated (same seeds, same TTA) is not evaluated again
                members = runs[i * k : (i + 1) * k]
                seeds = tuple(r["seed"] for r in members)
                groups.append(done.get(seeds) or evaluate_group(members, args.data, args.tta, typical))
            accuracies = [g["test_accuracy"] for g in groups]
            record = {
                "recipe": recipe,
                "members": k,
                "tta": args.tta,
                "groups": groups,
                "seeds": groups[0]["seeds"],
                "evaluate_seconds": statistics.median(g["evaluate_seconds"] for g in groups),
                "seconds": statistics.median(g["seconds"] for g in groups),
                "test_accuracy": statistics.mean(accuracies),
                "std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
                "test_ece": statistics.mean(g["test_ece"] for g in groups),
                "command": "digitlab evaluate --data DATA "
                + " ".join(f"--checkpoint {r['run_dir']}" for r in runs[:k])
                + (" --tta" if args.tta else "")
                + (f" (and each other disjoint group of {k})" if count > 1 else ""),
            }
            update_book(args.book, lambda book, record=record: put_ensemble(book, record))
            shown = " / ".join(f"{a:.2%}" for a in accuracies)
            print(f"{ensemble_name(record)}: {shown}, ece {record['test_ece']:.4f}", flush=True)


def known_groups(book: dict[str, Any], recipe: str, k: int, tta: bool) -> list[dict[str, Any]]:
    """The groups already evaluated for (recipe, k, tta), from an earlier `ensembles` step."""
    for e in book["ensembles"]:
        if (e["recipe"], e["members"], bool(e.get("tta"))) == (recipe, k, tta):
            return e.get("groups") or []
    return []


def put_ensemble(book: dict[str, Any], record: dict[str, Any]) -> None:
    key = (record["recipe"], record["members"], record["tta"])
    book["ensembles"] = [e for e in book["ensembles"] if (e["recipe"], e["members"], e.get("tta")) != key]
    book["ensembles"].append(record)


def ensemble_name(e: dict[str, Any]) -> str:
    """'ensemble of 3 x --recipe cnn', '--recipe cnn + TTA', ..."""
    name = f"--recipe {e['recipe']}" if e["members"] == 1 else f"ensemble of {e['members']} x --recipe {e['recipe']}"
    return name + (" + TTA" if e.get("tta") else "")


def rows(book: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per recipe (its seeds summarised) and per ensemble, cheapest first."""
    out = []
    for recipe in dict.fromkeys(r["recipe"] for r in book["runs"]):
        runs = [r for r in book["runs"] if r["recipe"] == recipe]
        accuracies = [r["test_accuracy"] for r in runs]
        seeds = ", ".join(str(r["seed"]) for r in runs)
        seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
        untimed = [str(r["seed"]) for r in runs if r["seconds"] is None]
        note = f"; time from the other seeds (seeds {', '.join(untimed)} not timed)" if untimed else ""
        out.append(
            {
                "name": f"--recipe {recipe}",
                "seconds": statistics.median(seconds),
                "seconds_range": (min(seconds), max(seconds)),
                "accuracy": statistics.mean(accuracies),
                "std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
                "detail": " / ".join(f"{a:.2%}" for a in accuracies) + f" (seeds {seeds}){note}",
                "kind": "recipe",
                "label": recipe,
            }
        )
    for e in book["ensembles"]:
        groups = e.get("groups") or [e]
        seeds = "; ".join(", ".join(map(str, g["seeds"])) for g in groups)
        each = " / ".join(f"{g['test_accuracy']:.2%}" for g in groups) + " " if len(groups) > 1 else ""
        out.append(
            {
                "name": ensemble_name(e),
                "seconds": e["seconds"],
                "seconds_range": None,
                "accuracy": e["test_accuracy"],
                "std": e.get("std"),
                "detail": f"{each}(seeds {seeds}); ece {e['test_ece']:.4f}; evaluate {e['evaluate_seconds']:.1f} s",
                "kind": "tta" if e.get("tta") else "ensemble",
                "label": e["recipe"]
                + (f" x{e['members']}" if e["members"] > 1 else "")
                + (" + TTA" if e.get("tta") else ""),
            }
        )
    return sorted(out, key=lambda r: r["seconds"])


def parse_competitor(text: str) -> dict[str, Any]:
    """NAME=SECONDS:ACCURACY, as measured by benchmarks/train_speed.py."""
    name, _, figures = text.rpartition("=")
    seconds, _, accuracy = figures.partition(":")
    label = name.split(" (")[0]  # the plot shows the name without its parenthesis
    return {"name": name, "label": label, "seconds": float(seconds), "accuracy": float(accuracy), "kind": "competitor"}


def markdown(table: list[dict[str, Any]], competitors: list[dict[str, Any]]) -> str:
    lines = [
        "| contender | test accuracy (mean ± std over seeds) | whole process, median | detail |",
        "| --- | --- | --- | --- |",
    ]
    for c in competitors:
        lines.append(f"| {c['name']} | {c['accuracy']:.2%} | {c['seconds']:.1f} s | measured by train_speed.py |")
    for r in table:
        accuracy = f"{r['accuracy']:.2%}" + (f" ± {r['std']:.2%}" if r["std"] is not None else "")
        spread = f" ({r['seconds_range'][0]:.1f}-{r['seconds_range'][1]:.1f})" if r["seconds_range"] else ""
        lines.append(f"| {r['name']} | {accuracy} | {r['seconds']:.1f} s{spread} | {r['detail']} |")
    for name, accuracy in PUBLISHED:
        lines.append(f"| {name} (published) | {accuracy:.2%} | | other hardware and budget |")
    return "\n".join(lines)


def plot(table: list[dict[str, Any]], competitors: list[dict[str, Any]], path: Path) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from digitlab.figures import new_figure, save_png

    fig = new_figure(figsize=(8, 5))
    ax = fig.subplots()
    styles = {
        "recipe": ("o", "tab:blue"),
        "ensemble": ("s", "tab:green"),
        "tta": ("D", "tab:purple"),
        "competitor": ("^", "tab:red"),
    }
    for r in [*competitors, *table]:
        marker, colour = styles[r["kind"]]
        ax.errorbar(
            r["seconds"],
            100 * r["accuracy"],
            yerr=100 * r["std"] if r.get("std") else None,
            fmt=marker,
            color=colour,
            capsize=3,
        )
        ax.annotate(
            r.get("label") or r["name"],
            (r["seconds"], 100 * r["accuracy"]),
            textcoords="offset points",
            # TTA points sit just above their plain twins: their labels go above, the others' below
            xytext=(6, 2) if r["kind"] == "tta" else (6, -2),
            va="bottom" if r["kind"] == "tta" else "top",
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlim(right=4 * max(r["seconds"] for r in [*competitors, *table]))  # room for the last labels
    for i, (name, accuracy) in enumerate(PUBLISHED):
        ax.axhline(100 * accuracy, color="grey", linestyle="--", linewidth=0.8)
        # x in axes fractions, y in data: the label sits at the left end of its line
        ax.text(
            0.01,
            100 * accuracy,
            f"{name} (published)",
            transform=ax.get_yaxis_transform(),
            fontsize=7,
            color="grey",
            va="bottom" if i % 2 else "top",
        )
    ax.set_xlabel("seconds, whole process(es), from command to exit (log scale)")
    ax.set_ylabel("MNIST test accuracy (%)")
    ax.set_title("digitlab's accuracy/time frontier on a 2-core CPU")
    ax.grid(alpha=0.3, which="both")
    labels = {
        "recipe": "recipe (mean ± std of seeds)",
        "ensemble": "ensemble",
        "tta": "with test-time augmentation",
        "competitor": "other pipeline",
    }
    handles = [ax.plot([], [], styles[k][0], color=styles[k][1])[0] for k in labels]
    ax.legend(handles, list(labels.values()), loc="center left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path, dpi=110)


def cmd_report(args: argparse.Namespace) -> None:
    book = load_book(args.book)
    table = rows(book)
    competitors = [parse_competitor(c) for c in args.competitor]
    print(markdown(table, competitors))
    if args.plot:
        plot(table, competitors, args.plot)
        print(f"\nwrote {args.plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("train", help="train recipes x seeds, each a timed process")
    p.add_argument("--book", type=Path, required=True)
    p.add_argument("--runs", type=Path, required=True, help="dir for the run dirs (RECIPE-sSEED)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--recipes", default="mlp,quick,cnn,best")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--again", action="store_true", help="retrain runs already in the book")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("record", help="add a run timed elsewhere")
    p.add_argument("--book", type=Path, required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--seconds", type=float, help="its whole-process time (leave out when it was not timed)")
    p.add_argument("--command", help="the command that produced it, for the table")
    p.set_defaults(func=cmd_record)
    p = sub.add_parser("ensembles", help="evaluate ensembles of a recipe's first k seeds")
    p.add_argument("--book", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--ensemble", action="append", default=[], help="RECIPE:K1,K2,... (repeatable)")
    p.add_argument("--tta", action="store_true", help="evaluate with test-time augmentation (K may be 1)")
    p.add_argument("--disjoint", action="store_true", help="every disjoint group of K seeds, not only the first")
    p.set_defaults(func=cmd_ensembles)
    p = sub.add_parser("report", help="print the table, draw the plot")
    p.add_argument("--book", type=Path, required=True)
    p.add_argument("--plot", type=Path)
    p.add_argument("--competitor", action="append", default=[], help="NAME=SECONDS:ACCURACY (repeatable)")
    p.set_defaults(func=cmd_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
