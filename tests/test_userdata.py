"""Your own data, in every process: npz arrays, CSV tables and image folders.

* each source loads with its own checks, trains, and a bad file is one sentence naming it;
* the golden rule holds on it: a 2-stage pipeline and a 2-client Flower simulation (whose
  ClientApps read the file by its absolute path and check its fingerprint) end with the weights
  of the single-process reference;
* a resumed run refuses data that changed; jitter, conv and label pixels are refused on flat
  features; the default recipe stretches its epochs on small data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bpfree.cli import main
from bpfree.cli.common import TRAIN_DEFAULTS, config_from_args
from bpfree_core.config import load_config
from bpfree_core.data.datasets import bind_data, load_dataset
from bpfree_core.errors import ConfigError, DataError
from bpfree_core.run.checkpoint import load_checkpoint
from bpfree_core.run.trainer import train_reference
from bpfree_core.schedule import MAX_EPOCHS, MIN_STEPS, PATIENCE

FAST = ["model.hidden=60,60", "train.batch_size=50", "train.threads=1", "optim.lr=2e-3",
        "train.jitter=0", "objective.vote_first=false"]


def blobs(n: int, classes: int = 4, dim: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters: a small tabular problem (a linear model gets ~95%)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(0, 2, (classes, dim))
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.normal(0, 1.5, (n, dim))).astype(np.float32), y


def bars(n: int, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 1, size, size): class 0 has a horizontal bar, class 1 a vertical one."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 60, (n, 1, size, size))
    at = rng.integers(1, size - 1, n)
    for i in range(n):
        if y[i]:
            x[i, 0, :, at[i]] = 255
        else:
            x[i, 0, at[i], :] = 255
    return x.astype(np.uint8), y


def save_npz(path: Path, train, test, **extra) -> Path:  # noqa: ANN001, ANN003
    np.savez(path, x_train=train[0], y_train=train[1], x_test=test[0], y_test=test[1], **extra)
    return path


@pytest.fixture
def tabular(tmp_path: Path) -> Path:
    return save_npz(tmp_path / "tab.npz", blobs(600), blobs(200, seed=1))


def _cfg(dataset: str, *extra: str):  # noqa: ANN202
    return bind_data(load_config(None, [f"model.dataset={dataset}", *FAST, *extra]))


# -- each source ------------------------------------------------------------------------------------

def test_npz_features_train_and_the_config_carries_shape_classes_and_fingerprint(tabular, tmp_path,  # noqa: ANN001
                                                                                 capsys) -> None:  # noqa: ANN001
    cfg = _cfg(f"npz:{tabular}", "model.algorithm=mono", "train.epochs=6")
    assert cfg.model.input_shape == (1, 1, 12) and cfg.model.data_classes == 4
    assert len(cfg.model.data_fingerprint) == 16
    out = train_reference(cfg, tmp_path / "run", progress=False)
    assert out["test_accuracy"] > 0.85, out["test_accuracy"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["dataset"] == f"npz:{tabular.resolve()}"


def test_npz_images_with_their_own_validation_split_and_jitter(tmp_path) -> None:  # noqa: ANN001
    path = save_npz(tmp_path / "bars.npz", bars(400), bars(100, seed=1),
                    x_val=bars(100, seed=2)[0], y_val=bars(100, seed=2)[1])
    data = load_dataset(f"npz:{path}")
    assert data.spec.shape == (1, 8, 8) and float(data.train.images.max()) <= 1.0
    out = train_reference(_cfg(f"npz:{path}", "model.algorithm=symba", "train.epochs=3",
                               "train.jitter=1"), None, progress=False)
    assert out["val_accuracy"] > 0.9 and out["test_accuracy"] > 0.9, out


def test_csv_tables_are_standardised_with_the_train_statistics(tmp_path) -> None:  # noqa: ANN001
    folder = tmp_path / "table"
    folder.mkdir()
    for name, (x, y) in {"train": blobs(400), "test": blobs(100, seed=1)}.items():
        rows = ["f0,label," + ",".join(f"f{i}" for i in range(1, 12))]
        rows += [",".join([f"{r[0] * 10 + 5:.6f}", str(int(c)), *(f"{v:.6f}" for v in r[1:])])
                 for r, c in zip(x, y, strict=True)]
        (folder / f"{name}.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset(f"csv:{folder}")
    assert data.spec.shape == (1, 1, 12) and data.spec.num_classes == 4
    assert torch.allclose(data.train.images.mean(0), torch.zeros(12), atol=1e-4)
    assert torch.allclose(data.train.images.std(0, unbiased=False), torch.ones(12), atol=1e-3)
    out = train_reference(_cfg(f"csv:{folder}", "model.algorithm=mono", "train.epochs=6"), None,
                          progress=False)
    assert out["test_accuracy"] > 0.85


def _sites_csv(folder: Path, sites: tuple[str, ...] = ("north", "south", "west")) -> Path:
    """blobs as CSV with a text `group` column: site i holds 100 + 50 i training rows."""
    folder.mkdir()
    for name, n, seed in (("train", (100, 150, 200), 0), ("test", (40, 40, 40), 1)):
        rows = ["f0,group,label," + ",".join(f"f{i}" for i in range(1, 12))]
        for site, count in zip(sites, n, strict=True):
            x, y = blobs(count, seed=seed + 10 * len(rows))
            rows += [",".join([f"{r[0]:.6f}", site, str(int(c)), *(f"{v:.6f}" for v in r[1:])])
                     for r, c in zip(x, y, strict=True)]
        (folder / f"{name}.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_group_ids_from_a_csv_column_and_npz_arrays_number_every_split_alike(tmp_path) -> None:  # noqa: ANN001
    data = load_dataset(f"csv:{_sites_csv(tmp_path / 'sites')}")
    assert data.spec.shape == (1, 1, 12)   # the group column is not a feature
    assert torch.bincount(data.train.groups).tolist() == [100, 150, 200]   # north, south, west
    assert torch.bincount(data.test.groups).tolist() == [40, 40, 40]
    train, test = blobs(60), blobs(20, seed=1)
    path = save_npz(tmp_path / "g.npz", train, test, group_train=np.repeat([7, 3, 5], 20),
                    group_test=np.full(20, 5))
    data = load_dataset(f"npz:{path}")
    assert data.train.groups.tolist() == [2] * 20 + [0] * 20 + [1] * 20   # ids 3, 5, 7 -> 0, 1, 2
    assert set(data.test.groups.tolist()) == {1}
    bad = save_npz(tmp_path / "bad.npz", train, test, group_train=np.zeros(59))
    with pytest.raises(DataError, match=r"train group ids have shape \(59,\); give one per sample"):
        load_dataset(f"npz:{bad}")


def test_a_flower_simulation_split_by_site_equals_the_reference(tmp_path) -> None:  # noqa: ANN001
    from bpfree.server.reference import federated_reference
    from bpfree.server.simulate import simulate

    folder = _sites_csv(tmp_path / "sites")
    fed = _cfg(f"csv:{folder}", "model.algorithm=mono", "federation.clients=3", "federation.rounds=2",
               "federation.partition=natural", "federation.executor=inprocess",
               "federation.fraction_evaluate=1.0")
    summary = simulate(fed, tmp_path / "sim")
    expected = federated_reference(fed)
    assert all(torch.equal(summary["weights"][k], expected[k]) for k in expected)
    last = json.loads((tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k: m["num_examples"] for k, m in last["client_metrics"].items()} == \
        {"0": 100, "1": 150, "2": 200}
    with pytest.raises(ConfigError, match="set federation.clients = 3"):
        simulate(_cfg(f"csv:{folder}", "model.algorithm=mono", "federation.partition=natural",
                      "federation.clients=2"),
                 tmp_path / "two")


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _image_folder(root: Path, n: int = 60, size: int = 8) -> Path:
    for split, count, seed in (("train", n, 0), ("test", n // 2, 1)):
        x, y = bars(count, size, seed)
        for i in range(count):
            _png(root / split / ("horizontal", "vertical")[y[i]] / f"{i}.png", x[i, 0])
    return root


def test_image_folders_load_by_class_name_and_resize_only_when_asked(tmp_path) -> None:  # noqa: ANN001
    root = _image_folder(tmp_path / "imgs", n=100)
    data = load_dataset(f"folder:{root}")
    assert data.spec.shape == (1, 8, 8) and data.spec.num_classes == 2 and len(data.train) == 100
    assert data.spec.name == f"folder:{root}"
    out = train_reference(_cfg(f"folder:{root}", "model.algorithm=mono", "train.epochs=15",
                               "train.batch_size=20"), None, progress=False)
    assert out["test_accuracy"] > 0.85, out["test_accuracy"]
    _png(root / "train" / "vertical" / "big.png", np.zeros((12, 12), np.uint8))
    with pytest.raises(Exception, match=r"big.png is 12x12 .*folder:.*@HxW"):
        load_dataset(f"folder:{root}")
    assert load_dataset(f"folder:{root}@6x6").spec.shape == (1, 6, 6)


# -- bad data: one sentence naming the file, nothing trained ------------------------------------------

def _declare(npz: Path, entry: str, shape: tuple[int, ...]) -> None:
    """Rewrite one array's header in `npz` to declare `shape` (its bytes stay as they were)."""
    import io
    import zipfile

    with zipfile.ZipFile(npz) as z:
        parts = {n: z.read(n) for n in z.namelist()}
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": shape})
    parts[entry] = head.getvalue() + b"\0" * 64
    with zipfile.ZipFile(npz, "w") as z:
        for name, data in parts.items():
            z.writestr(name, data)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, 1 bit per pixel (its pixels are never there)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def _bad(tmp_path: Path, kind: str) -> str:
    x, y = blobs(100)
    xt, yt = blobs(50, seed=1)
    if kind == "lengths":
        return f"npz:{save_npz(tmp_path / 'd.npz', (x, y[:90]), (xt, yt))}"
    if kind == "range":
        yt = yt.copy()
        yt[3] = 7
        return f"npz:{save_npz(tmp_path / 'd.npz', (x, y), (xt, yt))}"
    if kind == "non-integer":
        return f"npz:{save_npz(tmp_path / 'd.npz', (x, y + 0.5), (xt, yt))}"
    if kind == "nan":
        x = x.copy()
        x[17, 2] = np.nan
        return f"npz:{save_npz(tmp_path / 'd.npz', (x, y), (xt, yt))}"
    if kind == "shape":
        return f"npz:{save_npz(tmp_path / 'd.npz', (x, y), (xt[:, :10], yt))}"
    if kind == "missing-array":
        np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
        return f"npz:{tmp_path / 'd.npz'}"
    if kind == "empty-class":
        root = _image_folder(tmp_path / "imgs", n=10)
        (root / "train" / "diagonal").mkdir()
        return f"folder:{root}"
    if kind == "unreadable":
        root = _image_folder(tmp_path / "imgs", n=10)
        (root / "train" / "vertical" / "broken.png").write_bytes(b"not a png")
        return f"folder:{root}"
    if kind == "huge-npy":   # a header declaring 500 GB in a few bytes
        np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
        _declare(tmp_path / "d.npz", "x_train.npy", (125_000_000_000,))
        return f"npz:{tmp_path / 'd.npz'}"
    if kind == "bomb":   # a 30000 x 30000 1-bit PNG: a few bytes of header, 900 M pixels
        root = _image_folder(tmp_path / "imgs", n=10)
        (root / "train" / "vertical" / "bomb.png").write_bytes(_png_header(30000, 30000))
        return f"folder:{root}@12x12"
    (tmp_path / "t").mkdir()
    if kind == "latin-1":
        (tmp_path / "t" / "train.csv").write_bytes("a,b,label\n1,2,0\n3,caf\u00e9,1\n".encode("latin-1"))
        (tmp_path / "t" / "test.csv").write_text("a,b,label\n1,2,0\n")
        return f"csv:{tmp_path / 't'}"
    (tmp_path / "t" / "train.csv").write_text("a,b,label\n1,2,0\n3,x,1\n")
    (tmp_path / "t" / "test.csv").write_text("a,b,label\n1,2,0\n")
    return f"csv:{tmp_path / 't'}"


