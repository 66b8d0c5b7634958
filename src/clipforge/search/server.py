"""Running the service under uvicorn: binding checked before anything is announced, the
descriptor limit raised, and connections that cannot exhaust the server.

uvicorn's ``limit_concurrency`` answers 503 to *every* request once that many connections are
open, ``/health`` included, and a connection that never sends a request has no timer at all: a
flood of idle sockets would hold the server until descriptors run out. :class:`ConnectionGuard`
adds, on uvicorn's own HTTP protocol class:

- a header timeout: a connection that has not delivered a complete request head within
  ``header_timeout`` seconds of connecting (or of its previous response) is closed;
- a connection cap: beyond ``max_connections`` an idle connection (waiting for a request head,
  nothing in flight) is closed to make room, as nginx reuses idle keep-alive connections: first
  the connections that have never sent a request, oldest first, then served keep-alive ones,
  least recently active first. A client that keeps using its connection (a health poller, a
  browser) therefore outlives a flood of sockets that never speak. Only when every connection
  carries a request is the newcomer refused (503). Choosing the victim is O(1) amortised
  (:class:`IdleConnections`): a flood of thousands of connections costs each accept a few
  dictionary operations, not a scan of every open connection, so the accept queue drains fast.

uvicorn's ``limit_concurrency`` counts open connections, so it is set just above the cap (a
backstop that never answers 503 to a connection the cap admitted); requests in flight are bounded
by the worker pool and the batch queues (503 beyond ``max_pending``). ``timeout_keep_alive``
bounds idle keep-alive connections, ``timeout_graceful_shutdown`` the drain of in-flight requests
on SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import resource
import socket
import struct
import termios
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("clipforge.search.server")
FD_RESERVE = 128  # descriptors kept for the index, model files, thumbnails and logs
LISTEN_BACKLOG = 65535  # the kernel's accept queue (capped at net.core.somaxconn): absorbs connection bursts
ACCEPT_BURST = 64  # connections asyncio accepts per event-loop turn: a flood cannot starve open connections
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
           b"retry-after: 1\r\ncontent-length: 61\r\n\r\n"
           b'{"detail":"server busy: too many connections","errors":null}\n')


@dataclass
class ServerLimits:
    max_connections: int = 1000       # open connections (idle ones are closed first beyond this)
    header_timeout: float = 10.0      # seconds to deliver a request head
    keep_alive: int = 5               # seconds an idle keep-alive connection stays open
    graceful_timeout: int = 30        # seconds to drain in-flight requests on shutdown

    def __post_init__(self) -> None:
        for name in ("max_connections", "keep_alive", "graceful_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.header_timeout > 0:
            raise ValueError(f"header_timeout must be > 0 seconds, got {self.header_timeout!r}")


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.debug("cannot raise RLIMIT_NOFILE from %s to %s: %s", soft, target, e)
    return soft


def connection_budget(limits: ServerLimits) -> ServerLimits:
    """``limits`` with ``max_connections`` within the descriptors this process may open."""
    soft = raise_fd_limit()
    fit = max(soft - FD_RESERVE, 16)
    if limits.max_connections > fit:
        log.warning("max connections lowered from %d to %d: the descriptor limit is %d",
                    limits.max_connections, fit, soft)
        limits = ServerLimits(**{**vars(limits), "max_connections": fit})
    return limits


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a ValueError naming the host and port (bad
    address, port in use, no permission): checked before the server says it is serving."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host!r} is not an address this machine can bind: {e}") from None
    err: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
            sock.set_inheritable(True)
            return sock
        except OSError as e:
            sock.close()
            err = e
    why = err.strerror if err is not None and err.strerror else str(err)
    raise ValueError(f"cannot listen on {host}:{port}: {why}")


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address."""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def _waiting_for_head(conn: Any) -> bool:
    cycle = getattr(conn, "cycle", None)
    return cycle is None or cycle.response_complete


def _has_unread_bytes(conn: Any) -> bool:
    """Whether bytes wait in the connection's receive buffer: a request the event loop has not read
    yet (the loop runs a burst of accepts before the reads of earlier connections), so not idle."""
    sock = conn.transport.get_extra_info("socket")
    try:
        return sock is not None and struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0] > 0
    except (OSError, ValueError):
        return False


