"""Your own data: one reader module per source, behind `model.dataset = SCHEME:PATH`.

    npz:PATH      arrays x_train, y_train, x_test, y_test (+ optional x_val, y_val)   (npz.py)
    csv:DIR       DIR/train.csv and DIR/test.csv: a header, numeric columns, `label`   (csv_table.py)
    folder:PATH   PATH/train/<class>/*.png|jpg and PATH/test/<class>/*; @HxW resizes   (image_folder.py)

A reader returns a `UserData`; `check` refuses, in one sentence naming the file and the fix, what
cannot be trained on (mismatched lengths, labels that are not integers in 0..C-1, NaN or infinite
features, shapes that differ between train and test, an empty split). Adding a source is one
module in this package with `@register("scheme", files=...)` on its `read(path) -> UserData`
(`files(path)` lists what the content fingerprint covers), and its test: modules are found here.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bpfree_core.errors import ConfigError, DataError

READERS: dict[str, Callable[[str], UserData]] = {}
FILES: dict[str, Callable[[str], list[Path]]] = {}   # scheme -> the files a source is read from


@dataclass(frozen=True)
class UserData:
    """Arrays of one user dataset: features float32 (N, *shape), labels int64 (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    classes: int = 0                       # 0: max label + 1
    class_names: tuple[str, ...] = ()
    groups: dict[str, np.ndarray] = field(default_factory=dict)   # split -> group id per sample
                                           # (federation.partition = natural); ints 0..G-1 after check


def register(scheme: str, files: Callable[[str], list[Path]] | None = None
             ) -> Callable[[Callable[[str], UserData]], Callable[[str], UserData]]:
    """Register `read` for `model.dataset = scheme:PATH`; `files(PATH)` (default: the one file
    PATH) lists what the content fingerprint covers."""
    def wrap(read: Callable[[str], UserData]) -> Callable[[str], UserData]:
        READERS[scheme] = read
        FILES[scheme] = files or (lambda path: [Path(path)] if Path(path).is_file() else [])
        return read
    return wrap


def schemes() -> list[str]:
    """Every source this package's modules register (imported on first use)."""
    if not READERS:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
    return sorted(READERS)


def is_user_dataset(name: str) -> bool:
    return ":" in name


def reader(name: str) -> tuple[Callable[[str], UserData], str]:
    """(read, path) for `model.dataset = SCHEME:PATH`."""
    scheme, _, path = name.partition(":")
    if scheme not in schemes():
        raise ConfigError(f"model.dataset = {name!r}: unknown source {scheme!r}; use "
                          f"{', '.join(f'{s}:PATH' for s in schemes())} or a built-in dataset")
    if not path:
        raise ConfigError(f"model.dataset = {name!r} names no path; give {scheme}:PATH")
    return READERS[scheme], path


def source_files(name: str) -> list[Path]:
    """The files a user dataset is read from (what its fingerprint covers)."""
    _, path = reader(name)
    return FILES[name.partition(":")[0]](path)


_FINGERPRINTS: dict[tuple[tuple[str, int, int], ...], str] = {}


def fingerprint(paths: list[Path]) -> str:
    """SHA-256 (first 16 hex digits) of the files' names and bytes, in the order given; hashed
    once per process while no file's size or modification time changes (every entry point
    checks the run's data, and an image folder can be large)."""
    key = tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = _hash(paths)
    return _FINGERPRINTS[key]


def _hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def check(data: UserData, source: str) -> UserData:
    """`data` with labels as int64 and features as float32, or a DataError naming `source`."""
    splits = [("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)]
    if data.x_val is not None or data.y_val is not None:
        if data.x_val is None or data.y_val is None:
            raise DataError(f"{source}: give both x_val and y_val, or neither")
        splits.append(("val", data.x_val, data.y_val))
    out = {}
    for part, x, y in splits:
        x, y = np.asarray(x), np.asarray(y)
        if len(x) == 0:
            raise DataError(f"{source}: the {part} split is empty; give it at least one sample")
        if len(x) != len(y):
            raise DataError(f"{source}: {part} has {len(x)} samples but {len(y)} labels; give "
                            "one label per sample")
        if y.ndim != 1:
            raise DataError(f"{source}: {part} labels have shape {y.shape}; give one integer "
                            "label per sample, shape (N,)")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"{source}: {part} features are {x.dtype}, not real numbers")
        out[part] = (x, _integer_labels(y, source, part))
        if not np.isfinite(out[part][0]).all():
            bad = int((~np.isfinite(out[part][0].astype(np.float64))).reshape(len(x), -1)
                      .any(1).argmax())
            raise DataError(f"{source}: {part} sample {bad} has NaN or infinite features; clean "
                            "or drop it")
    shape = out["train"][0].shape[1:]
    for part, (x, _) in out.items():
        if x.shape[1:] != shape:
            raise DataError(f"{source}: {part} samples have shape {x.shape[1:]} but train "
                            f"samples {shape}; every split needs the same per-sample shape")
    classes = data.classes or int(out["train"][1].max()) + 1
    if classes < 2:
        raise DataError(f"{source}: the training labels hold one class only; give at least two")
    for part, (_, y) in out.items():
        if y.min() < 0 or y.max() >= classes:
            raise DataError(f"{source}: {part} labels span {int(y.min())}..{int(y.max())}, outside "
                            f"0..{classes - 1} (the classes of the training labels)")
    x = {p: as_features(v) for p, (v, _) in out.items()}
    y = {p: labels for p, (_, labels) in out.items()}
    return UserData(x["train"], y["train"], x["test"], y["test"], x.get("val"), y.get("val"),
                    classes, data.class_names, _group_ids(data.groups, x, source))


def _group_ids(groups: dict[str, np.ndarray], x: dict[str, np.ndarray], source: str
               ) -> dict[str, np.ndarray]:
    """Each split's group values as int64 ids 0..G-1, one numbering over every split: sorted
    numbers when all are integers, else sorted text."""
    if not groups:
        return {}
    if "train" not in groups:
        raise DataError(f"{source}: group ids are given for {', '.join(sorted(groups))} but not for "
                        "train; give one group id per training sample")
    given = {part: np.asarray(g) for part, g in groups.items() if part in x}
    for part, g in given.items():
        if g.shape != (len(x[part]),):
            raise DataError(f"{source}: {part} group ids have shape {g.shape}; give one per sample, "
                            f"shape ({len(x[part])},)")
    numeric = all(np.issubdtype(g.dtype, np.integer) for g in given.values())
    values = {p: (g.astype(np.int64) if numeric else g.astype(str)) for p, g in given.items()}
    ids = np.unique(np.concatenate(list(values.values())))
    return {p: np.searchsorted(ids, v).astype(np.int64) for p, v in values.items()}


def _integer_labels(y: np.ndarray, source: str, part: str) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)
    example = next((v for v in y.tolist() if not isinstance(v, int)
                    and not (isinstance(v, float) and v.is_integer())), y.flat[0])
    raise DataError(f"{source}: {part} labels must be whole numbers 0..C-1, found {example!r}; "
                    "map your classes to integers first")


def as_features(x: np.ndarray) -> np.ndarray:
    """uint8 images scaled to [0, 1] (like the built-in datasets); other numbers as given."""
    return (x.astype(np.float32) / 255.0) if x.dtype == np.uint8 else x.astype(np.float32)


def sample_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """A per-sample shape as (C, H, W): (D,) features -> (1, 1, D); (H, W) -> (1, H, W)."""
    if len(shape) == 1:
        return (1, 1, shape[0])
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        return tuple(shape)   # type: ignore[return-value]
    raise DataError(f"samples of shape {shape}: give flat features (D,), images (H, W) or "
                    "(C, H, W)")
