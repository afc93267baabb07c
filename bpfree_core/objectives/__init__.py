"""Local objectives, one module each, behind one registry by name: the only list of names.

Every objective has the same interface (`Objective`): it builds the layers of a stack, encodes
a data batch into the first layer's packet, and turns the last packet into predictions.

`model.algorithm` names a built-in rule, a rule an installed package declares under the entry
point group `bpfree.objectives`, or your own class: `pkg.module:ClassName` (importable in every
process) or `path/to/rule.py:ClassName` (a file every process imports by its absolute path).
An outside class subclasses `Objective`, or a built-in rule through `registered()["mono"]`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

from bpfree_core.config import BUILTIN_RULES, RULE_PLUGINS, ExperimentConfig
from bpfree_core.data.datasets import DatasetSpec
from bpfree_core.errors import ConfigError
from bpfree_core.objectives.base import Objective

BUILTIN = BUILTIN_RULES   # the paper set
ENTRY_POINTS = RULE_PLUGINS
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
    for module in pkgutil.iter_modules(__path__):   # every module here may register rules
        importlib.import_module(f"{__name__}.{module.name}")
    for ep in entry_points(group=ENTRY_POINTS):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = _checked(ep.load(), f"entry point {ep.name} = {ep.value}")
            _REGISTRY[ep.name].name = ep.name


def registered() -> dict[str, type[Objective]]:
    """Every rule by name: the built-in ones and the installed plug-ins."""
    _load_all()
    return dict(_REGISTRY)


def resolve(name: str) -> type[Objective]:
    """The Objective class `model.algorithm = name` stands for, or a ConfigError that says why
    this process cannot load it."""
    if ":" in name:
        return _outside(name)
    if name in BUILTIN:   # fast path: only the rule's own module
        importlib.import_module(f"bpfree_core.objectives.{name}")
        return _REGISTRY[name]
    known = registered()
    if name not in known:
        raise ConfigError(f"model.algorithm = {name!r} is not a known rule; valid: "
                          f"{', '.join(sorted(known))}, or your own as pkg.module:Class or "
                          "path/to/rule.py:Class")
    return known[name]


def _outside(name: str) -> type[Objective]:
    where, _, attr = name.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            module_name = "bpfree_rule_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
            module = sys.modules.get(module_name)
            if module is None:
                if not path.is_file():
                    raise ConfigError(f"model.algorithm = {name!r}: {path} does not exist here; "
                                      "give the rule's file on every machine that runs a stage")
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                sys.modules[module_name] = module
                spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(where)
        cls = getattr(module, attr)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raised, said once
        raise ConfigError(f"model.algorithm = {name!r} cannot be loaded in this process "
                          f"({type(exc).__name__}: {exc}); install the module here or put it on "
                          "PYTHONPATH") from None
    cls = _checked(cls, f"model.algorithm = {name!r}")
    if not cls.name:
        cls.name = name
    return cls


def _checked(cls: object, what: str) -> type[Objective]:
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ConfigError(f"{what} is {cls!r}, not a subclass of bpfree_core.objectives.Objective")
    return cls


def get_objective(cfg: ExperimentConfig, spec: DatasetSpec) -> Objective:
    """The objective named by `cfg.model.algorithm`, bound to the config and dataset."""
    return resolve(cfg.model.algorithm)(cfg, spec)


__all__ = ["BUILTIN", "Objective", "get_objective", "register", "registered", "resolve"]
