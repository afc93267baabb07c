"""bpfree from Python: train, pipeline, simulate and continual runs, with your data and callbacks.

    import bpfree

    run = bpfree.train(data=(x_train, y_train, x_test, y_test), algorithm="mono", epochs=30,
                       set=["train.validation=200"], callbacks=[bpfree.EarlyStopping(patience=3)])
    run.summary["test_accuracy"], run.metrics[-1]["val_accuracy"], run.predict(x_test)

Each entry point takes a config (None for the plain field defaults, a TOML path, a dict or an
ExperimentConfig), keyword shortcuts (algorithm, dataset, layers, epochs, batch_size, lr, seed,
data_dir, device) and `set=["section.key=value", ...]`, in that order of precedence, and
returns a `Run`. `data` is anything bpfree_core.readers takes by name ("npz:PATH", "csv:DIR",
"folder:PATH"), numpy arrays (x_train, y_train, x_test, y_test[, x_val, y_val]) or a pair of
torch Datasets (train, test); arrays are written once to a content-addressed npz in the cache.
"""

from bpfree.api import EarlyStopping, Run, continual, pipeline, simulate, train

__all__ = ["EarlyStopping", "Run", "continual", "pipeline", "simulate", "train"]
