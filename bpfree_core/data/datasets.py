"""MNIST and Fashion-MNIST (original IDX .gz files), CIFAR-10 and CIFAR-100 (the official
python-pickle archives): from a local dir, or downloaded to a cache. Your own data
(`model.dataset = npz:PATH | csv:DIR | folder:PATH`) comes through bpfree_core.data.readers; a run
carries its per-sample shape, classes and a content fingerprint in the config (`bind_data`), so
stage workers never need the files and every process that reads them checks they are the same.

Every file is MD5-checked before use. Where the files come from, in order:
1. `data_dir` (the `--data-dir` flag or `train.data_dir`), else `$BPFREE_DATA_DIR`;
   the files may sit in `DIR/` itself or in `DIR/<dataset>/`. A CIFAR archive may also be
   given unpacked (`cifar-10-batches-py/`, `cifar-100-python/`); there is no published MD5 for
   the unpacked files, so only their shapes are checked.
2. The download cache `$BPFREE_CACHE_DIR` (default `~/.cache/bpfree`), filled from the mirrors.

A decompressed copy of each checked IDX .gz is kept in `$BPFREE_DECODED_DIR` (default
`$BPFREE_CACHE_DIR/decoded`), named by the .gz's MD5, so the next process skips gzip (~0.5 s of
CPU per process that loads MNIST: every ClientApp, coordinator and test). It holds the raw bytes
and their CRC-32, checked on every read with the IDX header and size; one that fails is rebuilt
from the .gz, and one that cannot be written is skipped (the run goes on from the .gz).

CIFAR batches are pickles; they are read with an unpickler that builds only plain containers
and numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bpfree_core.data.readers import check, fingerprint, is_user_dataset, reader, sample_shape, source_files
from bpfree_core.errors import ConfigError, DataError
from bpfree_core.run.checkpoint import atomic_write_bytes
from bpfree_core.seeds import generator

log = logging.getLogger(__name__)

DATA_DIR_ENV = "BPFREE_DATA_DIR"
CACHE_DIR_ENV = "BPFREE_CACHE_DIR"
DECODED_DIR_ENV = "BPFREE_DECODED_DIR"
MIRROR_ENV = "BPFREE_MIRROR"  # one base URL that replaces the built-in mirrors (tests, proxies)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    mirrors: tuple[str, ...]
    md5: dict[str, str]            # file name -> MD5 of the .gz
    num_classes: int = 10
    shape: tuple[int, int, int] = (1, 28, 28)
    layout: str = "idx"            # idx: MNIST-style .gz files | cifar: the python-pickle archive
                                   # | user: bpfree_core.data.readers


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
    "cifar10": DatasetSpec(
        "cifar10", ("https://www.cs.toronto.edu/~kriz/",),
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}, 10, (3, 32, 32), "cifar"),
    "cifar100": DatasetSpec(
        "cifar100", ("https://www.cs.toronto.edu/~kriz/",),
        {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}, 100, (3, 32, 32), "cifar"),
}

# CIFAR archive layout: the folder inside, train and test batch files, the label key.
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                ("test_batch",), "labels"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels"),
}


@dataclass(frozen=True)
class Split:
    """Images as float32 in [0, 1], shape (N, C*H*W) (784 for MNIST); labels int64, shape (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor | None = None   # int64 group id per sample (user data that has them)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: torch.Tensor | slice) -> Split:
        groups = None if self.groups is None else self.groups[index]
        return Split(self.images[index], self.labels[index], groups)

    def copy(self) -> Split:
        """Its own storage (a subset is a view that keeps the whole source alive)."""
        return Split(self.images.clone(), self.labels.clone(),
                     None if self.groups is None else self.groups.clone())


@dataclass(frozen=True)
class Dataset:
    spec: DatasetSpec
    train: Split
    test: Split
    val: Split | None = None        # a validation split of the source's own (user data only)
    fingerprint: str = ""           # content fingerprint (user data only)


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
        if spec.layout == "cifar" and (candidate / CIFAR_LAYOUT[spec.name][0]).is_dir():
            return candidate   # unpacked archive
    missing = [f for f in spec.md5 if not (data_dir / spec.name / f).is_file()]
    raise DataError(
        f"{spec.name} files missing in {data_dir} (looked in {data_dir / spec.name} and "
        f"{data_dir}): {', '.join(missing)}; copy the original "
        f"{'python archive' if spec.layout == 'cifar' else 'IDX .gz files'} there or unset the "
        "data dir to download them"
    )


_VERIFIED: set[tuple[str, int, int, str]] = set()   # (path, size, mtime, md5) checked in this process


def _verify(path: Path, expected: str) -> None:
    """The file's MD5 is `expected`; checked once per process while the file is unchanged (a
    ClientApp loads its data every round: hashing 55 MB each time cost 20 ms a client a round)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, expected)
    if key in _VERIFIED:
        return
    actual = md5sum(path)
    if actual == expected:
        _VERIFIED.add(key)
    else:
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


def _idx_header(raw: bytearray, magic: int) -> tuple[int, tuple[int, ...]] | None:
    """(header bytes, declared shape) of IDX bytes of kind `magic` (2051 images, 2049 labels);
    None where the bytes are too short for that header or of another kind."""
    size = 16 if magic == 2051 else 8
    if len(raw) < size or struct.unpack(">I", raw[:4])[0] != magic:
        return None
    return size, struct.unpack(">III" if magic == 2051 else ">I", raw[4:size])


def _whole(raw: bytearray, magic: int) -> bool:
    header = _idx_header(raw, magic)
    return header is not None and len(raw) == header[0] + int(np.prod(header[1]))


def _decompressed(path: Path, magic: int, md5: str) -> bytearray:
    """The bytes inside `path` (a checked .gz whose MD5 is `md5`), from the decoded cache if a
    whole copy is there; else gunzipped, and a copy kept for the next process."""
    cached = Path(os.environ.get(DECODED_DIR_ENV) or default_cache_dir() / "decoded") / f"{md5}.idx"
    try:
        with open(cached, "rb") as fh:
            raw = bytearray(os.fstat(fh.fileno()).st_size)
            read = fh.readinto(raw)
        if read == len(raw) >= 4 and _crc_ok(raw):
            del raw[-4:]   # the checksum trailer (an in-place shrink, no copy)
            if _whole(raw, magic):
                return raw
        log.info("the decoded copy %s is damaged; decoding %s again", cached, path.name)
    except OSError:
        pass
    try:
        with gzip.open(path, "rb") as fh:
            raw = bytearray(fh.read())   # writable: torch takes it without a copy
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} cannot be decompressed ({exc}); replace it with the original") from exc
    _keep(cached, raw)
    return raw


def _crc_ok(raw: bytearray) -> bool:
    """The last 4 bytes are the CRC-32 of the rest (a decoded copy's own check: damaged bytes in
    the cache must never become a run that trains on garbage)."""
    return zlib.crc32(memoryview(raw)[:-4]) == int.from_bytes(raw[-4:], "little")


def _keep(cached: Path, raw: bytearray) -> None:
    """Write the decoded copy (with its CRC-32 trailer) atomically; a cache that cannot be
    written is only skipped."""
    try:
        atomic_write_bytes(cached, bytes(raw) + zlib.crc32(raw).to_bytes(4, "little"))
    except OSError as exc:
        log.debug("decoded copy %s not kept (%s)", cached, exc)


def _read_idx(path: Path, magic: int, md5: str) -> np.ndarray:
    raw = _decompressed(path, magic, md5)
    got = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else magic
    if got != magic:
        raise DataError(f"{path} has IDX magic {got}, expected {magic}: wrong or corrupt file")
    header = _idx_header(raw, magic)
    if header is None:
        raise DataError(f"{path} holds {len(raw)} bytes, too few for an IDX header: truncated")
    size, shape = header
    data = np.frombuffer(raw, dtype=np.uint8, offset=size)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} holds {data.size} values, its header says {shape}: truncated")
    return data.reshape(shape)


def dataset_dir(name: str, data_dir: str | Path | None = None, download_ok: bool = True) -> Path:
    """Return a directory holding the verified .gz files of dataset `name`."""
    spec = builtin_spec(name)
    local = data_dir or os.environ.get(DATA_DIR_ENV)
    if local:
        folder = _find_local(spec, Path(local))
        for fname, md5 in spec.md5.items():
            if (folder / fname).is_file():   # (an unpacked CIFAR archive has no MD5 to check)
                _verify(folder / fname, md5)
        return folder
    if not download_ok:
        raise DataError(f"no data dir given for {name} and downloads are off; pass --data-dir")
    return download(spec, default_cache_dir())


def builtin_spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(SPECS)}, or your "
                          "own: npz:PATH, csv:DIR, folder:PATH")
    return SPECS[name]


_CACHE: dict[tuple[str, str], Dataset] = {}


def release_datasets() -> None:
    """Forget every memoised dataset (the next load_dataset reads the files again)."""
    _CACHE.clear()


def load_dataset(name: str, data_dir: str | Path | None = None, fingerprint: str = "") -> Dataset:
    """Load a dataset (memoised per process), images scaled to [0, 1] and flattened. For your
    own data, `fingerprint` (from the run's config) must match the files' content."""
    if is_user_dataset(name):
        return _load_user(name, fingerprint)
    folder = dataset_dir(name, data_dir)
    key = (name, str(folder.resolve()))
    if key not in _CACHE:
        spec = SPECS[name]
        read = _read_cifar if spec.layout == "cifar" else _read_idx_splits
        _CACHE[key] = Dataset(spec, *read(spec, folder))
    return _CACHE[key]


def _load_user(name: str, expected: str) -> Dataset:
    read, path = reader(name)
    found = fingerprint(source_files(name))
    if expected and found != expected:
        raise DataError(f"the data of model.dataset = {name!r} changed since this run was set up "
                        f"(fingerprint {found}, the run's is {expected}); restore the original "
                        "files or start a new run")
    key = (name, found)
    if key not in _CACHE:
        data = check(read(path), name)
        shape = sample_shape(data.x_train.shape[1:])

        def split(x: np.ndarray, y: np.ndarray, part: str) -> Split:
            groups = data.groups.get(part)
            return Split(torch.from_numpy(x.reshape(len(x), -1)), torch.from_numpy(y),
                         None if groups is None else torch.from_numpy(groups))

        spec = DatasetSpec(name, (), {}, data.classes, shape, "user")
        val = split(data.x_val, data.y_val, "val") if data.x_val is not None else None
        _CACHE[key] = Dataset(spec, split(data.x_train, data.y_train, "train"),
                              split(data.x_test, data.y_test, "test"), val, found)
    return _CACHE[key]


def bind_data(cfg: Any) -> Any:
    """`cfg` (an ExperimentConfig) with its user data's shape, classes and fingerprint filled in
    (read once, here); built-in datasets and already bound configs come back unchanged."""
    m = cfg.model
    if not is_user_dataset(m.dataset):
        return cfg
    scheme, _, path = m.dataset.partition(":")
    name = f"{scheme}:{Path(path).expanduser().resolve()}"   # other processes run elsewhere
    data = load_dataset(name, None, m.data_fingerprint)
    if name == m.dataset and m.data_fingerprint == data.fingerprint and m.input_shape:
        return cfg
    model = dataclasses.replace(m, dataset=name, input_shape=tuple(data.spec.shape),
                                data_classes=data.spec.num_classes,
                                data_fingerprint=data.fingerprint)
    return dataclasses.replace(cfg, model=model)


def run_spec(cfg: Any) -> DatasetSpec:
    """The dataset spec of a run, from its config alone where it can (stage workers have no
    files): built-in specs by name; bound user data from its shape and classes."""
    m = cfg.model
    if not is_user_dataset(m.dataset):
        return builtin_spec(m.dataset)
    if m.input_shape:
        return DatasetSpec(m.dataset, (), {}, m.data_classes, tuple(m.input_shape), "user")
    return load_dataset(m.dataset).spec


def _read_idx_splits(spec: DatasetSpec, folder: Path) -> tuple[Split, Split]:
    """(train, test) from the four IDX .gz files in `folder`."""

    def split(prefix: str) -> Split:
        files = ((f"{prefix}-images-idx3-ubyte.gz", 2051), (f"{prefix}-labels-idx1-ubyte.gz", 2049))
        images, labels = (_read_idx(folder / name, magic, spec.md5[name]) for name, magic in files)
        if len(images) != len(labels):
            raise DataError(f"{folder}: {prefix} has {len(images)} images, {len(labels)} labels")
        # torch's cast and division: numpy's bits (float32 x / 255), 7x faster than numpy's
        x = torch.from_numpy(images.reshape(len(images), -1)).to(torch.float32).div_(255.0)
        return Split(x, torch.from_numpy(labels).to(torch.int64))

    return split("train"), split("t10k")


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other class."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}   # protocol-2 pickles written by Python 3 wrap bytes so

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to load {module}.{name} from a CIFAR batch: the official "
                        "files hold only arrays and lists; replace the file with the original")


def _read_cifar(spec: DatasetSpec, folder: Path) -> tuple[Split, Split]:
    """(train, test) from the archive in `folder`, or from its unpacked folder."""
    inner, train_files, test_files, label_key = CIFAR_LAYOUT[spec.name]
    archive = folder / next(iter(spec.md5))
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                raw = {}
                for f in train_files + test_files:
                    member = members.get(f"{inner}/{f}")
                    if member is None:
                        raise DataError(f"{archive} has no {inner}/{f}: not the official archive")
                    raw[f] = tar.extractfile(member).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{archive} cannot be read ({exc}); replace it with the original") from exc
    else:
        raw = {}
        for f in train_files + test_files:
            path = folder / inner / f
            if not path.is_file():
                raise DataError(f"{path} is missing; unpack the whole official archive there")
            raw[f] = path.read_bytes()

    def split(files: tuple[str, ...]) -> Split:
        xs, ys = [], []
        for f in files:
            try:
                batch = _ArrayUnpickler(io.BytesIO(raw[f]), encoding="bytes").load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
                raise DataError(f"{spec.name} batch {f} is not a valid pickle ({exc}); replace "
                                "it with the original") from exc
            batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
            x = np.asarray(batch.get("data"))
            y = np.asarray(batch.get(label_key, []), dtype=np.int64)
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(y) != len(x):
                raise DataError(f"{spec.name} batch {f}: data {x.dtype} {x.shape} and {len(y)} "
                                f"'{label_key}', expected uint8 (N, 3072) and N labels")
            if len(y) and not (0 <= y.min() and y.max() < spec.num_classes):
                raise DataError(f"{spec.name} batch {f}: labels outside 0..{spec.num_classes - 1}")
            xs.append(x)
            ys.append(y)
        # rows are channel planes (R, G, B), each 32x32 row-major: already (C, H, W) flattened
        images = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
        return Split(images, torch.from_numpy(np.concatenate(ys)))

    return split(train_files), split(test_files)


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
