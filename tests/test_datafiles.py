"""Reading a dataset in the background (`prefetch`) while torch imports, and handing it to `data.load`."""

from __future__ import annotations

import subprocess
import sys

import torch

from digitlab import data, datafiles, idx

from .conftest import write_dataset


def test_prefetched_data_is_what_load_reads(tmp_path):
    directory = write_dataset(tmp_path / "d", n_train=300, n_test=50)
    spec = datafiles.get_spec("mnist")
    expected = datafiles.read_arrays(datafiles.locate(directory, spec, download=False), spec)

    datafiles.prefetch(directory)
    files = datafiles.locate(directory, spec, download=False)
    key = datafiles.files_key(spec, files)
    assert key in datafiles._PREFETCHED  # started
    loaded = data.load(directory)
    assert key not in datafiles._PREFETCHED  # taken by load, not left behind
    assert torch.equal(loaded.train_images, torch.from_numpy(expected[0]["train_images"]))
    assert torch.equal(loaded.test_labels, torch.from_numpy(expected[0]["test_labels"]))
    assert loaded.md5 == expected[1]
    assert loaded.train_images.dtype == torch.uint8 and loaded.train_labels.dtype == torch.int64


def test_prefetch_of_missing_data_does_nothing_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.delenv("DIGITLAB_DATA", raising=False)
    monkeypatch.setattr(datafiles, "download_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    before = dict(datafiles._PREFETCHED)
    datafiles.prefetch(tmp_path / "nowhere")
    datafiles.prefetch(tmp_path, dataset="no-such-dataset")
    assert datafiles._PREFETCHED == before


def test_a_file_replaced_after_prefetch_is_read_again(tmp_path):
    directory = write_dataset(tmp_path / "d", n_train=300, n_test=50, seed=1)
    datafiles.prefetch(directory)
    replaced = write_dataset(tmp_path / "d", n_train=200, n_test=50, seed=2)
    assert len(data.load(replaced).train_labels) == 200  # the new files, not the prefetched old ones


def test_a_corrupt_file_found_by_prefetch_is_reported_by_load(tmp_path):
    directory = write_dataset(tmp_path / "d", n_train=300, n_test=50)
    labels = directory / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:20])
    datafiles.prefetch(directory)
    try:
        data.load(directory)
    except idx.DataError as exc:
        assert "t10k-labels-idx1-ubyte.gz" in str(exc)
    else:
        raise AssertionError("a corrupt file loaded")


def test_the_file_layer_does_not_import_torch():
    code = (
        "import sys; from digitlab import datafiles, idx; datafiles.prefetch('/nonexistent'); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
