"""benchmarks.frontier: the book of timed runs, the rows it summarises them into, the table and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import frontier


def fake_run(tmp_path: Path, name: str, accuracy: float) -> Path:
    run_dir = tmp_path / name
    run_dir.mkdir()
    summary = {"test_accuracy": accuracy, "test_ece": 0.002, "best_val_accuracy": accuracy - 0.001}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def book(tmp_path) -> dict:
    book = {"runs": [], "ensembles": []}
    for seed, (accuracy, seconds) in enumerate([(0.995, 250.0), (0.993, 260.0), (0.994, 240.0)]):
        record = frontier.run_record("cnn", seed, fake_run(tmp_path, f"cnn-s{seed}", accuracy), seconds, "cmd")
        frontier.put_run(book, record)
    frontier.put_run(book, frontier.run_record("mlp", 0, fake_run(tmp_path, "mlp-s0", 0.981), 9.0, "cmd"))
    book["ensembles"].append(
        {
            "recipe": "cnn",
            "members": 3,
            "seeds": [0, 1, 2],
            "evaluate_seconds": 8.0,
            "seconds": 758.0,
            "test_accuracy": 0.996,
            "test_ece": 0.003,
            "command": "cmd",
        }
    )
    return book


def test_rows_summarise_seeds_and_sort_by_time(book):
    rows = frontier.rows(book)
    assert [r["name"] for r in rows] == ["--recipe mlp", "--recipe cnn", "ensemble of 3 x --recipe cnn"]
    cnn = rows[1]
    assert cnn["accuracy"] == pytest.approx(0.994)
    assert cnn["std"] == pytest.approx(0.001)
    assert cnn["seconds"] == 250.0 and cnn["seconds_range"] == (240.0, 260.0)
    assert rows[0]["std"] is None  # one seed: no spread to report


def test_recording_a_seed_again_replaces_it(book, tmp_path):
    frontier.put_run(book, frontier.run_record("mlp", 0, fake_run(tmp_path, "mlp-again", 0.982), 8.0, "cmd"))
    mlp = [r for r in book["runs"] if r["recipe"] == "mlp"]
    assert len(mlp) == 1 and mlp[0]["test_accuracy"] == 0.982


def test_book_round_trips_through_its_file(book, tmp_path):
    path = tmp_path / "book.json"
    frontier.save_book(path, book)
    assert frontier.load_book(path) == json.loads(json.dumps(book))
    assert not path.with_name("book.json.tmp").exists()


def test_table_names_every_contender_and_the_published_anchors(book):
    competitor = frontier.parse_competitor("tutorial MLP (a=b)=144.2:0.9824")
    assert competitor["name"] == "tutorial MLP (a=b)" and competitor["seconds"] == 144.2
    table = frontier.markdown(frontier.rows(book), [competitor])
    assert "| --recipe cnn | 99.40% ± 0.10% | 250.0 s (240.0-260.0) |" in table
    assert "| tutorial MLP (a=b) | 98.24% | 144.2 s |" in table
    assert "ttdoucet/mnist, single model (published) | 99.82%" in table


def test_plot_writes_a_png(book, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "img" / "frontier.png"
    frontier.plot(frontier.rows(book), [frontier.parse_competitor("tutorial=144:0.982")], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_names_say_members_and_tta():
    assert frontier.ensemble_name({"recipe": "cnn", "members": 1, "tta": True}) == "--recipe cnn + TTA"
    assert frontier.ensemble_name({"recipe": "best", "members": 5}) == "ensemble of 5 x --recipe best"


def test_an_untimed_seed_counts_for_accuracy_not_for_time(book, tmp_path):
    frontier.put_run(book, frontier.run_record("cnn", 3, fake_run(tmp_path, "cnn-s3", 0.990), None, "cmd"))
    cnn = next(r for r in frontier.rows(book) if r["name"] == "--recipe cnn")
    assert cnn["accuracy"] == pytest.approx((0.995 + 0.993 + 0.994 + 0.990) / 4)
    assert cnn["seconds"] == 250.0 and "seeds 3 not timed" in cnn["detail"]


def test_book_updates_keep_what_another_step_wrote(book, tmp_path):
    """A long `train` and an `ensembles` step write the same book: each re-reads it before writing."""
    path = tmp_path / "book.json"
    frontier.save_book(path, book)
    ensemble = {
        "recipe": "cnn",
        "members": 2,
        "tta": False,
        "seeds": [0, 1],
        "evaluate_seconds": 5.0,
        "seconds": 505.0,
        "test_accuracy": 0.9951,
        "std": 0.0003,
        "test_ece": 0.002,
        "command": "cmd",
        "groups": [{"seeds": [0, 1], "test_accuracy": 0.9953}, {"seeds": [2, 3], "test_accuracy": 0.9949}],
    }
    frontier.update_book(path, lambda b: frontier.put_ensemble(b, ensemble))
    late = frontier.run_record("mlp", 1, fake_run(tmp_path, "mlp-s1", 0.982), 9.5, "cmd")
    frontier.update_book(path, lambda b: frontier.put_run(b, late))
    saved = frontier.load_book(path)
    assert len(saved["ensembles"]) == 2 and len(saved["runs"]) == 5
    row = next(r for r in frontier.rows(saved) if r["name"] == "ensemble of 2 x --recipe cnn")
    assert row["std"] == 0.0003 and "99.53% / 99.49%" in row["detail"] and "seeds 0, 1; 2, 3" in row["detail"]
