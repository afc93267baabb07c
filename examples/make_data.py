"""Toy data in each format bpfree reads, to try "Your own data" in README before using yours.

    python examples/make_data.py [DIR]      # default: the current directory

writes DIR/my_data.npz (x_train, y_train, x_test, y_test: 3 classes of 12 features),
DIR/new.npz (x: rows to predict), DIR/my_table/{train,test}.csv (the same rows with a `label`
column) and DIR/pets/{train,test}/<class>/*.png (20x20 grey images: a horizontal or a vertical bar).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def blobs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centers = np.random.default_rng(7).normal(0, 2, (3, 12))
    y = rng.integers(0, 3, n)
    return (centers[y] + rng.normal(0, 1.2, (n, 12))).astype(np.float32), y


def write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
    rows = [",".join(f"{v:.5f}" for v in row) + f",{label}" for row, label in zip(x, y, strict=True)]
    path.write_text("\n".join([header, *rows]) + "\n")


def bar_image(vertical: bool, rng: np.random.Generator, size: int = 20) -> np.ndarray:
    img = rng.integers(0, 60, (size, size)).astype(np.uint8)
    at = rng.integers(2, size - 2)
    if vertical:
        img[:, at] = 255
    else:
        img[at, :] = 255
    return img


def write_images(root: Path, per_class: int, rng: np.random.Generator) -> None:
    from PIL import Image

    for name, vertical in (("horizontal", False), ("vertical", True)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(bar_image(vertical, rng)).save(folder / f"{i:03d}.png")


def main(out: Path) -> None:
    rng = np.random.default_rng(0)
    (x, y), (xt, yt) = blobs(1200, rng), blobs(300, rng)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "my_data.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    np.savez(out / "new.npz", x=blobs(20, rng)[0])
    (out / "my_table").mkdir(exist_ok=True)
    write_csv(out / "my_table" / "train.csv", x, y)
    write_csv(out / "my_table" / "test.csv", xt, yt)
    write_images(out / "pets" / "train", 60, rng)
    write_images(out / "pets" / "test", 20, rng)
    print(f"wrote my_data.npz, new.npz, my_table/ and pets/ in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
