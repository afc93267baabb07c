"""Federated maths: a client's round (client), replies checked (aggregate) and folded as they
arrive (round_fold) by a server strategy (strategies), clients' own evaluation (client_evaluation)."""