class IdleConnections:
    """Connections waiting for a request head, in eviction order: never-served ones first (oldest
    first), then served keep-alive ones (least recently active first).

    Entries are added when a connection opens or finishes a response; a connection that starts a
    request stays listed and is skipped (and dropped) when it reaches the front busy, so no hook
    into the HTTP parser is needed and each pick is O(1) amortised."""

    def __init__(self) -> None:
        self.fresh: dict[Any, None] = {}   # never sent a request; insertion order = age
        self.served: dict[Any, None] = {}  # finished a response; re-inserted on each one

    def waiting(self, conn: Any, *, served: bool) -> None:
        self.fresh.pop(conn, None)
        self.served.pop(conn, None)
        (self.served if served else self.fresh)[conn] = None

    def forget(self, conn: Any) -> None:
        self.fresh.pop(conn, None)
        self.served.pop(conn, None)

    def victim(self, keep: Any) -> Any | None:
        """The connection to close to make room for ``keep``, or None when every other one is busy."""
        for queue in (self.fresh, self.served):
            skipped_keep = False
            while queue:
                conn = next(iter(queue))
                if conn is keep:  # the newcomer itself: look past it
                    del queue[conn]
                    skipped_keep = True
                    continue
                del queue[conn]
                if _waiting_for_head(conn) and not conn.transport.is_closing() and not _has_unread_bytes(conn):
                    if skipped_keep:
                        queue[keep] = None
                    return conn
            if skipped_keep:
                queue[keep] = None
        return None


class ConnectionGuard:
    """Mixin over uvicorn's HTTP protocol (h11 or httptools): header timeout and connection cap."""

    guard_limits: ServerLimits = ServerLimits()
    guard_idle: IdleConnections  # one per server, set by guarded_protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()
        self.guard_idle.waiting(self, served=False)
        conns = self.connections  # type: ignore[attr-defined]
        if len(conns) > self.guard_limits.max_connections:
            victim = self.guard_idle.victim(self)
            if victim is not None:
                log.debug("connection cap %d reached: closing an idle connection", self.guard_limits.max_connections)
                victim.transport.close()
                conns.discard(victim)
            else:
                log.debug("connection cap %d reached, every connection busy: refusing one",
                          self.guard_limits.max_connections)
                self.guard_idle.forget(self)
                transport.write(REFUSED)
                transport.close()

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.guard_limits.header_timeout, self._head_timeout)  # type: ignore[attr-defined]

    def _head_timeout(self) -> None:
        self._head_timer = None
        if _waiting_for_head(self) and not self.transport.is_closing():  # type: ignore[attr-defined]
            log.debug("closing a connection that sent no request head within %g s", self.guard_limits.header_timeout)
            self.transport.close()  # type: ignore[attr-defined]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():  # type: ignore[attr-defined]
            self._arm_head_timer()
            self.guard_idle.waiting(self, served=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.guard_idle.forget(self)
        super().connection_lost(exc)  # type: ignore[misc]


def guarded_protocol(limits: ServerLimits) -> type:
    """uvicorn's default HTTP protocol class with :class:`ConnectionGuard` and ``limits``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # heavy optional dependency: loaded when serving

    return type("GuardedHTTPProtocol", (ConnectionGuard, AutoHTTPProtocol),
                {"guard_limits": limits, "guard_idle": IdleConnections()})


def uvicorn_config(app: Any, limits: ServerLimits, *, log_level: str | None = "info", access_log: bool = True) -> Any:
    """The uvicorn.Config that serves ``app`` with ``limits``."""
    import uvicorn  # heavy optional dependency: loaded when serving

    return uvicorn.Config(app, http=guarded_protocol(limits), limit_concurrency=limits.max_connections + 1,
                          timeout_keep_alive=limits.keep_alive, timeout_graceful_shutdown=limits.graceful_timeout,
                          backlog=ACCEPT_BURST, log_level=log_level, access_log=access_log, lifespan="auto")


def no_delay(sock: socket.socket) -> None:
    """TCP_NODELAY on a listening TCP socket, which its accepted connections inherit (Linux, BSDs).
    asyncio sets it per connection only when the socket says ``proto == IPPROTO_TCP``; a socket
    made by ``socket.socket()`` says 0, and then every keep-alive response written in two parts
    (headers, body) waited for the client's delayed ACK: /health took 44 ms instead of 2 ms
    (benchmarks/serve_load.py, whose clients keep their connections open)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def uvicorn_server(app: Any, limits: ServerLimits, *, log_level: str | None = "info", access_log: bool = True) -> Any:
    """A uvicorn.Server for ``app`` whose listening sockets keep a deep kernel queue.

    asyncio uses one number for two things: ``listen(backlog)`` and how many connections it
    accepts in one event-loop turn (each then costs a protocol object before any other callback
    runs). A deep queue absorbs bursts; a short turn keeps ``/health`` and requests on open
    connections answering while thousands of sockets arrive. So uvicorn gets the short number
    (:data:`ACCEPT_BURST`) and the sockets are re-listened with :data:`LISTEN_BACKLOG` once
    serving has started."""
    import uvicorn  # heavy optional dependency: loaded when serving

    class GuardedServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            for sock in sockets or ():
                no_delay(sock)
            await super().startup(sockets=sockets)
            for sock in sockets or ():
                sock.listen(LISTEN_BACKLOG)

    return GuardedServer(uvicorn_config(app, limits, log_level=log_level, access_log=access_log))
