"""Separate hosts on one Linux machine: network namespaces on a private switch, links shaped by tc.

    with Testbed(["driver", "s0", "s1"], rate_mbit=100) as tb:
        tb.address("s0")                               # '10.213.0.2'
        worker = tb.popen("s0", [sys.executable, "-m", "bpfree", "worker", ...])
        tb.shape("s0", rate_mbit=20)                   # change a link while traffic flows
        tb.run("driver", [sys.executable, ...])        # a command inside a host, to completion

Layout: one namespace per host holding its own `lo` and `eth0` (10.213.0.<i+1>/24), and one
switch namespace holding a bridge with the other end of every host's veth pair. Nothing is
created in the namespace this process runs in (its interfaces, routes and addresses are never
touched) and traffic between hosts never leaves the switch, so no other machine is a target.

Shaping: a tbf qdisc on both ends of a host's veth pair (the host's egress is its upload, the
switch port's egress its download), so `rate_mbit` caps each direction of that host's link.
Latency is not modelled: netem is not built into every kernel (not into this machine's), and tbf
adds only queueing delay.

Teardown, however the program ends: `close()` (also run by `with` on an exception or Ctrl-C)
stops every process inside each namespace (`ip netns pids`: children's children too, whoever
started them), then deletes the namespaces, which removes their links and qdiscs, and the
testbed's scratch directory (`tb.scratch`, for port files and logs). A guard process started
first does the same if this process dies without closing (SIGKILL, SIGTERM): it waits for
end-of-file on a pipe whose only writer is this process.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

SUBNET = "10.213.0"             # every testbed has its own switch, so they never collide
PREFIX = "bpftb"                # namespace names: bpftb-<creator pid>-<n>-<host>
_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_OWN = re.compile(rf"^{PREFIX}-(\d+)-\d+-")
_created = 0
MTU = 1500
# Bytes on the wire around one full segment's payload: Ethernet 14 + IPv4 20 + TCP 20 + 12 of
# timestamp options. tbf counts the Ethernet frame.
FRAME_OVERHEAD = 14 + 20 + 32


def payload_fraction(mtu: int = MTU) -> float:
    """Share of a shaped link's bytes that are TCP payload when segments are full."""
    return (mtu - 52) / (mtu + 14)


def unavailable() -> str | None:
    """Why a testbed cannot be built here (one line), or None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and tc need root (run as root, or in a root container)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        _run(["tc", "-n", probe, "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "10mbit",
              "burst", "32kb", "limit", "64kb"])
    except TestbedError as exc:
        return f"cannot build a namespace with a shaped veth link here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


class TestbedError(RuntimeError):
    """A namespace, link or qdisc could not be made; says which command failed and why."""


def _run(cmd: list[str], timeout: float = 30) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestbedError(f"`{' '.join(cmd)}` failed: {exc}") from exc
    if done.returncode != 0:
        raise TestbedError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _ip(*args: str) -> str:
    return _run(["ip", *args])


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pids_in(ns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in done.stdout.split()]


def remove(names: Sequence[str], grace: float = 5.0) -> None:
    """Stop every process inside `names` (SIGTERM, then SIGKILL after `grace` s), delete them."""
    names = [n for n in names if n in set(namespaces())]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = {p for n in names for p in pids_in(n)} - {os.getpid()}
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if _alive(p)}
            if pids:
                time.sleep(0.05)   # polling for processes to exit, with a deadline
        if not pids:
            break
    for n in names:
        subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is gone for our purposes (its parent reaps it later)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def remove_stale() -> list[str]:
    """Delete testbed namespaces whose creating process is gone (a crash nobody cleaned up)."""
    stale = [n for n in namespaces() if (m := _OWN.match(n)) and not _alive(int(m.group(1)))]
    remove(stale)
    return stale


def _rate_args(rate_mbit: float) -> list[str]:
    """tc tbf arguments for `rate_mbit`: 4 ms of burst (>= 32 KiB), a 50 ms queue."""
    rate = rate_mbit * 1e6 / 8                      # bytes/s
    burst = max(32 << 10, int(rate / 250))          # 4 ms of traffic, at least 32 KiB
    limit = max(2 * burst, int(rate * 0.05))        # a 50 ms queue
    return ["rate", f"{rate_mbit:g}mbit", "burst", str(burst), "limit", str(limit)]


def shape_device(ns: str, dev: str, rate_mbit: float | None) -> None:
    """Pace what `dev` in namespace `ns` sends at `rate_mbit` (None: unshaped). Needs only the
    names, so a process inside a host (bench links' driver) can re-shape links too."""
    if rate_mbit is None:
        subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"],
                       capture_output=True, timeout=30)   # absent already is fine
    else:
        _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", *_rate_args(rate_mbit)])


