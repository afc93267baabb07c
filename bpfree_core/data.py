"""MNIST and Fashion-MNIST from their original IDX .gz files: local dir, or downloaded to a cache.

Every file is MD5-checked before use. Where the files come from, in order:
1. `data_dir` (the `--data-dir` flag or `train.data_dir`), else `$BPFREE_DATA_DIR`;
   the files may sit in `DIR/` itself or in `DIR/<dataset>/`.
2. The download cache `$BPFREE_CACHE_DIR` (default `~/.cache/bpfree`), filled from the mirrors.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bpfree_core.errors import ConfigError, DataError
from bpfree_core.seeds import generator

log = logging.getLogger(__name__)

DATA_DIR_ENV = "BPFREE_DATA_DIR"
CACHE_DIR_ENV = "BPFREE_CACHE_DIR"
MIRROR_ENV = "BPFREE_MIRROR"  # one base URL that replaces the built-in mirrors (tests, proxies)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    mirrors: tuple[str, ...]
    md5: dict[str, str]            # file name -> MD5 of the .gz
    num_classes: int = 10
    shape: tuple[int, int, int] = (1, 28, 28)


SPECS = {
    "mnist": DatasetSpec(
        "mnist",
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}


@dataclass(frozen=True)
class Split:
    """Images as float32 in [0, 1], shape (N, 784); labels int64, shape (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: torch.Tensor | slice) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Dataset:
    spec: DatasetSpec
    train: Split
    test: Split


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "bpfree")


def _find_local(spec: DatasetSpec, data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise DataError(
            f"data directory {data_dir} does not exist; pass an existing --data-dir (or "
            f"${DATA_DIR_ENV}) holding the {spec.name} .gz files, or leave both unset to download"
        )
    for candidate in (data_dir / spec.name, data_dir):
        if all((candidate / f).is_file() for f in spec.md5):
            return candidate
    missing = [f for f in spec.md5 if not (data_dir / spec.name / f).is_file()]
    raise DataError(
        f"{spec.name} files missing in {data_dir} (looked in {data_dir / spec.name} and "
        f"{data_dir}): {', '.join(missing)}; copy the original IDX .gz files there or unset "
        "the data dir to download them"
    )


def _verify(path: Path, expected: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise DataError(
            f"{path} is corrupt or truncated (MD5 {actual}, expected {expected}); delete it and "
            "download it again, or replace it with the original file"
        )


def download(spec: DatasetSpec, cache_dir: Path, mirrors: tuple[str, ...] | None = None) -> Path:
    """Fill `cache_dir/<name>/` with verified files, downloading only what is missing or bad."""
    target = cache_dir / spec.name
    target.mkdir(parents=True, exist_ok=True)
    env_mirror = os.environ.get(MIRROR_ENV)
    mirrors = mirrors or ((env_mirror,) if env_mirror else spec.mirrors)
    for fname, md5 in spec.md5.items():
        dest = target / fname
        if dest.is_file() and md5sum(dest) == md5:
            continue
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + fname
            try:
                _fetch(url, dest, md5)
                break
            except (urllib.error.URLError, OSError, DataError) as exc:
                errors.append(f"{url}: {exc}")
        else:
            raise DataError(
                f"could not download {fname} for {spec.name}: " + "; ".join(errors)
                + f". Download it by hand into {target} or pass --data-dir"
            )
    return target


def _fetch(url: str, dest: Path, md5: str) -> None:
    log.info("downloading %s", url)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        _verify(Path(tmp), md5)
        os.replace(tmp, dest)  # atomic: a half-written file never has the final name
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} cannot be decompressed ({exc}); replace it with the original") from exc
    got, count = struct.unpack(">II", raw[:8])
    if got != magic:
        raise DataError(f"{path} has IDX magic {got}, expected {magic}: wrong or corrupt file")
    if magic == 2051:
        rows, cols = struct.unpack(">II", raw[8:16])
        data = np.frombuffer(raw, dtype=np.uint8, offset=16)
        shape: tuple[int, ...] = (count, rows, cols)
    else:
        data = np.frombuffer(raw, dtype=np.uint8, offset=8)
        shape = (count,)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} holds {data.size} values, its header says {shape}: truncated")
    return data.reshape(shape)


def dataset_dir(name: str, data_dir: str | Path | None = None, download_ok: bool = True) -> Path:
    """Return a directory holding the verified .gz files of dataset `name`."""
    if name not in SPECS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(SPECS)}")
    spec = SPECS[name]
    local = data_dir or os.environ.get(DATA_DIR_ENV)
    if local:
        folder = _find_local(spec, Path(local))
        for fname, md5 in spec.md5.items():
            _verify(folder / fname, md5)
        return folder
    if not download_ok:
        raise DataError(f"no data dir given for {name} and downloads are off; pass --data-dir")
    return download(spec, default_cache_dir())


_CACHE: dict[tuple[str, str], Dataset] = {}


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset (memoised per process), images scaled to [0, 1] and flattened."""
    folder = dataset_dir(name, data_dir)
    key = (name, str(folder.resolve()))
    if key not in _CACHE:
        spec = SPECS[name]

        def split(prefix: str) -> Split:
            images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051)
            labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049)
            if len(images) != len(labels):
                raise DataError(f"{folder}: {prefix} has {len(images)} images, {len(labels)} labels")
            x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
            return Split(x, torch.from_numpy(labels.astype(np.int64)))

        _CACHE[key] = Dataset(spec, split("train"), split("t10k"))
    return _CACHE[key]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled batch indices of one epoch, a pure function of (seed, epoch).

    The last, smaller batch is dropped so every batch has the same shape.
    """
    gen = generator(seed, "epoch", epoch)
    perm = torch.randperm(n, generator=gen)
    full = n // batch_size
    if full == 0:
        raise ConfigError(f"train.batch_size = {batch_size} exceeds the {n} training samples")
    return list(perm[: full * batch_size].view(full, batch_size))
