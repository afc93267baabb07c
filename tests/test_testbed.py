"""The multi-host testbed (bench/testbed.py): hosts are separate, links are shaped, nothing is left.

Real namespaces, veth links and tbf qdiscs; traffic only between the hosts a test made. Skipped,
with the reason, where namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpfree.bench.testbed import PREFIX, Testbed, namespaces, unavailable

REPO = Path(__file__).resolve().parents[1]
REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no multi-host testbed here: {REASON}")

# A receiver that counts bytes until the sender closes, then prints "<bytes> <seconds>".
SINK = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 5001)); s.listen(1); print("listening", flush=True)
s.settimeout(60); c, _ = s.accept(); c.settimeout(60); n = 0; t0 = None
while True:
    d = c.recv(1 << 16)
    if not d: break
    t0 = t0 or time.perf_counter(); n += len(d)
print(n, time.perf_counter() - t0, flush=True)
"""
SEND = ("import socket, sys; s = socket.create_connection((sys.argv[1], 5001), timeout=60); "
        "s.sendall(b'x' * int(sys.argv[2])); s.close()")


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _mbit(tb: Testbed, src: str, dst: str, nbytes: int) -> float:
    """Payload Mbit/s of one TCP transfer from host `src` to host `dst`."""
    sink = tb.popen(dst, [sys.executable, "-c", SINK, tb.address(dst)], stdout=subprocess.PIPE,
                    text=True)
    assert sink.stdout.readline().strip() == "listening"
    sent = tb.run(src, [sys.executable, "-c", SEND, tb.address(dst), str(nbytes)], timeout=60)
    assert sent.returncode == 0
    got, seconds = sink.stdout.readline().split()
    sink.wait(timeout=10)
    assert int(got) == nbytes
    return nbytes * 8 / float(seconds) / 1e6


def test_hosts_are_separate_and_the_callers_namespace_is_untouched() -> None:
    before = _links()
    with Testbed(["a", "b"]) as tb:
        assert len(namespaces()) >= 3 and tb.switch in namespaces()
        for h in ("a", "b"):
            out = subprocess.run(["ip", "-n", tb.ns(h), "-o", "addr"], capture_output=True,
                                 text=True, check=True).stdout
            assert {line.split()[1] for line in out.splitlines()} == {"lo", "eth0"}
            assert f"{tb.address(h)}/24" in out
            routes = subprocess.run(["ip", "-n", tb.ns(h), "route"], capture_output=True, text=True,
                                    check=True).stdout
            assert "default" not in routes   # the switch is all a host can reach
        assert _links() == before            # no interface appeared here
        # Each host has its own loopback: a port bound on a's 127.0.0.1 is not open on b's.
        listener = tb.popen("a", [sys.executable, "-c",
                                  "import socket, time; s = socket.socket(); "
                                  "s.bind(('127.0.0.1', 5002)); s.listen(1); print('up', flush=True); "
                                  "s.settimeout(30); s.accept()"], stdout=subprocess.PIPE, text=True)
        assert listener.stdout.readline().strip() == "up"
        probe = ("import socket, sys\ntry:\n    socket.create_connection(('127.0.0.1', 5002), 5)\n"
                 "    print('open')\nexcept OSError:\n    print('closed')")
        assert tb.run("b", [sys.executable, "-c", probe], timeout=30,
                      stdout=subprocess.PIPE, text=True).stdout.strip() == "closed"
        assert tb.run("a", [sys.executable, "-c", probe], timeout=30,
                      stdout=subprocess.PIPE, text=True).stdout.strip() == "open"
        assert _free_here(5002)               # ... nor on the caller's
    assert tb.switch not in namespaces() and _links() == before


def _free_here(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_shaped_link_caps_throughput_and_reshaping_lifts_it() -> None:
    with Testbed(["a", "b"], rate_mbit=20) as tb:
        capped = _mbit(tb, "a", "b", 2_000_000)
        # tbf paces Ethernet frames; TCP payload is ~95% of them. Without shaping a veth pair
        # carries gigabits, so an unapplied qdisc fails the upper bound by 50x.
        assert 0.6 * 20 < capped < 1.1 * 20, capped
        tb.shape("a", None)
        tb.shape("b", None)
        assert _mbit(tb, "a", "b", 20_000_000) > 5 * capped


def test_close_stops_every_process_inside_and_removes_the_namespaces() -> None:
    tb = Testbed(["a", "b"])
    # A process and a grandchild the testbed never saw start (bash starts it).
    proc = tb.popen("a", ["bash", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    grandchild = int(proc.stdout.readline())
    names = tb.names()
    (tb.scratch / "stage.log").write_text("a log")
    tb.close()
    assert not set(names) & set(namespaces()) and not tb.scratch.exists()
    assert proc.poll() is not None and not _alive(grandchild)
    tb.close()   # idempotent


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


CREATOR = """
import json, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a shell (pytest's may ignore it)
sys.path.insert(0, sys.argv[1])
from bpfree.bench.testbed import Testbed
with Testbed(["a", "b"], rate_mbit=50) as tb:
    p = tb.popen("b", ["bash", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    print(json.dumps({"names": tb.names(), "pids": [p.pid, int(p.stdout.readline())],
                      "scratch": str(tb.scratch)}), flush=True)
    if sys.argv[2] == "raise":
        raise RuntimeError("the benchmark failed")
    sys.stdin.read()   # wait to be interrupted or killed
"""


@pytest.mark.parametrize("how", ["sigkill", "sigterm", "ctrl-c", "raise"])
def test_nothing_is_left_however_the_creator_ends(how: str) -> None:
    """SIGKILL and SIGTERM leave no chance to clean up: the guard process does it. Ctrl-C and an
    exception unwind through `with`."""
    creator = subprocess.Popen([sys.executable, "-c", CREATOR, str(REPO), how],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        info = json.loads(creator.stdout.readline())
        assert set(info["names"]) <= set(namespaces())
        if how != "raise":
            creator.send_signal({"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM,
                                 "ctrl-c": signal.SIGINT}[how])
        creator.wait(timeout=60)
        assert creator.returncode != 0
        deadline = time.monotonic() + 30
        while (set(info["names"]) & set(namespaces()) or any(map(_alive, info["pids"]))
               or Path(info["scratch"]).exists()) and time.monotonic() < deadline:
            time.sleep(0.1)   # the guard works after its creator is gone: poll with a deadline
        assert not set(info["names"]) & set(namespaces())
        assert not any(map(_alive, info["pids"])) and not Path(info["scratch"]).exists()
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.wait(timeout=10)
    ours = [n for n in namespaces() if n.startswith(f"{PREFIX}-{creator.pid}-")]
    assert not ours


def test_without_iproute2_or_root_the_reason_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import sys; sys.path.insert(0, sys.argv[1]); from bpfree.bench.testbed import unavailable; " \
           "print(unavailable())"
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PATH": "/nonexistent"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "`ip` (iproute2) is not installed"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert unavailable() == "network namespaces and tc need root (run as root, or in a root container)"
