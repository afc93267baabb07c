"""README is what a newcomer types: CI installs and tests with its commands, and every command of
its Quickstart, "Your own data" and "A trained model out" blocks runs as written, from a checkout's
root with BPFREE_DATA_DIR=../shared/datasets (relative, as printed), made small by $BPFREE_SET."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

RUN_BLOCKS = ("Quickstart", "Your own data", "A trained model out")
# Small work for every run the README starts; they win over the README's own flags.
SMALL = ("train.train_limit=1000;train.test_limit=300;train.epochs=1;federation.rounds=1;"
         "federation.local_epochs=1;continual.epochs_per_task=1;train.threads=1")


def _reader():  # noqa: ANN202 - the module CI itself runs
    spec = importlib.util.spec_from_file_location("readme_commands", REPO / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_installs_and_tests_with_the_readme_commands() -> None:
    reader = _reader()
    install, test = reader.commands("Install and test")
    assert install == 'pip install torch==2.13.0 -e ".[dev]"' and test.split()[0] == "pytest"
    ci = REPO / ".ci" / "run"
    assert reader.missing_from(ci, "Install and test") == []
    body = [x.split("  #")[0].strip() for x in ci.read_text().splitlines()]
    assert body.index(install) < body.index(test)
    own = [x for x in body if ("pip install" in x or "pytest" in x) and x not in (install, test)]
    assert own == []   # no install or test command of CI's own
    assert 'readme_commands.py --in .ci/run "Install and test"' in ci.read_text()


def test_the_readme_links_point_at_pages_and_headings_that_exist() -> None:
    import re

    text = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)]+)\)", text):
        path, _, anchor = target.partition("#")
        page = REPO / path
        assert page.is_file(), f"README links to {target}, which does not exist"
        if anchor:
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-")
                     for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}
            assert anchor in slugs, f"README links to {target}: no such heading"


def _checkout_root(tmp_path: Path, data_dir: Path) -> Path:
    """A copy of a checkout's root (its folders linked, not copied) with ../shared/datasets beside."""
    root = tmp_path / "main"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in {".git", "runs", "build"}:
            (root / entry.name).symlink_to(entry)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "datasets").symlink_to(data_dir)
    return root


def test_the_readme_commands_run_as_written(tmp_path: Path, data_dir: Path) -> None:
    reader = _reader()
    lines = [line for title in RUN_BLOCKS for line in reader.commands(title)]
    assert "export BPFREE_DATA_DIR=../shared/datasets" in lines[0]
    root = _checkout_root(tmp_path, data_dir)
    env = {k: v for k, v in os.environ.items() if k not in {"BPFREE_DATA_DIR", "PYTHONPATH"}}
    env.update(BPFREE_SET=SMALL, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    script = "set -euo pipefail\n" + "\n".join(f"echo {shlex.quote('+ ' + x)}\n{x}" for x in lines)
    done = subprocess.run(["bash", "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    for run in ("sim", "pipe", "mono", "cl", "mine", "table", "pets", "rule"):
        summary = json.loads((root / "runs" / run / "summary.json").read_text())
        assert summary.get("test_accuracy", summary.get("average_accuracy", 0)) > 0.2, run
    for picture in ("sim/accuracy.png", "sim/layers.png", "pipe/layers.png", "mono/layers.png"):
        assert (root / "runs" / picture).stat().st_size > 0
    rows = (root / "runs" / "mine" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 21 and rows[0].startswith("index,class,score_0")
    # the check `bpfree export` prints runs as printed, without bpfree on the path
    check = done.stdout.split("check: ", 1)[1].splitlines()[0]
    ran = subprocess.run(check, shell=True, cwd=root, capture_output=True, text=True, timeout=120,
                         env={**env, "PYTHONNOUSERSITE": "1"})
    assert ran.returncode == 0 and ran.stdout.startswith("tensor(["), ran.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("title", RUN_BLOCKS)
def test_every_readme_block_the_test_runs_exists(title: str) -> None:
    assert _reader().commands(title)
