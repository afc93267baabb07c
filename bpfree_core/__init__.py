"""bpfree_core: local-learning (backprop-free) layers, objectives, data and the reference trainer.

This package never imports gRPC, Flower or Ray: those live in client/ and server/.
"""

from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import BpfreeError, ConfigError, DataError

__all__ = ["BpfreeError", "ConfigError", "DataError", "ExperimentConfig"]
