"""`bpfree bench links` on a tiny plan: a real pipeline across namespace hosts on shaped links
writes its table, CSV, JSON and plot, and leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bpfree.bench.testbed import PREFIX, namespaces, unavailable

REPO = Path(__file__).resolve().parents[1]
REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no multi-host testbed here: {REASON}")


def _links(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bpfree", "bench", "links", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_links_sweep_measures_both_wires_on_a_shaped_link(data_dir: Path, tmp_path: Path) -> None:
    done = _links("--rates", "20", "--wire", "float32,int8", "--batch-size", "50", "--data-dir",
                  str(data_dir), "--out", str(tmp_path), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "links.json").read_text())
    rows = {r["wire"]: r for r in res["rows"]}
    assert set(rows) == {"float32", "int8"}
    for r in rows.values():
        assert r["link_mbit"] == 20 and r["batch"] == 50 and r["bound"] == "link"
        assert 0 < r["payload_utilisation"] <= 1.0   # never more than the shaped rate
        assert r["model_samples_per_s"] > 0 and r["samples_per_s"] > 0
    # int8 moves a quarter of the float32 activation bytes (plus a scale per row).
    assert rows["int8"]["bytes_per_sample"] < 0.3 * rows["float32"]["bytes_per_sample"]
    for name in ("links.md", "links.csv", "links.png"):
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "links.md").read_text()
    assert "bpfree bench links --rates 20" in md and "| 20 Mbit/s | int8 | 50 |" in md
    assert "20 Mbit/s" in done.stdout   # the table is printed too
    assert not [n for n in namespaces() if n.startswith(PREFIX)]
    assert not list(Path("/tmp").glob(f"{PREFIX}-*"))   # scratch directories removed


def test_links_without_data_fails_in_one_sentence(tmp_path: Path) -> None:
    done = _links("--rates", "20", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path))
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "bpfree bench: error:" in done.stderr
    assert not [n for n in namespaces() if n.startswith(PREFIX)]
