"""What many tests share: where real MNIST comes from, a loopback HTTP mirror, waiting on a real
condition with a deadline, process helpers (every process started is stopped by PID), and one
Push call on a worker's TCP data plane."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MNIST_MARKER = Path("mnist") / "train-images-idx3-ubyte.gz"


def mnist_dir(shared: Path | None = None) -> Path:
    """A directory holding real, MD5-checked MNIST: $BPFREE_TEST_DATA_DIR, else
    ../shared/datasets beside the checkout, else the project's own download into its cache
    ($BPFREE_CACHE_DIR, default ~/.cache/bpfree; $BPFREE_MIRROR replaces the mirrors), the way
    a user gets it on a connected machine."""
    from bpfree_core.data.datasets import SPECS, default_cache_dir, download

    env = os.environ.get("BPFREE_TEST_DATA_DIR")
    for candidate in filter(None, [Path(env) if env else None,
                                   shared if shared is not None else REPO.parent / "shared" / "datasets"]):
        if (candidate / MNIST_MARKER).is_file():
            return candidate
    cache = default_cache_dir()
    download(SPECS["mnist"], cache)   # verified, and only what is missing
    return cache


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 (ephemeral port) serving `directory`."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def wait_until(what: str, check: Callable[[], object], timeout: float) -> None:
    """Poll a real condition with a deadline (never a sleep as synchronisation)."""
    deadline, delay = time.monotonic() + timeout, 0.02
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g} s"
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def read(path: Path) -> str:
    """A file's text, or "" while it does not exist (yet)."""
    try:
        return path.read_text()
    except OSError:
        return ""


def bpfree(*args: str, merge: bool = False, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m bpfree ARGS` in its own session (stop it with os.killpg)."""
    return subprocess.Popen([sys.executable, "-m", "bpfree", *args], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True,
                            start_new_session=True)


def synthetic_packets(cfg, n: int) -> list:
    """`n` training packets of random MNIST-shaped images for `cfg` (seeded: the same each call)."""
    import torch

    from bpfree_core.data.batches import train_packets
    from bpfree_core.data.datasets import Split
    from bpfree_core.model import build_objective

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n * cfg.train.batch_size, 784, generator=gen)
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    return list(train_packets(build_objective(cfg), Split(x, y), cfg, epoch=0))


def assert_two_stages_equal_one(cfg, packets: list, devices: tuple[str, str, str] = ("cpu",) * 3) -> None:
    """The golden rule in one process: a 2-layer stack split into two stages ends bit-identical
    (`devices`: the whole stack's, then each stage's)."""
    import torch

    from bpfree_core.model import Stage, build_layers

    whole = Stage(build_layers(cfg), devices[0])
    first, second = (Stage([layer], d) for layer, d in zip(build_layers(cfg), devices[1:], strict=True))
    for p in packets:
        whole.train_step(p)
        second.train_step(first.train_step(p)[0])
    a, b = whole.state_dict(), {**first.state_dict(), **second.state_dict()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_packets_close(got: dict, want: dict, tol: float = 1e-4) -> None:
    """Two handed-on packets: the same keys, floats within `tol`, integers equal."""
    import torch

    assert got.keys() == want.keys()
    for key, w in want.items():
        if w.is_floating_point():
            torch.testing.assert_close(got[key], w, rtol=tol, atol=tol)
        else:
            assert torch.equal(got[key], w)


def tcp_push(address: str, port: int, security: object, frames: list[bytes]) -> list[bytes]:
    """Send `frames` on one TCP data-plane Push call; return the worker's ack frames, or raise
    the project's error carrying its refusal (status and sentence)."""
    from bpfree.client.tcp_plane import PUSH, TcpCall

    call = TcpCall(address, port, security, PUSH, timeout=10)
    try:
        try:
            for frame in frames:
                call.send([frame])
            call.send_bye()
        except OSError:
            pass   # refused mid-stream: its ERROR record says why
        return [bytes(f) for f in call.frames()]
    finally:
        call.cancel()
