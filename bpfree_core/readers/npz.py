"""`npz:PATH`: a NumPy .npz with x_train, y_train, x_test, y_test (and optional x_val, y_val;
group_train, group_test, group_val: a group id per sample for federation.partition = natural).

Features may be flat (N, D) or images (N, H, W) / (N, C, H, W); uint8 is scaled to [0, 1],
other numbers are used as given. The file is read without pickles (allow_pickle=False).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from bpfree_core.errors import DataError
from bpfree_core.readers import UserData, register

REQUIRED = ("x_train", "y_train", "x_test", "y_test")


@register("npz")
def read(path: str) -> UserData:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"npz file {p} does not exist; give --dataset npz:PATH of an existing file")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
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
