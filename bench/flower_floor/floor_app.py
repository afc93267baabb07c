"""The floor bench/scale.py compares bpfree against: Flower's own FedAvg and ClientApps that do
no work (each replies with the arrays it received), exchanging float32 arrays of the sizes bpfree's
model has. What a round costs here is what Flower itself costs at that K and fraction."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

server = ServerApp()
client = ClientApp()


def _resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@client.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}),
                   reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    sizes = [int(s) for s in str(cfg["sizes"]).split(",")]
    arrays = ArrayRecord([np.zeros(n, dtype=np.float32) for n in sizes])
    nodes = len(list(grid.get_node_ids()))
    marks: list[dict] = []

    def mark(server_round: int, _: ArrayRecord) -> None:
        marks.append({"round": server_round, "t": time.perf_counter(), "rss_mb": _resident_mb()})

    strategy = FedAvg(fraction_train=float(cfg["fraction-train"]), fraction_evaluate=0.0,
                      min_train_nodes=2, min_available_nodes=nodes)
    strategy.start(grid, arrays, num_rounds=int(cfg["rounds"]), evaluate_fn=mark)
    Path(str(cfg["out-file"])).write_text(json.dumps({"nodes": nodes, "marks": marks}))
