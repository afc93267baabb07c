"""The federated coordinator: Flower ServerApp, round loop, layer-wise aggregation, simulation.

Modules: aggregate (FedAvg per layer, reused by every backend), coordinator (the round loop),
messages (Flower record contents), app (the ServerApp), reference (the single-process federated
reference), simulate (`bpfree simulate`), plot.
"""
