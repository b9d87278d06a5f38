"""`digitlab predict` end to end through `digitlab.cli.main`: output formats, per-file errors, exit codes."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitlab import idx, prediction
from digitlab.prediction import MAX_INPUT_BYTES, InputItem, expand_inputs

from .conftest import run_main, synthetic_digits
from .test_data import gzip_bomb
from .test_prediction import photo_png, save_checkpoint
from .test_preprocessing import encoded, ink_mask, on_paper, png_bytes, to_u8

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return str(save_checkpoint(tmp_path_factory.mktemp("ckpt"), "cnn"))


@pytest.fixture()
def good(tmp_path) -> Path:
    path = tmp_path / "good.png"
    path.write_bytes(photo_png("7"))
    return path


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def test_table_output(monkeypatch, capsys, ckpt, good):
    code, out, err = run_main(monkeypatch, capsys, "predict", "--checkpoint", ckpt, str(good))
    assert code == 0 and err == ""
    header, row = out.splitlines()
    assert header.split() == ["path", "digit", "confidence", "top-3"]
    assert row.startswith(str(good)) and len(row.split(",")) == 3  # three "digit probability" pairs


def test_json_output_one_object_per_line(monkeypatch, capsys, ckpt, good, tmp_path):
    other = tmp_path / "other.jpg"
    other.write_bytes(encoded(Image.fromarray(to_u8(on_paper(ink_mask("4", 300)))), "JPEG", quality=80))
    code, out, _ = run_main(monkeypatch, capsys, "predict", "--checkpoint", ckpt, "--json", str(good), str(other))
    assert code == 0
    records = json_lines(out)
    assert [r["path"] for r in records] == [str(good), str(other)]
    for r in records:
        assert isinstance(r["digit"], int) and r["error"] is None and len(r["probabilities"]) == 10
        assert r["confidence"] == max(r["probabilities"])


def test_folder_and_idx_inputs(monkeypatch, capsys, ckpt, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.png").write_bytes(photo_png("1"))
    (folder / "sub" / "a.png").write_bytes(photo_png("4"))
    images, _ = synthetic_digits(5, seed=1)
    idx.write_idx(tmp_path / "few-idx3-ubyte.gz", images)
    code, out, _ = run_main(
        monkeypatch, capsys, "predict", "--checkpoint", ckpt, "--json", str(folder), str(tmp_path / "few-idx3-ubyte.gz")
    )
    assert code == 0
    paths = [r["path"] for r in json_lines(out)]
    assert paths == [str(folder / "b.png"), str(folder / "sub" / "a.png")] + [
        f"{tmp_path / 'few-idx3-ubyte.gz'}#{i}" for i in range(5)
    ]


def test_stdin(monkeypatch, capsys, ckpt, good):
    code, out, _ = run_main(
        monkeypatch, capsys, "predict", "--checkpoint", ckpt, "--json", "-", stdin=good.read_bytes()
    )
    assert code == 0
    (record,) = json_lines(out)
    assert record["path"] == "-" and isinstance(record["digit"], int)


def test_reject_below_reports_null(monkeypatch, capsys, ckpt, good):
    code, out, _ = run_main(
        monkeypatch, capsys, "predict", "--checkpoint", ckpt, "--json", "--reject-below", "1", str(good)
    )
    assert code == 0  # a rejection is an answer, not a failure
    (record,) = json_lines(out)
    assert record["digit"] is None and record["rejected"] is True and record["error"] is None
    assert 0 < record["confidence"] < 1


def test_save_preprocessed(monkeypatch, capsys, ckpt, good, tmp_path):
    out_dir = tmp_path / "seen"
    code, out, _ = run_main(
        monkeypatch, capsys, "predict", "--checkpoint", ckpt, "--json", "--save-preprocessed", str(out_dir), str(good)
    )
    assert code == 0
    (record,) = json_lines(out)
    saved = Path(record["preprocessed_path"])
    assert saved.parent == out_dir and saved.name.endswith("good.png.png")
    image = Image.open(saved)
    assert image.size == (28, 28) and image.mode == "L"
    assert [p.name for p in out_dir.iterdir()] == [saved.name]  # no temp files left behind


# ----------------------------------------------------------------------------------------------------------
# Bad input: a one-line error per file, the others still read, exit 1
# ----------------------------------------------------------------------------------------------------------


def _truncated_png() -> bytes:
    whole = photo_png("7", 300)
    return whole[: len(whole) // 2]


def _corrupt_jpeg() -> bytes:
    raw = bytearray(encoded(Image.fromarray(to_u8(on_paper(ink_mask("7", 200)))), "JPEG"))
    start = raw.index(b"\xff\xc0")
    raw[start + 5 : start + 9] = b"\x00\x00\x00\x00"
    return bytes(raw)


BAD_FILES = {
    "not-an-image.png": (lambda: b"just some text\n", "not an image (unrecognised format, 15 bytes)"),
    "empty.png": (lambda: b"", "empty file"),
    "truncated.png": (_truncated_png, "truncated or corrupt image data"),
    "corrupt.jpg": (_corrupt_jpeg, "corrupt JPEG data"),
    "blank.png": (lambda: png_bytes(Image.new("L", (200, 150), 240)), "no ink found"),
    "noise-only.png": (
        lambda: png_bytes(
            Image.fromarray(to_u8(np.clip(0.8 + np.random.default_rng(0).normal(0, 0.01, (120, 160)), 0, 1)))
        ),
        "no ink found",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_a_one_line_error_and_the_others_are_read(monkeypatch, capsys, ckpt, good, tmp_path, name):
    make, defect = BAD_FILES[name]
    bad = tmp_path / name
    bad.write_bytes(make())
    code, out, err = run_main(
        monkeypatch, capsys, "predict", "--checkpoint", ckpt, "--json", str(good), str(bad), str(good)
    )
    assert code == 1
    assert err.splitlines() == [err.strip()] and err.startswith(f"digitlab: error: {bad}: ")
    assert defect in err and "Traceback" not in err
    records = json_lines(out)
    assert [r["error"] is None for r in records] == [True, False, True]
    assert records[1]["digit"] is None and defect in records[1]["error"] and records[1]["path"] == str(bad)
    assert isinstance(records[0]["digit"], int) and isinstance(records[2]["digit"], int)


def test_missing_file(monkeypatch, capsys, ckpt, good, tmp_path):
    code, out, err = run_main(
        monkeypatch, capsys, "predict", "--checkpoint", ckpt, str(tmp_path / "nope.png"), str(good)
    )
    assert code == 1
    assert err.strip() == f"digitlab: error: {tmp_path / 'nope.png'}: file not found"
    assert "error: file not found" in out.splitlines()[1] and out.splitlines()[2].startswith(str(good))


def test_image_over_the_pixel_limit(monkeypatch, capsys, ckpt, good, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(huge)
    code, _, err = run_main(monkeypatch, capsys, "predict", "--checkpoint", ckpt, str(huge), str(good))
    assert code == 1
    assert err.strip() == (
        f"digitlab: error: {huge}: image too large: 8000x6000 = 48.0 megapixels (the limit is 40 megapixels)"
    )


# ----------------------------------------------------------------------------------------------------------
# Issue 11.8: only regular files are read (no FIFO hangs, no /dev/zero), size-capped; link loops named
# ----------------------------------------------------------------------------------------------------------


def expand_within(args: list, seconds: float = 20.0) -> list[InputItem]:
    """expand_inputs on a thread: a regression that blocks (opening a FIFO) fails the test instead of hanging it."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(expand_inputs(args)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"expand_inputs({args}) still blocked after {seconds} s"
    return result[0]


