"""`bpfree bench sweep` on a tiny configuration: it runs real stage workers, writes its table, CSV,
JSON, metrics and plots. The figures themselves are not checked (they depend on the machine)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bpfree import cli as bpfree_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_sweep(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    code = bpfree_cli.main(["bench", "sweep", "--preset", "tiny", "--data-dir", str(data_dir),
                            "--out", str(out), "--run-dir", str(out / "run"), "--no-progress"])
    assert code == 0
    return out


def test_sweep_writes_csv_and_json_with_every_point(tiny_sweep: Path) -> None:
    rows = list(csv.DictReader((tiny_sweep / "throughput.csv").open()))
    assert [(r["stages"], r["clients"]) for r in rows] == [("2", "1"), ("1", "1")]
    for r in rows:
        assert float(r["samples_per_s"]) > 0 and float(r["predicted_samples_per_s"]) > 0
        assert 0 <= float(r["bubble_fraction"]) < 1
        assert len(r["busy_s"].split("/")) == int(r["stages"])
        assert len(r["link_bytes_per_s"].split("/")) == int(r["stages"])   # driver + inner links
    res = json.loads((tiny_sweep / "throughput.json").read_text())
    assert res["ceilings"]["matmul_gflops_per_core"] > 0
    assert res["ceilings"]["tcp_bytes_per_s"] > 0 and res["ceilings"]["grpc_raw_bytes_per_s"] > 0
    assert res["load_before"] and res["load_after"]
    s2 = res["rows"][0]
    # the workers' per-batch timelines: one record per train batch on every stage
    timeline = res["timelines"]["S=2 K=1 B=50 W=64 float32 win=4"]
    assert [len(s["timeline"]) for s in timeline["stages"]] == [s2["batches"]] * 2
    assert len(timeline["driver_timeline"]) == s2["batches"]
    for start, end, handed in timeline["stages"][0]["timeline"]:
        assert start <= end <= handed
    assert res["extrapolation"] and {e["stages"] for e in res["extrapolation"]} == {4, 8}
    md = (tiny_sweep / "throughput.md").read_text()
    assert "| S | K |" in md and "Extrapolation" in md


def test_sweep_plots_are_non_empty_pngs(tiny_sweep: Path) -> None:
    for name in ("throughput_vs_stages.png", "throughput_timeline.png", "throughput_bytes.png"):
        data = (tiny_sweep / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name


def test_sweep_writes_one_metrics_record_per_point(tiny_sweep: Path) -> None:
    lines = (tiny_sweep / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["stages"] for line in lines] == [2, 1]


@pytest.mark.parametrize("flags, words", [
    (["--stages", "3"], "cannot split 2 layers"),
    (["--wire", "float64"], "is not one of"),
    (["--batch-size", "ten"], "expected comma-separated integers"),
    (["--preset", "huge"], "unknown"),
])
def test_bad_sweep_arguments_fail_with_one_clear_line(flags: list[str], words: str, data_dir: Path,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = bpfree_cli.main(["bench", "sweep", "--preset", "tiny", "--data-dir", str(data_dir),
                            "--out", str(tmp_path), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "throughput.csv").exists()


def test_other_benchmarks_are_reached_through_bench(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bpfree_cli.main(["bench", "pipeline", "--help"])
    assert exc.value.code == 0
    assert "Pipeline benchmark" in capsys.readouterr().out


def test_gpu_grid_sizes_runs_to_the_budget_and_renders_a_table(data_dir: Path, tmp_path: Path) -> None:
    """bpfree.bench.gpu_grid on the CPU: every run (centralised and federated) finishes, table written."""
    from bpfree.bench.gpu_grid import main

    runs = tmp_path / "runs"
    assert main(["--grid", "smoke", "--device", "cpu", "--budget", "120", "--data-dir",
                 str(data_dir), "--runs-dir", str(runs)]) == 0
    results = sorted(p.name for p in runs.glob("*.result.json"))
    assert results == ["fed-symba-tiny.result.json", "symba-tiny.result.json"]
    out = tmp_path / "acc.md"
    assert main(["--grid", "smoke", "--render", str(runs), "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| symba-tiny", "| fed-symba-tiny"]
    for row in rows:
        epochs = row.split(" | ")[3]
        assert epochs.endswith("(2)") and int(epochs.split()[0]) >= 1
        assert float(row.split(" | ")[4].rstrip("%")) > 20.0   # learned (chance: 10%)
