"""`csv:DIR`: DIR/train.csv and DIR/test.csv (and optional DIR/val.csv), each with a header row,
numeric feature columns and an integer `label` column; an optional `group` column (any text: a
site, a user, a hospital) is not a feature but the id federation.partition = natural splits by.
Features are standardised with the training split's mean and standard deviation (a constant
column stays 0)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from bpfree_core.data.readers import UserData, register
from bpfree_core.errors import DataError

LABEL = "label"
GROUP = "group"
Table = tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]   # header, x, y, groups


def _table(path: Path, header: list[str] | None) -> Table:
    if not path.is_file():
        raise DataError(f"{path} does not exist; csv:DIR needs DIR/train.csv and DIR/test.csv")
    try:   # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise DataError(f"{path} line {line} is not UTF-8 text (byte {exc.object[exc.start]:#04x}); "
                        "save the table as UTF-8 (CSV UTF-8 in a spreadsheet)") from None
    except csv.Error as exc:
        raise DataError(f"{path} is not a CSV table bpfree can read ({exc})") from None
    if not rows or LABEL not in [c.strip() for c in rows[0]]:
        raise DataError(f"{path}: the first row must be a header with a {LABEL!r} column "
                        f"(it is {rows[0][:6] if rows else 'empty'})")
    names = [c.strip() for c in rows[0]]
    if header is not None and names != header:
        raise DataError(f"{path}: its columns {names} differ from train.csv's {header}; give "
                        "every file the same header")
    col = names.index(LABEL)
    group_col = names.index(GROUP) if GROUP in names else -1
    feats, labels, groups = [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(names):
            raise DataError(f"{path} line {line}: {len(row)} values, the header has {len(names)}")
        if group_col >= 0:
            groups.append(row[group_col].strip())
            row = row[:group_col] + row[group_col + 1:]
        try:
            values = [float(cell) for cell in row]
        except ValueError:
            bad = next(c for c in row if not _is_number(c))
            raise DataError(f"{path} line {line}: {bad!r} is not a number; every column must "
                            "be numeric (encode categories as numbers first)") from None
        labels.append(values.pop(col if group_col < 0 or col < group_col else col - 1))
        feats.append(values)
    width = len(names) - 1 - (group_col >= 0)
    return names, np.asarray(feats, dtype=np.float64).reshape(len(feats), width), \
        np.asarray(labels, dtype=np.float64), np.asarray(groups) if group_col >= 0 else None


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def files(path: str) -> list[Path]:
    return [p for p in (Path(path) / f for f in ("train.csv", "test.csv", "val.csv")) if p.is_file()]


@register("csv", files=files)
def read(path: str) -> UserData:
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"csv folder {folder} does not exist; give --dataset csv:DIR with "
                        "DIR/train.csv and DIR/test.csv")
    header, x_train, y_train, g_train = _table(folder / "train.csv", None)
    _, x_test, y_test, g_test = _table(folder / "test.csv", header)
    _, x_val, y_val, g_val = (_table(folder / "val.csv", header) if (folder / "val.csv").is_file()
                              else (None, None, None, None))
    if not np.isfinite(x_train).all():
        raise DataError(f"{folder / 'train.csv'} has NaN or infinite values; clean or drop them")
    scale = standardiser(x_train)
    groups = {p: g for p, g in (("train", g_train), ("test", g_test), ("val", g_val)) if g is not None}
    return UserData(scale(x_train), y_train, scale(x_test), y_test,
                    None if x_val is None else scale(x_val), y_val, groups=groups)


def standardiser(x_train: np.ndarray):  # noqa: ANN201 - x -> float32 (x - mean) / std
    """Standardisation with the training split's statistics (a constant column stays 0)."""
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0
    return lambda x: ((x - mean) / std).astype(np.float32)


def table_for_prediction(path: Path, dataset: str) -> np.ndarray:
    """Features of `path` (its `label` and `group` columns dropped, if any), standardised with the training
    statistics of `dataset` when that is csv:DIR, else as given."""
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path} is empty")
    names = [c.strip() for c in rows[0]]
    keep = [i for i, n in enumerate(names) if n not in (LABEL, GROUP)]
    try:
        x = np.asarray([[float(r[i]) for i in keep] for r in rows[1:]], dtype=np.float64)
    except (ValueError, IndexError):
        raise DataError(f"{path}: every row must hold a number in every column") from None
    scheme, _, folder = dataset.partition(":")
    if scheme == "csv":
        return standardiser(_table(Path(folder) / "train.csv", None)[1])(x)
    return x.astype(np.float32)