def test_fifo_in_a_folder_is_an_error_line_not_a_hang(tmp_path, good):
    """Issue 11.8: a FIFO inside a folder given to predict hung it forever."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "a.png").write_bytes(good.read_bytes())
    os.mkfifo(folder / "pipe.png")
    items = expand_within([str(folder)])
    assert [i.path for i in items] == [str(folder / "a.png"), str(folder / "pipe.png")]
    assert items[0].error is None
    assert (
        items[1].error == f"{folder / 'pipe.png'}: a FIFO (named pipe), not a regular file (predict reads only "
        "regular files)"
    )


def test_real_process_with_a_fifo_in_the_folder_finishes(ckpt, good, tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "a.png").write_bytes(good.read_bytes())
    os.mkfifo(folder / "b.png")
    result = subprocess.run(
        [sys.executable, "-m", "digitlab", "predict", "--checkpoint", ckpt, "--json", str(folder)],
        capture_output=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    records = json_lines(result.stdout.decode())
    assert isinstance(records[0]["digit"], int) and "a FIFO (named pipe)" in records[1]["error"]
    assert result.stderr.decode().splitlines() == [f"digitlab: error: {records[1]['error']}"]


def test_devices_are_refused_unread(monkeypatch, capsys, ckpt, good):
    """Issue 11.8: /dev/zero was read until memory ran out."""
    assert (
        expand_within(["/dev/zero"])[0].error
        == "/dev/zero: a character device, not a regular file (predict reads only regular files)"
    )
    code, out, err = run_main(monkeypatch, capsys, "predict", "--checkpoint", ckpt, "--json", "/dev/zero", str(good))
    assert (
        code == 1
        and err.strip()
        == "digitlab: error: /dev/zero: a character device, not a regular file (predict reads only regular files)"
    )
    records = json_lines(out)
    assert records[0]["digit"] is None and isinstance(records[1]["digit"], int)


def test_socket_is_refused(tmp_path):
    path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        assert expand_within([str(path)])[0].error.startswith(f"{path}: a socket, not a regular file")


def test_files_over_the_size_cap_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(prediction, "MAX_INPUT_BYTES", 1000)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(2000))
    idx_file = tmp_path / "big-idx3-ubyte"
    idx.write_idx(idx_file, np.zeros((3, 28, 28), np.uint8))
    items = expand_within([str(big), str(idx_file)])
    assert [i.error for i in items] == [
        f"{big}: file too large: 2004 bytes (the limit is 1000 bytes)",
        f"{idx_file}: file too large: {16 + 3 * 784} bytes (the limit is 1000 bytes)",
    ]
    assert prediction.MAX_INPUT_BYTES == 1000 and 32 << 20 <= MAX_INPUT_BYTES <= 256 << 20  # a sensible default


def test_stdin_is_read_no_further_than_the_cap(monkeypatch):
    monkeypatch.setattr(prediction, "MAX_INPUT_BYTES", 1000)
    with open("/dev/zero", "rb") as zero:  # endless: only the cap stops the read
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(zero))
        raw = prediction.read_stdin()
    assert len(raw) == 1001
    (item,) = expand_inputs(["-"], stdin=lambda: raw)
    assert item.error == "<stdin>: input too large: over 1000 bytes"


def test_symlink_loops_get_their_own_message(monkeypatch, capsys, ckpt, good, tmp_path):
    """Issue 11.8: a link loop is named as one, given directly or met in a folder, whatever its name."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "a.png").write_bytes(good.read_bytes())
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "noname").symlink_to("noname")
    (folder / "up").symlink_to("..")  # a cycle of folders: not followed, so the walk ends
    items = expand_within([str(folder), str(folder / "loop.png")])
    loop = "symbolic link loop (the link leads back to itself)"
    assert [(i.path, i.error) for i in items] == [
        (str(folder / "a.png"), None),
        (str(folder / "loop.png"), f"{folder / 'loop.png'}: {loop}"),
        (str(folder / "noname"), f"{folder / 'noname'}: {loop}"),
        (str(folder / "loop.png"), f"{folder / 'loop.png'}: {loop}"),
    ]
    code, _, err = run_main(monkeypatch, capsys, "predict", "--checkpoint", ckpt, str(folder / "loop.png"))
    assert code == 1 and err.strip() == f"digitlab: error: {folder / 'loop.png'}: {loop}"


