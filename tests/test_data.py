"""Data: MD5-checked IDX files from a local dir or downloaded (from a loopback HTTP server)."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from bpfree_core import data
from bpfree_core.errors import DataError

MNIST_FILES = list(data.SPECS["mnist"].md5)


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 (ephemeral port) serving `directory`."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_real_mnist_loads_with_expected_shapes(data_dir):
    ds = data.load_dataset("mnist", data_dir)
    assert ds.train.images.shape == (60000, 784) and ds.test.images.shape == (10000, 784)
    assert ds.train.images.dtype == torch.float32
    assert 0.0 <= float(ds.train.images.min()) and float(ds.train.images.max()) <= 1.0
    assert torch.equal(ds.train.labels.unique(), torch.arange(10))


def test_download_into_cache_verifies_and_reuses(data_dir, tmp_path):
    with serve(data_dir / "mnist") as url:
        folder = data.download(data.SPECS["mnist"], tmp_path / "cache", mirrors=(url,))
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_FILES)
    for name in MNIST_FILES:
        assert data.md5sum(folder / name) == data.SPECS["mnist"].md5[name]
    # Second call: everything is cached and verified, so no server is needed at all.
    assert data.download(data.SPECS["mnist"], tmp_path / "cache", mirrors=("http://127.0.0.1:9/",))


def test_download_through_env_mirror_and_dataset_dir(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))
    with serve(data_dir / "mnist") as url:
        monkeypatch.setenv(data.MIRROR_ENV, url)
        folder = data.dataset_dir("mnist")
    assert folder == tmp_path / "cache" / "mnist"


def test_corrupt_download_is_rejected_and_not_kept(data_dir, tmp_path):
    bad = tmp_path / "served"
    bad.mkdir()
    for name in MNIST_FILES:
        shutil.copy(data_dir / "mnist" / name, bad / name)
    (bad / MNIST_FILES[1]).write_bytes(b"not the real file")
    with serve(bad) as url, pytest.raises(DataError) as err:
        data.download(data.SPECS["mnist"], tmp_path / "cache", mirrors=(url,))
    assert MNIST_FILES[1] in str(err.value) and "MD5" in str(err.value)
    assert not (tmp_path / "cache" / "mnist" / MNIST_FILES[1]).exists()


def test_unreachable_mirror_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="could not download train-images.*--data-dir"):
        data.download(data.SPECS["mnist"], tmp_path / "cache", mirrors=("http://127.0.0.1:9/",))


def test_truncated_local_file_is_a_clear_error(data_dir, tmp_path):
    local = tmp_path / "mnist"
    local.mkdir()
    for name in MNIST_FILES:
        shutil.copy(data_dir / "mnist" / name, local / name)
    path = local / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError) as err:
        data.load_dataset("mnist", tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(err.value) and "truncated" in str(err.value)


def test_missing_data_dir_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.dataset_dir("mnist", tmp_path / "nope")
    with pytest.raises(DataError, match="files missing"):
        data.dataset_dir("mnist", tmp_path)


def test_epoch_batches_are_a_pure_function_of_seed_and_epoch():
    a = data.epoch_batches(1000, 64, seed=3, epoch=1)
    b = data.epoch_batches(1000, 64, seed=3, epoch=1)
    c = data.epoch_batches(1000, 64, seed=3, epoch=2)
    assert len(a) == 1000 // 64 and all(len(x) == 64 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert torch.cat(a).unique().numel() == 64 * len(a)   # no sample twice in an epoch
