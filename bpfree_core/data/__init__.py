"""Data: where a run's samples come from (datasets: MNIST-family, CIFAR, your own through
readers), how they are split (splits, partition) and batched (batches)."""
