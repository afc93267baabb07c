"""Callbacks: what a run calls with each committed epoch, round or task record."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Callback = Callable[[dict[str, Any]], object]   # truthy answer: stop after this step


def stop_asked(callbacks: Sequence[Callback], record: dict[str, Any]) -> bool:
    """Give `record` to every callback (each sees it, whatever the others say); whether any
    asked to stop."""
    return any([bool(cb(record)) for cb in callbacks])
