"""gRPC plumbing shared by both ends: options, keepalive, TLS, the token check, peer waits.

Everything both ends must agree on (message limits, keepalive) is defined here once, so a
server and a channel can never disagree (a keepalive mismatch ends long streams with GOAWAY
"too_many_pings").
"""

from __future__ import annotations

import errno
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bpfree.protos import stage_pb2 as pb
from bpfree.protos import stage_pb2_grpc as pb_grpc
from bpfree_core.errors import (
    BpfreeError,
    ConfigError,
    PeerUnavailableError,
    ProtocolError,
    StageTimeoutError,
)

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20     # per gRPC message, both directions, both ends
MAX_CHUNK_BYTES = 32 << 20       # pipeline.chunk_bytes must leave room for the frame header
KEEPALIVE_MS = 30_000            # ping an idle connection every 30 s ...
KEEPALIVE_TIMEOUT_MS = 10_000    # ... and drop it if the ping is not answered within 10 s
TOKEN_HEADER = "x-bpfree-token"
IDLE_TIMEOUT = 60.0              # seconds a worker keeps a connection that carries no RPC
REFUSED_FOR = 10.0               # seconds of "connection refused" before a peer is declared absent

# Data-plane methods: raw bytes in and out (no protobuf (de)serialisation), see protos/stage.proto.
PUSH_METHOD = "/bpfree.v1.StageData/Push"
PULL_METHOD = "/bpfree.v1.StageData/Pull"


def _common_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(idle_timeout: float = IDLE_TIMEOUT) -> list[tuple[str, Any]]:
    # The server accepts pings as often as the client sends them (same constant), never faster.
    # A connection that completes no handshake, or carries no RPC, for `idle_timeout` seconds is
    # closed (idle strangers cost memory: 200 of them once held 127 MB); a real peer reconnects
    # by itself on its next RPC.
    idle_ms = int(idle_timeout * 1000)
    return [*_common_options(),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS),
            ("grpc.server_handshake_timeout_ms", idle_ms),
            ("grpc.max_connection_idle_ms", idle_ms),
            ("grpc.so_reuseport", 0)]


def channel_options() -> list[tuple[str, Any]]:
    # Reconnect attempts at most 2 s apart: a peer that comes up is seen within ~2 s (gRPC's
    # default backoff grows to 120 s, and a failing channel fails RPCs fast meanwhile).
    return [*_common_options(), ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000)]


def split_address(address: str, what: str = "address") -> tuple[str, int]:
    """("host", port) of "HOST:PORT" or "[IPv6]:PORT"; a ConfigError saying the format otherwise."""
    host, sep, port = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} {address!r} is not HOST:PORT (e.g. 127.0.0.1:7001, "
                          "node3:7001 or [::1]:7001; port 0..65535)")
    return host, int(port)


def check_port_free(listen: str, flag: str = "--listen") -> None:
    """Refuse, naming it, a port something else already listens on (before gRPC tries and logs)."""
    host, port = split_address(listen, flag)
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as gRPC binds: a port whose last owner's connections linger in TIME_WAIT is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already taken by another process; "
                                  f"pick a free port (or :0 for any)") from None
            raise ConfigError(f"cannot listen on {listen} ({exc.strerror}); pick a local "
                              "address of this machine and a free port") from None


def check_chunk_bytes(chunk_bytes: int) -> None:
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(f"pipeline.chunk_bytes = {chunk_bytes} must be in 1 .. {MAX_CHUNK_BYTES} "
                          "(one chunk plus its header must fit one gRPC message)")


# ---------------------------------------------------------------------------------------------
# Security: optional TLS and a shared token


@dataclass(frozen=True)
class Security:
    """What a process needs to talk to peers: the shared token and TLS files (all optional)."""

    token: str = ""
    tls_cert: str = ""    # server certificate (PEM) — workers only
    tls_key: str = ""     # its private key (PEM) — workers only
    tls_ca: str = ""      # CA (PEM) that signed the peers' certificates; "" = plaintext channels

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key (or neither)")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"--{name.replace('_', '-')} {path} does not exist")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_HEADER, self.token),) if self.token else ()

    def channel(self, address: str) -> grpc.Channel:
        if self.tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(self.tls_ca).read_bytes())
            return grpc.secure_channel(address, creds, options=channel_options())
        return grpc.insecure_channel(address, options=channel_options())

    def add_port(self, server: grpc.Server, address: str) -> int:
        if self.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes())])
            return server.add_secure_port(address, creds)
        return server.add_insecure_port(address)


