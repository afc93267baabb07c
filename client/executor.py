"""Executors that run a client's layers on stage worker processes, and the executor factory.

`PipelineExecutor` drives a client.pipeline.Pipeline (S `bpfree worker` processes joined by the
project's gRPC stream) behind bpfree_core.federation.client's Executor protocol, so a federated round
(bpfree_core.federation.client.local_round) runs on it exactly as on the in-process reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import ConfigError
from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.client import InProcessExecutor
from bpfree_core.layers import Packet
from bpfree_core.model import OPTIMIZER, consolidation_only

if TYPE_CHECKING:
    from bpfree.client.pipeline import Pipeline


class PipelineExecutor:
    """The client's layers on S stage worker processes (client.pipeline.Pipeline)."""

    recovers = True   # a dead stage is respawned (local) or waited for (remote): Pipeline.recover

    def __init__(self, cfg: ExperimentConfig, addresses: list[str] | None = None,
                 device: str = "cpu", threads: int = 1, log_dir: str | None = None,
                 attach: bool = False):
        from bpfree.client.pipeline import Pipeline  # gRPC is imported only when a pipeline runs

        if addresses:
            if len(addresses) != cfg.pipeline.stages:
                raise ConfigError(
                    f"got {len(addresses)} stage worker address(es) but pipeline.stages = "
                    f"{cfg.pipeline.stages}; give one address per stage, in stage order")
            self.pipeline = Pipeline.connect(cfg, list(addresses), attach=attach)
        else:
            self.pipeline = Pipeline.launch_local(cfg, device=device, threads=threads,
                                                  log_dir=log_dir)

    @classmethod
    def from_pipeline(cls, pipeline: Pipeline) -> PipelineExecutor:
        """An executor over a Pipeline the caller already launched or connected."""
        executor = cls.__new__(cls)
        executor.pipeline = pipeline
        return executor

    def load_weights(self, state: Weights, proximal_mu: float = 0.0) -> None:
        self.pipeline.load_weights(state, proximal_mu=proximal_mu)

    def get_weights(self) -> Weights:
        return {k: v.detach().cpu() for k, v in self.pipeline.get_weights().items()}

    def train_epoch(self, packets: Iterable[Packet], epoch: int, total_epochs: int) -> dict:
        return self.pipeline.train_epoch(packets, epoch, total_epochs)

    def eval_forward(self, packet: Packet) -> Packet:
        return self.pipeline.eval_forward(packet)

    def end_task(self) -> dict[int, float]:
        return self.pipeline.end_task()

    def consolidation_state(self) -> Weights:
        return consolidation_only(self.pipeline.get_weights(with_optimizer=True))

    def snapshot(self) -> dict[str, Any]:
        """Every stage's weights and optimiser state (`optimizer.layers...` tensors)."""
        state = self.pipeline.get_weights(with_optimizer=True)
        optimizer = {k: v for k, v in state.items() if k.startswith(OPTIMIZER)}
        return {"weights": {k: v for k, v in state.items() if k not in optimizer},
                "optimizer": optimizer}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.pipeline.load_weights({**snapshot["weights"], **snapshot["optimizer"]})

    def describe(self) -> dict[str, Any]:
        return {"stages": len(self.pipeline.addresses),
                "wire_dtype": self.pipeline.cfg.pipeline.wire_dtype}

    def recover(self) -> list[int]:
        """After a stage failure: restart or reconnect the stages (Pipeline.recover)."""
        return self.pipeline.recover()

    def close(self) -> None:
        self.pipeline.close()

    def __enter__(self) -> PipelineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_executor(cfg: ExperimentConfig, addresses: list[str] | None = None,
                  log_dir: str | None = None) -> InProcessExecutor | PipelineExecutor:
    """A federated client's executor, the one `federation.executor` names, on `train.device` with
    `train.threads`. Every round loads the global weights first, so running stage workers are
    attached to as the run's earlier rounds left them (configured once per run)."""
    if cfg.federation.executor == "inprocess":
        return InProcessExecutor(cfg, cfg.train.device)
    return PipelineExecutor(cfg, addresses, device=cfg.train.device,
                            threads=max(cfg.train.threads, 1), log_dir=log_dir, attach=True)
