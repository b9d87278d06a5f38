"""Try training settings through the library and print validation and test accuracy for each, with seeds.

    python benchmarks/recipe_sweep.py --data ../shared/datasets/mnist --model cnn --seeds 0,1,2 \
        '{"epochs": 2, "batch_size": 128, "lr": 8e-3, "augment": false}' ...

Each argument is a JSON object of TrainConfig fields. Choose by validation accuracy; test accuracy is
printed for the record. "train s" is the time spent in training steps (the epochs' own timings).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from digitlab.training import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("settings", nargs="+", help="JSON objects of TrainConfig fields")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="digitlab-sweep-") as tmp:
        for n, text in enumerate(args.settings):
            setting = json.loads(text)
            vals = []
            for seed in [int(s) for s in args.seeds.split(",")]:
                run = train(
                    TrainConfig(
                        model=args.model, data=args.data, out=f"{tmp}/{n}-{seed}", quiet=True, seed=seed, **setting
                    )
                )
                seconds = sum(r["epoch_seconds"] for r in run.history)
                vals.append(run.best_val_accuracy)
                print(
                    f"{text}  seed {seed}: val {run.best_val_accuracy:.2%}  test {run.test_accuracy:.2%}  "
                    f"train {seconds:.1f} s",
                    flush=True,
                )
            print(f"{text}  mean val {statistics.mean(vals):.2%}", flush=True)


if __name__ == "__main__":
    main()
