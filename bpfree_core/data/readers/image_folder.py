"""`folder:PATH[@HxW]`: images in PATH/train/<class>/ and PATH/test/<class>/ (PNG, JPEG, BMP,
GIF), one folder per class, class ids in sorted folder-name order. Every image must have the
same size unless the name ends in @HxW (e.g. folder:pets@32x32), which resizes each to H x W;
greyscale stays 1 channel, anything else becomes RGB."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bpfree_core.data.readers import UserData, register
from bpfree_core.errors import DataError

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


def parse(path: str) -> tuple[Path, tuple[int, int] | None]:
    m = re.fullmatch(r"(.*)@(\d+)x(\d+)", path)
    return (Path(m.group(1)), (int(m.group(2)), int(m.group(3)))) if m else (Path(path), None)


def _images(split: Path, classes: list[str]) -> list[tuple[Path, int]]:
    out = []
    for k, name in enumerate(classes):
        folder = split / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES) \
            if folder.is_dir() else []
        if not files:
            raise DataError(f"class folder {folder} has no images ({', '.join(sorted(SUFFIXES))}); "
                            "add some or remove the folder")
        out += [(p, k) for p in files]
    return out


def _load(path: Path, size: tuple[int, int] | None, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            _check_pixels(path, im.size)
            im = im.convert(mode)
            if size is not None:
                im = im.resize((size[1], size[0]))
            a = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as exc:   # Pillow's own limit, past ours: the same sentence
        raise _too_large(path, exc) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"image {path} cannot be read ({exc}); replace or remove it") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)   # (C, H, W)


MAX_PIXELS = 8192 * 8192   # an image larger than this is refused before it is decoded


def _check_pixels(path: Path, size: tuple[int, int]) -> None:
    """Refuse, from the header alone, an image whose decoding would take gigabytes (a
    decompression bomb: a few KB of PNG that unpack to 30000 x 30000 pixels)."""
    if size[0] * size[1] > MAX_PIXELS:
        raise _too_large(path, f"{size[0]}x{size[1]} pixels")


def _too_large(path: Path, what: str | Exception) -> DataError:
    if isinstance(what, Exception):   # Pillow's own refusal names the pixel count
        found = re.search(r"\((\d+) pixels\)", str(what))
        what = f"{int(found.group(1)):,} pixels" if found else "larger than Pillow will open"
    return DataError(f"image {path} is {what}, over the {MAX_PIXELS:,} pixels bpfree decodes (a "
                     "decompression bomb, or a photo far larger than training needs); resize it "
                     "or remove it")


def _mode(first: Path) -> str:
    from PIL import Image

    try:
        with Image.open(first) as im:
            _check_pixels(first, im.size)
            return "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
    except Image.DecompressionBombError as exc:
        raise _too_large(first, exc) from None
    except OSError as exc:
        raise DataError(f"image {first} cannot be read ({exc}); replace or remove it") from None



def image_files(root: Path) -> list[Path]:
    """Every image file below `root`, sorted by path."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def files(path: str) -> list[Path]:
    """Every image file of the dataset, in a fixed order (what the fingerprint covers)."""
    return image_files(parse(path)[0])


@register("folder", files=files)
def read(path: str) -> UserData:
    root, size = parse(path)
    train_dir, test_dir = root / "train", root / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise DataError(f"{d} does not exist; folder:PATH needs PATH/train/<class>/ and "
                            "PATH/test/<class>/ image folders")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{train_dir} has {len(classes)} class folder(s); give at least two")
    extra = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise DataError(f"{test_dir} has class folders {extra} that {train_dir} lacks")
    train = _images(train_dir, classes)
    test = _images(test_dir, [c for c in classes if (test_dir / c).is_dir()])
    test = [(p, classes.index(p.parent.name)) for p, _ in test]
    mode = _mode(train[0][0])
    arrays = {}
    for part, items in (("train", train), ("test", test)):
        xs = [_load(p, size, mode) for p, _ in items]
        for (p, _), x in zip(items, xs, strict=True):
            if x.shape != xs[0].shape:
                raise DataError(f"image {p} is {x.shape[1]}x{x.shape[2]} but {items[0][0]} is "
                                f"{xs[0].shape[1]}x{xs[0].shape[2]}; make them one size or ask for "
                                f"a resize: --dataset folder:{root}@HxW")
        arrays[part] = (np.stack(xs), np.asarray([k for _, k in items], dtype=np.int64))
    return UserData(*arrays["train"], *arrays["test"], classes=len(classes),
                    class_names=tuple(classes))




def images_for_prediction(folder: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Every image under `folder`, sorted by path, as (N, C, H, W) in [0, 1] at the run's size."""
    paths = image_files(folder)
    if not paths:
        raise DataError(f"{folder} has no images ({', '.join(sorted(SUFFIXES))})")
    mode = "L" if shape[0] == 1 else "RGB"
    return np.stack([_load(p, shape[1:], mode) for p in paths]).astype(np.float32) / 255.0