class Testbed:
    """Hosts (network namespaces) on one private switch; see the module docstring."""

    __test__ = False   # not a pytest test class, despite the name

    def __init__(self, hosts: Sequence[str], rate_mbit: float | None = None):
        global _created
        for h in hosts:
            if not _NAME.match(h):
                raise ValueError(f"host name {h!r}: use 1-12 lowercase letters and digits, "
                                 "starting with a letter")
        if len(set(hosts)) != len(hosts) or not 1 <= len(hosts) <= 250:
            raise ValueError(f"hosts {list(hosts)}: give 1-250 distinct names")
        _created += 1
        self.tag = f"{PREFIX}-{os.getpid()}-{_created}"
        self.hosts = list(hosts)
        self.switch = f"{self.tag}-sw"
        self._procs: list[subprocess.Popen] = []
        self.rates: dict[str, float | None] = dict.fromkeys(hosts)
        self._closed = False
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        # The guard first: from here on, nothing outlives this process.
        self._guard = subprocess.Popen(
            [sys.executable, __file__, "--guard", str(self.scratch), self.switch,
             *map(self.ns, hosts)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            self._build()
            if rate_mbit is not None:
                for h in hosts:
                    self.shape(h, rate_mbit)
        except BaseException:
            self.close()
            raise

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts.index(host) + 1}"

    def _build(self) -> None:
        sw = self.switch
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            ns = self.ns(host)
            _ip("netns", "add", ns)
            # Both ends made inside namespaces: the caller's namespace never sees an interface.
            _ip("-n", sw, "link", "add", f"p{i}", "mtu", str(MTU), "type", "veth", "peer", "name",
                "eth0", "mtu", str(MTU), "netns", ns)
            _ip("-n", sw, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", sw, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def link_ends(self, host: str) -> list[tuple[str, str]]:
        """(namespace, device) of both ends of `host`'s link: its eth0 (upload) and its switch
        port (download)."""
        return [(self.ns(host), "eth0"), (self.switch, f"p{self.hosts.index(host)}")]

    def shape(self, host: str, rate_mbit: float | None) -> None:
        """Cap both directions of `host`'s link at `rate_mbit` (None: unshaped)."""
        for ns, dev in self.link_ends(host):
            shape_device(ns, dev, rate_mbit)
        self.rates[host] = rate_mbit

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside `host` (`ip netns exec` execs it: the PID is the command's own)."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:  # noqa: ANN003
        """Start `argv` inside `host`; it is stopped by `close()` if still running."""
        proc = subprocess.Popen(self.command(host, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str], timeout: float,
            **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
        """Run `argv` inside `host` to completion (killed after `timeout` s)."""
        proc = self.popen(host, argv, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise TestbedError(f"`{' '.join(argv)}` in host {host} ran over {timeout:g} s") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def names(self) -> list[str]:
        return [self.switch, *map(self.ns, self.hosts)]

    def close(self) -> None:
        """Stop every process in every host, delete every namespace; idempotent."""
        if self._closed:
            return
        self._closed = True
        remove(self.names())
        shutil.rmtree(self.scratch, ignore_errors=True)
        for p in self._procs:   # reap our own children (the kernel already ended them)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        if self._guard.stdin is not None:
            self._guard.stdin.close()   # end-of-file: the guard finds nothing left and exits
        try:
            self._guard.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._guard.kill()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _guard(scratch: str, names: list[str]) -> None:
    """Wait until the creator's end of stdin closes (it closed or died), then remove `names`
    and `scratch`."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)   # a Ctrl-C on the terminal is the creator's to handle
    while sys.stdin.buffer.read(1 << 16):
        pass
    remove(names)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--guard"]:
    _guard(sys.argv[2], sys.argv[3:])
