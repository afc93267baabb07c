"""Data: MD5-checked IDX files from a local dir or downloaded (from a loopback HTTP server)."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bpfree_core.data import datasets as data
from bpfree_core.errors import DataError
from tests.support import REPO, serve

MNIST_FILES = list(data.SPECS["mnist"].md5)


def test_real_mnist_loads_with_expected_shapes(data_dir):
    ds = data.load_dataset("mnist", data_dir)
    assert ds.train.images.shape == (60000, 784) and ds.test.images.shape == (10000, 784)
    assert ds.train.images.dtype == torch.float32
    assert 0.0 <= float(ds.train.images.min()) and float(ds.train.images.max()) <= 1.0
    assert torch.equal(ds.train.labels.unique(), torch.arange(10))
    assert ds.train.labels.dtype == torch.int64
    # the pixels are numpy's float32(x) / 255 bit for bit (every committed run was trained on them)
    raw = gzip.open(Path(data_dir) / "mnist" / "t10k-images-idx3-ubyte.gz").read()[16:]
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(10000, 784).astype(np.float32) / 255.0
    assert torch.equal(ds.test.images, torch.from_numpy(pixels))


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


# -- CIFAR: the real loader on small archives made here in the official format ------------------

def make_cifar(root: Path, name: str, per_batch: int = 8) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny CIFAR archive laid out as the official one (pickled dicts with bytes keys, uint8
    rows of 3072 = R, G, B planes); returns the .tar.gz and the pixels per batch file."""
    inner, train_files, test_files, label_key = data.CIFAR_LAYOUT[name]
    classes = data.SPECS[name].num_classes
    rng = np.random.default_rng(0)
    folder = root / "src" / inner
    folder.mkdir(parents=True)
    pixels = {}
    for i, f in enumerate(train_files + test_files):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        entry = {b"batch_label": f.encode(), b"data": x,
                 label_key.encode(): [int(v) for v in (np.arange(per_batch) + i) % classes],
                 b"filenames": [f"{f}_{j}.png".encode() for j in range(per_batch)]}
        if name == "cifar100":
            entry[b"coarse_labels"] = [0] * per_batch
        (folder / f).write_bytes(pickle.dumps(entry, protocol=2))
        pixels[f] = x
    archive = root / next(iter(data.SPECS[name].md5))
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=inner)
    return archive, pixels


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_archive_loads_checked_from_a_dir_and_from_a_download(name, tmp_path, monkeypatch):
    archive, pixels = make_cifar(tmp_path, name)
    spec = data.SPECS[name]
    # our archive is not the official one: its MD5 fails until the test names it
    with pytest.raises(DataError, match="corrupt or truncated"):
        data.dataset_dir(name, tmp_path)
    monkeypatch.setitem(data.SPECS, name, dataclasses.replace(
        spec, md5={archive.name: data.md5sum(archive)}))
    ds = data.load_dataset(name, tmp_path)
    train_files, test_files = data.CIFAR_LAYOUT[name][1:3]
    assert ds.train.images.shape == (8 * len(train_files), 3072)
    assert ds.test.images.shape == (8 * len(test_files), 3072)
    first = ds.train.images[0].view(3, 32, 32)                  # (C, H, W): R plane first
    raw = pixels[train_files[0]][0]
    assert torch.equal(first[1, 0, :] * 255, torch.from_numpy(raw[1024:1056].astype(np.float32)))
    assert ds.test.labels.tolist() == [(i + len(train_files)) % spec.num_classes for i in range(8)]
    with serve(tmp_path) as url:                                 # the download path, MD5 checked
        folder = data.download(data.SPECS[name], tmp_path / "cache", mirrors=(url,))
    assert data.md5sum(folder / archive.name) == data.md5sum(archive)
    # unpacked: read from the folder
    unpacked = tmp_path / "unpacked" / name
    shutil.copytree(tmp_path / "src", unpacked)
    again = data.load_dataset(name, tmp_path / "unpacked")
    assert torch.equal(again.train.images, ds.train.images)


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path, monkeypatch):
    archive, _ = make_cifar(tmp_path, "cifar10")
    evil = tmp_path / "evil" / "cifar-10-batches-py"
    shutil.copytree(tmp_path / "src" / "cifar-10-batches-py", evil)

    class Boom:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (evil / "test_batch").write_bytes(pickle.dumps({b"data": Boom()}, protocol=2))
    with pytest.raises(DataError, match="refusing to load posix.system"):
        data.load_dataset("cifar10", tmp_path / "evil")
    assert not (tmp_path / "pwned").exists()
    (evil / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8),
                                                    b"labels": [0, 1]}, protocol=2))
    with pytest.raises(DataError, match=r"expected uint8 \(N, 3072\)"):
        data.load_dataset("cifar10", tmp_path / "evil")


@pytest.mark.parametrize("extra", [("model.algorithm=deeper", "model.conv=10,20", "model.hidden=[]"),
                                   ("model.algorithm=symba", "model.hidden=40,40"),
                                   ("model.algorithm=ff", "model.hidden=40,40"),
                                   ("model.algorithm=bp", "model.conv=8", "model.hidden=20")])
def test_colour_images_train_every_family(extra, tmp_path, monkeypatch):
    from bpfree_core.config import load_config
    from bpfree_core.run.trainer import train_reference

    archive, _ = make_cifar(tmp_path, "cifar10", per_batch=40)
    monkeypatch.setitem(data.SPECS, "cifar10", dataclasses.replace(
        data.SPECS["cifar10"], md5={archive.name: data.md5sum(archive)}))
    cfg = load_config(None, ["model.dataset=cifar10", f"train.data_dir={tmp_path}", "train.epochs=1",
                             "train.batch_size=20", "train.threads=1", "train.predict=both"
                             if "bp" not in extra[0] else "train.predict=softmax",
                             "train.jitter=2", *extra])
    summary = train_reference(cfg, None, progress=False)
    assert all(0 <= v <= 1 for v in summary["test_accuracy_by_method"].values())
    assert summary["weights"]


