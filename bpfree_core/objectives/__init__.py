"""Local objectives, one module each, behind one registry by name.

Every objective has the same interface (`Objective`): it builds the layers of a stack, encodes
a data batch into the first layer's packet, and turns the last packet into predictions.
"""

from __future__ import annotations

import importlib

from bpfree_core.config import ALGORITHMS, ExperimentConfig
from bpfree_core.data import DatasetSpec
from bpfree_core.errors import ConfigError
from bpfree_core.objectives.base import Objective

_REGISTRY: dict[str, type[Objective]] = {}


def register(name: str):  # noqa: ANN201 - decorator
    """Class decorator: register an `Objective` under `name` (duplicates are an error)."""

    def wrap(cls: type[Objective]) -> type[Objective]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"objective {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    for name in ALGORITHMS:
        importlib.import_module(f"bpfree_core.objectives.{name}")


def registered() -> dict[str, type[Objective]]:
    _load_all()
    return dict(_REGISTRY)


def get_objective(cfg: ExperimentConfig, spec: DatasetSpec) -> Objective:
    """The objective named by `cfg.model.algorithm`, bound to the config and dataset."""
    name = cfg.model.algorithm
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHMS)}")
    importlib.import_module(f"bpfree_core.objectives.{name}")
    return _REGISTRY[name](cfg, spec)


__all__ = ["Objective", "get_objective", "register", "registered"]