class RateLimitedLog:
    """At most `burst` warnings per `period` seconds for one kind of event; the rest are counted,
    and the next warning that gets through says how many were held back (a flood of bad
    messages must not flood the log)."""

    def __init__(self, logger: logging.Logger, burst: int = 5, period: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.burst, self.period, self.clock = logger, burst, period, clock
        self._lock = threading.Lock()
        self._start, self._sent, self._held = 0.0, 0, 0

    def warning(self, msg: str, *args: object) -> None:
        with self._lock:
            now = self.clock()
            if now - self._start >= self.period:
                self._start, self._sent = now, 0
            if self._sent >= self.burst:
                self._held += 1
                return
            self._sent += 1
            held, self._held = self._held, 0
        if held:
            msg += f" ({held} more like it in the last {self.period:g} s were not logged)"
        self.logger.warning(msg, *args)


_TOKEN_FAILURES = RateLimitedLog(log)


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects every RPC whose `x-bpfree-token` metadata is not the shared token."""

    def __init__(self, token: str):
        self._token = token.encode()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):  # noqa: ANN201
        got = dict(details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._token):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        reason = "missing" if not got else "wrong"
        message = (f"{reason} access token for {details.method}; pass the pipeline's shared token "
                   "(--token / pipeline.token)")

        def deny(_request: object, context: grpc.ServicerContext) -> None:
            _TOKEN_FAILURES.warning("refused %s from %s: %s access token", details.method,
                                    context.peer(), reason)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # Same RPC shape as the real handler, but it reads nothing and answers nothing.
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


# ---------------------------------------------------------------------------------------------
# Reaching a peer


def status_error(address: str, status: str, detail: str, what: str) -> BpfreeError:
    """The project's error for a peer's failure with gRPC status name `status` (either plane)."""
    msg = f"{what} stage worker at {address} failed: {status}: {detail}"
    if status == "UNAVAILABLE":
        return PeerUnavailableError(msg + "; is the worker still running and reachable?")
    if status == "DEADLINE_EXCEEDED":
        return StageTimeoutError(msg + "; raise pipeline.rpc_timeout if the stage is just slow")
    if status in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):
        return ProtocolError(msg)
    return BpfreeError(msg)


def rpc_status(exc: grpc.RpcError) -> tuple[str, str]:
    """(status name, detail) of a failed RPC."""
    code = exc.code() if hasattr(exc, "code") else None
    return code.name if code else "ERROR", exc.details() if hasattr(exc, "details") else str(exc)


def describe(exc: grpc.RpcError) -> str:
    return "{}: {}".format(*rpc_status(exc))


def wait_for_peer(
    address: str, security: Security, timeout: float, channel: grpc.Channel | None = None,
    refused_for: float = REFUSED_FOR,
) -> pb.HealthReply:
    """Health-check `address` with capped exponential backoff until it answers or `timeout` ends.

    Only "not reachable yet" errors are retried; a peer that answers with an error (a wrong
    token, say) fails at once with that error, and an address where nothing listens (connection
    refused on every attempt for REFUSED_FOR seconds: time for a worker to start) is named as such.
    """
    split_address(address, "stage worker address")
    own = channel is None
    channel = channel or security.channel(address)
    stub = pb_grpc.StageControlStub(channel)
    deadline = time.monotonic() + timeout
    delay, attempt, last = 0.05, 0, "no attempt made"
    refused_since: float | None = None
    try:
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            try:
                return stub.Health(pb.HealthRequest(), timeout=max(0.05, min(left, 5.0)),
                                   metadata=security.metadata())
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise PeerUnavailableError(
                        f"stage worker at {address} refused us ({describe(exc)}); check the shared "
                        "token (--token / pipeline.token) and TLS settings") from None
                last = describe(exc)
                refused = "refused" in last.lower()
                refused_since = (refused_since or time.monotonic()) if refused else None
            left = deadline - time.monotonic()
            if refused_since is not None and (left <= 0 or time.monotonic() - refused_since
                                              >= refused_for):
                raise PeerUnavailableError(
                    f"nothing listens at {address}: the connection was refused for "
                    f"{time.monotonic() - refused_since:.0f} s ({attempt} attempts); start "
                    f"`bpfree worker --listen {address}` there, or fix the address")
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerUnavailableError(
                    f"stage worker at {address} did not answer within {timeout:g} s ({attempt} "
                    f"attempts; last error {last}); check that `bpfree worker --listen {address}` is "
                    "running and reachable, or raise pipeline.connect_timeout")
            time.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)
    finally:
        if own:
            channel.close()
