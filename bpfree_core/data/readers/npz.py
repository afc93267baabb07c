"""`npz:PATH`: a NumPy .npz with x_train, y_train, x_test, y_test (and optional x_val, y_val;
group_train, group_test, group_val: a group id per sample for federation.partition = natural).

Features may be flat (N, D) or images (N, H, W) / (N, C, H, W); uint8 is scaled to [0, 1],
other numbers are used as given. The file is read without pickles (allow_pickle=False).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from bpfree_core.data.readers import UserData, register
from bpfree_core.errors import DataError

REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def check_declared_sizes(p: Path) -> None:
    """Each array's header declares a shape; refuse one that declares more bytes than its entry
    holds (a damaged or hostile file would otherwise make numpy allocate the declared size first)."""
    with zipfile.ZipFile(p) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(fh)
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if declared > info.file_size:
                raise DataError(f"{p}: array {info.filename[:-4]} declares shape {shape} of {dtype} "
                                f"({declared:,} bytes) but holds {info.file_size:,}; the file is "
                                "damaged: save it again with numpy.savez")


@register("npz")
def read(path: str) -> UserData:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"npz file {p} does not exist; give --dataset npz:PATH of an existing file")
    try:
        check_declared_sizes(p)
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError) as exc:
        raise DataError(f"{p} cannot be read as a .npz of plain arrays ({exc}); save it with "
                        "numpy.savez(x_train=..., y_train=..., x_test=..., y_test=...)") from None
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        held = ", ".join(sorted(arrays)) or "nothing"
        raise DataError(f"{p} has no {', '.join(missing)} (it holds {held}); save x_train, "
                        "y_train, x_test, y_test (and optionally x_val, y_val)")
    groups = {part: arrays[f"group_{part}"] for part in ("train", "test", "val")
              if f"group_{part}" in arrays}   # federation.partition = natural
    return UserData(*(arrays[k] for k in REQUIRED), arrays.get("x_val"), arrays.get("y_val"),
                    groups=groups)
