"""A wheel works: it holds every package and every runtime dependency is declared; installed into a
fresh virtual environment it runs a federated round from a folder outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO

# The venv reuses this environment's packages (torch, Flower, Ray) but must not see this checkout:
# an editable install's import finder would hand it any module the wheel lacks.
NO_CHECKOUT = ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path\n"
               "                 if not type(f).__module__.startswith('__editable__')]\n")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    source = tmp_path_factory.mktemp("source") / "bpfree"   # setuptools' build/ stays out of the checkout
    shutil.copytree(REPO, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--no-build-isolation", "-w", str(out), str(source)],
                          capture_output=True, text=True, timeout=300, cwd=source,
                          env={**os.environ, "PIP_NO_INPUT": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = out.glob("bpfree-*.whl")
    return found


def test_the_wheel_holds_every_package_and_declares_pillow(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(Path(n).parent) for n in names if n.endswith("/__init__.py")}
    folders = {"client": "bpfree/client", "server": "bpfree/server", "protos": "bpfree/protos",
               "bench": "bpfree/bench"}
    for init in REPO.glob("**/__init__.py"):
        rel = init.parent.relative_to(REPO)
        if rel.parts[0] in {"tests", "build"} or rel.parts[0].startswith("."):
            continue
        installed = str(Path(folders.get(rel.parts[0], rel.parts[0]), *rel.parts[1:]))
        assert installed in packages, f"the wheel lacks {installed} ({rel})"
    assert "bpfree/flower_app/pyproject.toml" in names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = zipfile.ZipFile(wheel).read(metadata).decode()
    assert any(line.lower().startswith("requires-dist: pillow") for line in requires.splitlines())


def test_the_installed_flower_app_is_the_checkouts() -> None:
    ours = tomllib.loads((REPO / "pyproject.toml").read_text())
    installed = tomllib.loads((REPO / "bpfree" / "flower_app" / "pyproject.toml").read_text())
    assert installed["tool"]["flwr"] == ours["tool"]["flwr"]
    assert installed["project"]["version"] == ours["project"]["version"]


def test_a_wheel_in_a_fresh_venv_runs_a_federated_round_outside_the_checkout(
        wheel: Path, tmp_path: Path, data_dir: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "sitecustomize.py").write_text(NO_CHECKOUT)
    import flwr

    flower = f"flwr=={flwr.__version__}"   # its commands in the venv's bin, run by the venv's python
    for what in ([str(wheel)], ["--ignore-installed", flower]):
        done = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", *what],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    where = subprocess.run([str(py), "-c", "import bpfree_core.federation.strategies as s, "
                            "bpfree.server.app as a; print(a.__file__, s.__file__)"], cwd=outside,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0 and str(REPO) not in where.stdout, (where.stdout, where.stderr)
    done = subprocess.run(["bpfree", "simulate", "--executor", "inprocess", "--rounds", "1",
                           "--data-dir", str(data_dir), "--set", "train.train_limit=1000",
                           "--set", "train.test_limit=300", "--out", "runs/wheel", "--no-progress"],
                          cwd=outside, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert "test accuracy" in done.stdout and (outside / "runs" / "wheel" / "summary.json").is_file()
    version = subprocess.run(["bpfree", "--version"], cwd=outside, env=env, capture_output=True,
                             text=True, timeout=60)
    assert version.stdout.strip() == "bpfree " + tomllib.loads(
        (REPO / "pyproject.toml").read_text())["project"]["version"]
