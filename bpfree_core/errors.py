"""Exceptions that say what was wrong and what to do about it."""

from __future__ import annotations


class BpfreeError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(BpfreeError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class DataError(BpfreeError):
    """A dataset file is missing, truncated or corrupt."""


class ProtocolError(BpfreeError, ValueError):
    """A message on the wire is malformed (dtype, shape, chunks, sequence)."""


class PeerUnavailableError(BpfreeError, ConnectionError):
    """A peer (stage worker, coordinator) could not be reached within its deadline."""


class StageTimeoutError(BpfreeError, TimeoutError):
    """A stage did not answer within its deadline."""


class AggregationError(BpfreeError):
    """A federated reply could not be aggregated."""


class RunDirError(BpfreeError):
    """A run directory cannot be used: a bad path, a full or read-only disk, in use, or a run."""