def test_gzip_bomb_as_an_idx_input_is_refused(tmp_path):
    """Issue 11.6 through predict: an IDX input is decompressed no further than its header says."""
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    bomb.write_bytes(gzip_bomb())
    items = expand_within([str(bomb)])
    assert len(items) == 1 and "trailing bytes: 7856 bytes expected" in items[0].error


@pytest.mark.parametrize(
    "given, defect",
    [
        (b"", "empty file"),
        (png_bytes(Image.new("L", (90, 90), 255)), "no ink found: the image is uniform (blank)"),
    ],
)
def test_bad_stdin(monkeypatch, capsys, ckpt, given, defect):
    code, out, err = run_main(monkeypatch, capsys, "predict", "--checkpoint", ckpt, "--json", "-", stdin=given)
    assert code == 1 and err.strip() == f"digitlab: error: <stdin>: {defect}"
    assert json_lines(out)[0]["path"] == "-"


def test_bad_checkpoint_is_one_line(monkeypatch, capsys, good, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, "predict", "--checkpoint", str(tmp_path / "nothing"), str(good))
    assert code == 1 and out == ""
    assert err.strip() == f"digitlab: error: {tmp_path / 'nothing'}: file not found"


@pytest.mark.parametrize(
    "args",
    [
        ["predict", "--checkpoint", "CKPT"],  # no inputs
        ["predict", "GOOD"],  # no checkpoint
        ["predict", "--checkpoint", "CKPT", "--reject-below", "1.5", "GOOD"],
        ["predict", "--checkpoint", "CKPT", "--batch-size", "0", "GOOD"],
        ["predict", "--checkpoint", "CKPT", "--no-such-option", "GOOD"],
    ],
)
def test_usage_errors_exit_2(monkeypatch, capsys, ckpt, good, args):
    args = [ckpt if a == "CKPT" else str(good) if a == "GOOD" else a for a in args]
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and out == "" and "Traceback" not in err


def test_real_process_stdin_and_errors(ckpt, good, tmp_path):
    """The installed entry point in a separate process: stdin, a bad file, exit code 1, no traceback."""
    (tmp_path / "bad.png").write_bytes(b"nope")
    result = subprocess.run(
        [sys.executable, "-m", "digitlab", "predict", "--checkpoint", ckpt, "--json", "-", str(tmp_path / "bad.png")],
        input=good.read_bytes(),
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    records = json_lines(result.stdout.decode())
    assert records[0]["path"] == "-" and isinstance(records[0]["digit"], int)
    assert records[1]["error"].endswith("bad.png: not an image (unrecognised format, 4 bytes)")
    assert result.stderr.decode().strip().splitlines() == [records[1]["error"].join(["digitlab: error: ", ""])]
