"""One pipeline stage as a Ray actor: the stage worker's gRPC server, run inside the actor.

The actor is only a host: it starts the same StageWorker + build_server that `bpfree worker`
runs, on the node Ray placed it on, and reports the address it serves. Activations between
stages still travel over the project's data plane (not Ray's object store), so a stage
behaves the same whether a shell, a SuperNode or Ray started it.

The device comes from what Ray assigned to this actor, never from a fixed index: Ray narrows
CUDA_VISIBLE_DEVICES to the actor's GPUs, so its first GPU is always "cuda:0" inside the actor.
An actor that reserved no GPU trains on the CPU.

TLS: the worker's certificate and key are files on the node, named by BPFREE_TLS_CERT and
BPFREE_TLS_KEY in the environment `ray start` ran in (actors inherit it); BPFREE_TLS_CA names the
CA that verifies the downstream stage (default: pipeline.tls_ca, the same path on every node).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

log = logging.getLogger(__name__)

# Set for every stage actor (runtime_env) and for the driver before Ray starts.
RAY_ENV = {
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",   # Ray's current behaviour, without its FutureWarning
    "RAY_USAGE_STATS_ENABLED": "0",              # never phone home
}


def stage_device(gpu_ids: list[Any], cuda_available: bool) -> str:
    """The torch device of an actor Ray assigned `gpu_ids` to ([] = no GPU: CPU).

    Ray sets CUDA_VISIBLE_DEVICES to exactly the assigned GPUs, so the first one is cuda:0 here
    whatever its index on the node is.
    """
    if not gpu_ids:
        return "cpu"
    if not cuda_available:
        raise RuntimeError(
            f"Ray assigned GPU(s) {list(gpu_ids)} to this stage on {socket.gethostname()}, but torch "
            "here sees no CUDA device; install a CUDA build of torch on that node, or set "
            "pipeline.stage_num_gpus = 0")
    return "cuda:0"


class StageActor:
    """Serves one stage over gRPC from inside a Ray actor (wrapped with ray.remote by the backend)."""

    def __init__(self, bind_host: str, token: str, tls_ca: str, threads: int):
        # Threads first, before torch runs anything (one per stage: see the golden rule).
        import torch

        torch.set_num_threads(max(threads, 1))
        self.bind_host = bind_host
        self.token = token
        self.tls_ca = tls_ca
        self.worker: Any = None
        self.server: Any = None

    def start(self) -> dict[str, Any]:
        """Start the stage's gRPC server; return where it serves and what it runs on."""
        import ray
        import torch

        from bpfree.client.transport import Security
        from bpfree.client.worker import StageWorker, build_server

        gpu_ids = list(ray.get_gpu_ids())
        device = stage_device(gpu_ids, torch.cuda.is_available())
        node_ip = ray.util.get_node_ip_address()
        host = self.bind_host or node_ip
        cert = os.environ.get("BPFREE_TLS_CERT", "")
        key = os.environ.get("BPFREE_TLS_KEY", "")
        ca = os.environ.get("BPFREE_TLS_CA", "") or self.tls_ca
        if ca and not (cert and key):
            raise RuntimeError(
                f"pipeline.tls_ca is set, so stages must serve TLS, but node {node_ip} has no "
                "BPFREE_TLS_CERT / BPFREE_TLS_KEY; export both (the node's certificate and key) "
                "before `ray start` on every node (see deploy/ray/)")
        security = Security(token=self.token, tls_cert=cert, tls_key=key, tls_ca=ca)
        self.worker = StageWorker(device, security, threads=torch.get_num_threads())
        self.server, port = build_server(self.worker, f"{host}:0", security)
        self.worker.address = f"{host}:{port}"
        self.server.start()
        log.info("stage actor serving on %s (node %s, pid %d, device %s, GPUs %s)",
                 self.worker.address, node_ip, os.getpid(), device, gpu_ids)
        return {"address": self.worker.address, "node_ip": node_ip,
                "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "pid": os.getpid(), "device": device, "gpu_ids": [str(g) for g in gpu_ids],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "torch_threads": torch.get_num_threads(), "tls": bool(cert)}

    def stop(self) -> None:
        """Stop serving (the backend kills the actor afterwards)."""
        if self.worker is not None:
            self.worker.shutdown()
        if self.server is not None:
            self.server.stop(grace=1.0).wait(timeout=5.0)
            self.server = None