@pytest.mark.parametrize(("kind", "says"), [
    ("lengths", "train has 100 samples but 90 labels"),
    ("range", "test labels span 0..7, outside 0..3"),
    ("non-integer", "labels must be whole numbers"),
    ("nan", "train sample 17 has NaN or infinite features"),
    ("shape", "test samples have shape (10,) but train samples (12,)"),
    ("missing-array", "has no x_test, y_test"),
    ("empty-class", "diagonal has no images"),
    ("unreadable", "broken.png cannot be read"),
    ("csv-text", "'x' is not a number"),
    ("huge-npy", "declares shape (125000000000,) of float32"),
    ("bomb", "bomb.png is 900,000,000 pixels"),
    ("latin-1", "train.csv line 3 is not UTF-8 text (byte 0xe9)"),
])
def test_bad_data_is_one_sentence_naming_the_file_and_nothing_trains(kind, says, tmp_path, capsys) -> None:  # noqa: ANN001
    dataset = _bad(tmp_path, kind)
    code = main(["train", "--dataset", dataset, "--algorithm", "mono", "--out",
                 str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert code == 2 and len(lines) == 1 and says in lines[0] and "Traceback" not in err, err
    assert dataset.split(":", 1)[1].split("@")[0].split("/")[-1] in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_table_saved_with_a_byte_order_mark_reads_as_written(tmp_path) -> None:  # noqa: ANN001
    folder = tmp_path / "t"
    folder.mkdir()
    x, y = blobs(60)
    rows = "".join(f"{int(label)},{a:.3f},{b:.3f}\n" for label, (a, b) in zip(y, x[:, :2], strict=True))
    for name in ("train.csv", "test.csv"):   # Excel's "CSV UTF-8": a BOM before `label`
        (folder / name).write_bytes(("label,a,b\n" + rows).encode("utf-8-sig"))
    data = load_dataset(f"csv:{folder}")
    assert len(data.train) == 60 and data.train.labels.tolist() == y.tolist()


def test_flat_features_refuse_jitter_conv_and_label_pixels(tabular) -> None:  # noqa: ANN001
    for extra, says in ((["train.jitter=1"], "train.jitter shifts images"),
                        (["model.algorithm=cwc", "model.conv=8"], "model.conv convolves images"),
                        (["model.algorithm=ff"], "would overwrite")):
        with pytest.raises(ConfigError, match=says):
            train_reference(_cfg(f"npz:{tabular}", "model.algorithm=mono", *extra), None,
                            progress=False)


# -- the same data in every process, and resume -------------------------------------------------------

def test_a_resumed_run_refuses_data_that_changed(tabular, tmp_path, capsys) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    flags = ["train", "--dataset", f"npz:{tabular}", "--algorithm", "mono", "--out", str(run),
             "--no-progress", *sum((["--set", s] for s in FAST), [])]
    assert main([*flags, "--epochs", "1"]) == 0
    save_npz(tabular, blobs(600, seed=5), blobs(200, seed=1))   # someone replaced the file
    assert main([*flags, "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "changed since the run started" in err and str(tabular.name) in err


def test_a_pipeline_and_a_flower_simulation_on_your_data_equal_the_reference(tmp_path) -> None:  # noqa: ANN001
    from bpfree.client.pipeline import Pipeline
    from bpfree.client.train import train_pipeline
    from bpfree.server.reference import federated_reference
    from bpfree.server.simulate import simulate

    torch.set_num_threads(1)
    path = save_npz(tmp_path / "bars.npz", bars(400), bars(100, seed=1))
    cfg = _cfg(f"npz:{path}", "model.algorithm=symba", "train.epochs=2", "pipeline.stages=2")
    reference = train_reference(cfg, None, progress=False)["weights"]
    with Pipeline.launch_local(cfg) as pipe:
        piped = train_pipeline(cfg, pipe, progress=False)["weights"]
    assert all(torch.equal(piped[k], reference[k]) for k in reference)

    fed = _cfg(f"npz:{path}", "model.algorithm=mono", "federation.clients=2", "federation.rounds=2",
               "federation.partition=dirichlet:1.0", "federation.executor=inprocess")
    summary = simulate(fed, tmp_path / "sim")
    expected = federated_reference(fed)
    assert all(torch.equal(summary["weights"][k], expected[k]) for k in expected)
    assert summary["dataset"] == f"npz:{path.resolve()}" and summary["rounds"] == 2


def test_continual_tasks_split_your_classes(tabular) -> None:  # noqa: ANN001
    from bpfree_core.continual.stream import run_continual
    from bpfree_core.run.executor import InProcessExecutor

    cfg = _cfg(f"npz:{tabular}", "model.algorithm=mono", "continual.tasks=2",
               "continual.epochs_per_task=2", "continual.strategy=replay", "continual.memory=100")
    with InProcessExecutor(cfg) as ex:
        out = run_continual(cfg, ex, None, progress=False)
    assert len(out["accuracy_matrix"]) == 2 and out["average_accuracy"] > 0.4


def test_the_default_recipe_stretches_its_epochs_on_small_data(tabular) -> None:  # noqa: ANN001
    from bpfree.cli.common import add_config_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    small = config_from_args(parser.parse_args(["--dataset", f"npz:{tabular}"]), TRAIN_DEFAULTS)
    steps = 600 // small.train.batch_size
    assert small.train.epochs == min(MAX_EPOCHS, -(-MIN_STEPS // steps)) > 4
    assert small.train.jitter == 0
    # ... and stops once the validation split it holds out stops improving
    assert (small.train.patience, small.train.validation) == (PATIENCE, 60)
    asked = config_from_args(parser.parse_args(["--dataset", f"npz:{tabular}", "--epochs", "3"]),
                             TRAIN_DEFAULTS)
    assert (asked.train.epochs, asked.train.patience, asked.train.validation) == (3, 0, 0)


def test_a_stretched_run_stops_after_its_patience_and_keeps_the_best_epoch(tabular, tmp_path) -> None:  # noqa: ANN001
    cfg = _cfg(f"npz:{tabular}", "model.algorithm=mono", "train.epochs=60", "train.validation=60",
               "train.patience=3",
               "optim.lr=0.02")
    summary = train_reference(cfg, tmp_path / "run", progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: r["val_accuracy"]["softmax"])   # the first of the best
    assert summary["stopped_early"] and summary["best_epoch"] == best["epoch"]
    assert summary["epochs_trained"] == len(records) == best["epoch"] + 3 < 60
    assert summary["val_accuracy"] == best["val_accuracy"]["softmax"]
    kept = load_checkpoint(tmp_path / "run" / "best.pt")["state"]["weights"]
    assert all(torch.equal(kept[k], v) for k, v in summary["weights"].items())
    with pytest.raises(ConfigError, match="train.patience watches the validation accuracy"):
        train_reference(_cfg(f"npz:{tabular}", "model.algorithm=mono", "train.epochs=2",
                             "train.patience=1"), progress=False)
