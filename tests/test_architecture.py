"""Imports flow one way, and an installed bpfree claims only names of its own.

The layers, top to bottom: the command line and Python API (bpfree/), bench/, server/, client/,
protos/, bpfree_core/. A module may import its own layer and the ones below it, never above;
bpfree_core needs only torch (no gRPC, Flower, Ray or bpfree). The folders are installed as
bpfree.bench, bpfree.server, ... (pyproject's package-dir), which import-linter's graph builder
cannot follow, so the contract is checked here from the source with `ast`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (folder, installed package) from the top layer down
LAYERS = [("bpfree", "bpfree"), ("bench", "bpfree.bench"), ("server", "bpfree.server"),
          ("client", "bpfree.client"), ("protos", "bpfree.protos"), ("bpfree_core", "bpfree_core")]
CORE_FORBIDDEN = ("grpc", "flwr", "ray", "bpfree")


def layer_of(module: str) -> int | None:
    """The layer index of an importable module name (None: not ours)."""
    for i, (_, package) in reversed(list(enumerate(LAYERS))):
        if module == package or module.startswith(package + "."):
            return i
    return None


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in a file, function-level imports included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def violations(root: Path) -> list[str]:
    found = []
    for i, (folder, _) in enumerate(LAYERS):
        for path in sorted((root / folder).rglob("*.py")):
            where = path.relative_to(root)
            for line, module in imported(path):
                top = module.split(".")[0]
                target = layer_of(module)
                if folder == "bpfree_core" and top in CORE_FORBIDDEN:
                    found.append(f"{where}:{line} imports {module} (bpfree_core needs only torch)")
                elif target is not None and target < i:
                    found.append(f"{where}:{line} imports {module}, a layer above {LAYERS[i][1]}")
                elif top in {f for f, _ in LAYERS[1:5]}:
                    found.append(f"{where}:{line} imports {module} by its folder name; "
                                 f"import bpfree.{module}")
    return found


def test_imports_flow_one_way() -> None:
    assert violations(REPO) == []


def test_the_check_sees_an_upward_import_a_core_dependency_and_a_folder_name(tmp_path: Path) -> None:
    for folder, _ in LAYERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "client" / "x.py").write_text("def f():\n    from bpfree.server.app import app\n")
    (tmp_path / "bpfree_core" / "y.py").write_text("import flwr\nfrom bpfree.client import x\n")
    (tmp_path / "server" / "z.py").write_text("from client.worker import serve\n")
    (tmp_path / "bench" / "ok.py").write_text("from bpfree.server import z\nimport bpfree_core.y\n")
    found = violations(tmp_path)
    assert found == [
        "server/z.py:1 imports client.worker by its folder name; import bpfree.client.worker",
        "client/x.py:2 imports bpfree.server.app, a layer above bpfree.client",
        "bpfree_core/y.py:1 imports flwr (bpfree_core needs only torch)",
        "bpfree_core/y.py:2 imports bpfree.client (bpfree_core needs only torch)"]


def test_an_installed_bpfree_claims_only_its_own_names(tmp_path: Path) -> None:
    """Outside the checkout, the generic folder names are not importable; bpfree.<folder> is,
    and importing a stage worker does not load Flower or the Python API."""
    code = ("import importlib.util as u\n"
            "generic = ('client', 'server', 'protos', 'bench', 'bpfree_cli')\n"
            "print([n for n in generic if u.find_spec(n)])\n"
            "import bpfree.client.worker, bpfree.protos.stage_pb2_grpc, bpfree.server.app\n"
            "import bpfree.bench.cli\n")
    worker_only = ("import sys, bpfree.client.worker\n"
                   "print('bpfree.api' in sys.modules, 'flwr' in sys.modules)\n")
    env_cwd = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 120}
    done = subprocess.run([sys.executable, "-c", code], **env_cwd)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"generic top-level names importable: {done.stdout}"
    light = subprocess.run([sys.executable, "-c", worker_only], **env_cwd)
    assert light.returncode == 0, light.stderr
    assert light.stdout.split() == ["False", "False"], "a stage worker loads the API or Flower"
