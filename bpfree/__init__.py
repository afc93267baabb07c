"""bpfree from Python: train, pipeline, simulate and continual runs, with your data and callbacks.

    import bpfree

    run = bpfree.train(data=(x_train, y_train, x_test, y_test), algorithm="mono", epochs=30,
                       set=["train.validation=200"], callbacks=[bpfree.EarlyStopping(patience=3)])
    run.summary["test_accuracy"], run.metrics[-1]["val_accuracy"], run.predict(x_test)

Each entry point takes a config (None for the plain field defaults, a TOML path, a dict or an
ExperimentConfig), keyword shortcuts (algorithm, dataset, layers, epochs, batch_size, lr, seed,
data_dir, device) and `set=["section.key=value", ...]`, in that order of precedence, and
returns a `Run`. `data` is anything bpfree_core.data.readers takes by name ("npz:PATH", "csv:DIR",
"folder:PATH"), numpy arrays (x_train, y_train, x_test, y_test[, x_val, y_val]) or a pair of
torch Datasets (train, test); arrays are written once to a content-addressed npz in the cache.
"""

from __future__ import annotations

import importlib
import sys
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bpfree.api import EarlyStopping, Run, continual, pipeline, simulate, train

__all__ = ["EarlyStopping", "Run", "continual", "pipeline", "simulate", "train"]

# The project's folders sit at the top of a checkout (server/, client/, protos/, bench/) and are
# bpfree.server, bpfree.client, ... once installed (pyproject's package-dir). A checkout run
# without installing, or a Flower App unpacked from its FAB, has them beside this package.
FOLDERS = ("client", "server", "protos", "bench")
_ROOT = Path(__file__).resolve().parent.parent


class _CheckoutFolders:
    """Finds bpfree.<folder> in the checkout's top-level folder of that name."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        parent, _, name = fullname.partition(".")
        if parent != "bpfree" or name not in FOLDERS:
            return None
        return PathFinder.find_spec(fullname, [str(_ROOT)])


def _in_a_checkout() -> bool:
    here = Path(__file__).resolve().parent
    return (not (here / "server").is_dir() and (_ROOT / "pyproject.toml").is_file()
            and all((_ROOT / f / "__init__.py").is_file() for f in FOLDERS))


if _in_a_checkout() and not any(isinstance(f, _CheckoutFolders) for f in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutFolders())   # before an editable install of another checkout


def __getattr__(name: str) -> Any:
    # The API loads Flower and the coordinator: only when asked, so `bpfree.client.worker` stays light.
    if name in __all__:
        return getattr(importlib.import_module("bpfree.api"), name)
    raise AttributeError(f"module 'bpfree' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
