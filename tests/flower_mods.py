"""Flower client mods the tests name in $BPFREE_CLIENT_MODS (`simulate(..., client_mods=...)`).

They run inside the simulation's ClientApps (other processes), so they take their folders from
the environment the test sets: BPFREE_TEST_REPLIES (record_replies), BPFREE_TEST_PIDS
(kill_client_1_in_round_1).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch


def record_replies(msg, context, call_next):  # noqa: ANN001, ANN201 - a Flower client mod
    """Save every reply's weights and example count to $BPFREE_TEST_REPLIES."""
    from bpfree.client.messages import read_reply

    reply = call_next(msg, context)
    update = read_reply(reply)
    rnd = int(msg.content.config_records["config"]["round"])
    folder = Path(os.environ["BPFREE_TEST_REPLIES"])
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"num_examples": update.num_examples, "weights": update.weights},
               folder / f"round{rnd}-client{update.client}.pt")
    return reply


def sabotage(msg, context, call_next):  # noqa: ANN001, ANN201 - a Flower client mod
    """Client 1 replies with a mis-shaped layer and client 2 crashes, every round; from round 2
    on, client 0 crashes too (so round 1 has one usable reply, round 2 none)."""
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.content.config_records["config"]["round"])
    if pid == 2 or (pid == 0 and rnd >= 1):
        raise RuntimeError(f"client {pid} lost its disk")
    reply = call_next(msg, context)
    if pid == 1:
        from flwr.app import Array

        reply.content.array_records["arrays"]["layers.1.linear.weight"] = Array(torch.zeros(3, 3).numpy())
    return reply


def kill_client_1_in_round_1(msg, context, call_next):  # noqa: ANN001, ANN201 - a Flower client mod
    """Every ClientApp writes its PID per round and attempt to $BPFREE_TEST_PIDS; client 1, in
    round 1, then waits (deadline 120 s) for the test to kill it."""
    folder = Path(os.environ["BPFREE_TEST_PIDS"])
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.content.config_records["config"]["round"])
    attempt = len(list(folder.glob(f"round{rnd}-client{pid}.*.pid")))
    marker = folder / f"round{rnd}-client{pid}.{attempt}.pid"
    marker.with_suffix(".tmp").write_text(str(os.getpid()))
    os.replace(marker.with_suffix(".tmp"), marker)
    if pid == 1 and rnd == 0:
        threading.Event().wait(120)   # the test SIGKILLs this process meanwhile
        raise RuntimeError("client 1 was not killed")
    return call_next(msg, context)


def hold_round_2(msg, context, call_next):  # noqa: ANN001, ANN201 - a Flower client mod
    """Round 2's training waits (deadline 120 s) for the test to kill the run: a run killed
    "mid-run" must not finish its last round first, however fast rounds are."""
    if int(msg.content.config_records["config"]["round"]) == 1:
        threading.Event().wait(120)   # the test SIGKILLs the run meanwhile
    return call_next(msg, context)


def local_dp(msg, context, call_next):  # noqa: ANN001, ANN201 - a Flower client mod
    """Flower's own LocalDpMod (clip each client's update, add Gaussian noise to its weights)."""
    from flwr.clientapp.mod import LocalDpMod

    return LocalDpMod(clipping_norm=5.0, sensitivity=1e-3, epsilon=1.0, delta=1e-5)(msg, context, call_next)