def test_without_a_local_copy_the_tests_get_mnist_the_way_users_do(data_dir, tmp_path, monkeypatch):
    """No $BPFREE_TEST_DATA_DIR copy and no ../shared: the fixture downloads (here from a
    loopback mirror) into the project's cache, MD5-checked, and the data loads from there."""
    from tests.support import mnist_dir

    with serve(data_dir / "mnist") as url:
        monkeypatch.setenv("BPFREE_TEST_DATA_DIR", str(tmp_path / "nothing-here"))
        monkeypatch.setenv(data.MIRROR_ENV, url)
        monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))
        got = mnist_dir(shared=tmp_path / "no-shared")
    assert got == tmp_path / "cache"
    for name, md5 in data.SPECS["mnist"].md5.items():
        assert data.md5sum(got / "mnist" / name) == md5
    assert len(data.load_dataset("mnist", got).train) == 60_000


def _fresh_load(data_dir: Path) -> data.Dataset:
    data._CACHE.clear()   # the per-process memo; the decoded copies on disk stay
    return data.load_dataset("mnist", data_dir)


def test_a_decoded_copy_skips_gzip_in_the_next_process_with_the_same_bits(data_dir, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv(data.DECODED_DIR_ENV, str(tmp_path / "decoded"))
    first = _fresh_load(data_dir)
    spec = data.SPECS["mnist"]
    assert sorted(p.name for p in (tmp_path / "decoded").iterdir()) == sorted(
        f"{md5}.idx" for md5 in spec.md5.values())

    def no_gzip(*args, **kwargs):
        raise AssertionError("gzip was opened although a decoded copy is there")

    monkeypatch.setattr(data.gzip, "open", no_gzip)
    again = _fresh_load(data_dir)
    assert torch.equal(first.train.images, again.train.images)
    assert torch.equal(first.test.labels, again.test.labels)


def test_a_truncated_decoded_copy_is_rebuilt_and_an_unwritable_cache_is_skipped(data_dir, tmp_path,
                                                                                 monkeypatch):
    decoded = tmp_path / "decoded"
    monkeypatch.setenv(data.DECODED_DIR_ENV, str(decoded))
    first = _fresh_load(data_dir)
    copy = decoded / f"{data.SPECS['mnist'].md5['train-images-idx3-ubyte.gz']}.idx"
    whole = copy.stat().st_size
    copy.write_bytes(copy.read_bytes()[:5000])   # e.g. a disk that filled up under another writer
    assert torch.equal(_fresh_load(data_dir).train.images, first.train.images)
    assert copy.stat().st_size == whole
    assert sorted(os.listdir(decoded)) == sorted(f"{m}.idx" for m in data.SPECS["mnist"].md5.values())
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv(data.DECODED_DIR_ENV, str(blocked / "decoded"))
    assert torch.equal(_fresh_load(data_dir).train.images, first.train.images)
    assert sorted(os.listdir(tmp_path)) == ["a-file", "decoded"]   # no temp file left anywhere


def test_damaged_bytes_in_a_decoded_copy_are_caught_and_rebuilt(data_dir, tmp_path, monkeypatch):
    """Issue 38, case 3: zeroed labels in the decoded cache trained a run to 0.098 and exited 0."""
    decoded = tmp_path / "decoded"
    monkeypatch.setenv(data.DECODED_DIR_ENV, str(decoded))
    first = _fresh_load(data_dir)
    copy = decoded / f"{data.SPECS['mnist'].md5['train-labels-idx1-ubyte.gz']}.idx"
    raw = bytearray(copy.read_bytes())
    raw[8:-4] = bytes(len(raw) - 12)   # every label 0; header, size and trailer as they were
    copy.write_bytes(bytes(raw))
    again = _fresh_load(data_dir)
    assert torch.equal(again.train.labels, first.train.labels) and again.train.labels.unique().numel() == 10
    assert copy.read_bytes() != bytes(raw)   # rebuilt


def test_offline_without_a_copy_data_tests_skip_naming_the_variable_and_ci_fails_them(tmp_path):
    """A fresh clone with no ../shared, offline: the tests that need MNIST skip with one reason
    (not 74 errors naming a flag pytest does not have); BPFREE_REQUIRE_TEST_DATA makes it a failure."""
    clone = tmp_path / "main"
    (clone / "tests").mkdir(parents=True)
    for name in ("conftest.py", "support.py", "__init__.py"):
        if (REPO / "tests" / name).exists():
            shutil.copy(REPO / "tests" / name, clone / "tests" / name)
    shutil.copy(REPO / "pyproject.toml", clone / "pyproject.toml")
    (clone / "tests" / "test_needs_mnist.py").write_text(
        "def test_it(data_dir):\n    assert data_dir.is_dir()\n")
    env = {**os.environ, "BPFREE_TEST_DATA_DIR": str(tmp_path / "none"), "BPFREE_MIRROR":
           "http://127.0.0.1:9/", "BPFREE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("BPFREE_REQUIRE_TEST_DATA", None)
    run = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"]
    done = subprocess.run(run, cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout[-2000:]
    assert "set BPFREE_TEST_DATA_DIR" in done.stdout
    strict = subprocess.run(run, cwd=clone, env={**env, "BPFREE_REQUIRE_TEST_DATA": "1"},
                            capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1, strict.stdout[-2000:]
    assert "BPFREE_REQUIRE_TEST_DATA is set" in strict.stdout
