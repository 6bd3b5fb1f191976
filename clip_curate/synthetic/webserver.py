"""A real local HTTP/1.1 server for tests, the demo and benchmarks, with fault injection and counters.

It speaks HTTP/1.1 over asyncio streams (keep-alive, ``Content-Length`` or close-delimited bodies)
so that faults can be injected at the byte level and the bytes really sent can be counted.

API::

    from clip_curate.synthetic.webserver import Route, WebServer, fault_routes, tiny_jpeg

    routes = {"/a.jpg": Route(tiny_jpeg(), content_type="image/jpeg"),
              "/gone": Route(status=404),
              "/flaky": Route(tiny_jpeg(), content_type="image/jpeg", fail_first=2),   # 500, 500, 200
              "/noai": Route(big, content_type="image/jpeg", headers={"X-Robots-Tag": "noai"})}
    with WebServer(routes) as srv:                       # background thread, 127.0.0.1, free port
        srv.url("/a.jpg")                                # 'http://127.0.0.1:PORT/a.jpg'
        srv.stats().requests["/flaky"]                   # 3 after a successful retrying client
    with WebServer(routes, hosts=["127.0.0.2", "127.0.0.3"]) as srv:   # several loopback addresses, one port
        srv.url("/a.jpg", host="127.0.0.3"); srv.stats("127.0.0.3").max_active
    with WebServer(routes, hosts=[...], process=True) as srv:  # server in its own process (benchmarks)

``Route`` fields (all optional):

==================  ================================================================================
``body``            response body bytes
``status``          HTTP status (default 200; 302 when ``redirect_to`` is set)
``headers``         extra headers: a dict or a sequence of ``(name, value)`` pairs (repeats allowed)
``content_type``    ``Content-Type`` (default ``application/octet-stream``)
``delay_s``         wait this long before sending anything (a slow host: ``delay_s=10``)
``drip_bytes_per_s`` send the body at this rate (a slow drip that outlives a client deadline)
``reset``           reset the connection (TCP RST) instead of answering
``truncate_to``     announce the full ``Content-Length`` but send only this many body bytes, then close
``redirect_to``     ``Location`` value (relative path or absolute URL, another host or a private address)
``fail_first``      answer the first N requests (per host and path) with ``fail_status``, then normally
``fail_status``     status used by ``fail_first`` (default 500)
``content_length``  send ``Content-Length`` (default True); False: body delimited by closing the connection
==================  ================================================================================

``routes`` is a dict or a callable ``routes(request) -> Route | None`` (``None``: 404). ``request`` is a
:class:`Request` (``method``, ``path``, ``host`` = Host header without port, ``local_addr``, ``headers``,
``n`` = how many earlier requests for this host and path). Dict keys are ``"/path"`` (any host) or
``"HOST/path"`` (only for that Host header hostname or local address), looked up with and then without
the query string. :func:`fault_routes` returns the standard fault web used by the tests.

Counters (``srv.stats(host=None)`` returns a :class:`Stats` snapshot; ``host`` is a local address):
``requests`` (path -> count), ``requests_total``, ``bytes_sent`` (body and header bytes accepted by the
kernel, not merely queued), ``active`` / ``max_active`` (requests being answered now / at most at once),
``connections`` / ``max_connections`` (open TCP connections now / at most), ``first_request_at`` /
``last_request_at`` (``time.time()`` of the first / last request head), ``concurrency_seen`` (histogram:
requests on this address being answered when a request arrived, itself included -> count; the
per-host concurrency distribution, e.g. its p99). ``srv.reset_stats()`` zeroes them.

Request log: ``srv.request_log(host=None)`` lists the last ``log_size`` (default 100 000) request heads
received, oldest first, as :class:`LoggedRequest` (``at``, ``method``, ``path``, ``host`` = Host header
hostname, ``local_addr``); ``reset_stats()`` clears it too.

Encoded bodies: :func:`encode` gives a body's ``gzip`` / ``deflate`` (zlib-wrapped, as RFC 9110 says) /
``deflate-raw`` (what some servers send as ``deflate``) form, to serve with a ``Content-Encoding`` header;
:func:`gzip_bomb` gives the gzip of N zero bytes (about 1000:1) without building the N bytes.

Binding 127.0.0.2, 127.0.0.3, ... works on Linux without setup (the whole 127.0.0.0/8 is loopback).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import io
import multiprocessing
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union
from urllib.parse import urlsplit

__all__ = ["Route", "Request", "LoggedRequest", "Stats", "WebServer", "fault_routes", "tiny_jpeg",
           "loopback_hosts", "encode", "gzip_bomb"]

_REASON_PHRASES = {200: "OK", 301: "Moved Permanently", 302: "Found", 303: "See Other", 307: "Temporary Redirect",
                   308: "Permanent Redirect", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 410: "Gone",
                   429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
                   503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass(frozen=True)
class Route:
    """How the server answers one path (see the module docstring for the fields)."""

    body: bytes = b""
    status: int = 0
    headers: Any = field(default_factory=dict)
    content_type: str = "application/octet-stream"
    drip_bytes_per_s: float | None = None
    delay_s: float = 0.0
    reset: bool = False
    truncate_to: int | None = None
    redirect_to: str | None = None
    fail_first: int = 0
    fail_status: int = 500
    content_length: bool = True

    def header_items(self) -> list[tuple[str, str]]:
        items = self.headers.items() if isinstance(self.headers, Mapping) else self.headers
        return [(str(k), str(v)) for k, v in items]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    host: str
    local_addr: str
    headers: dict[str, str]
    n: int


@dataclass(frozen=True)
class LoggedRequest:
    """One request head as the server received it."""

    at: float          # time.time()
    method: str
    path: str          # with the query string
    host: str          # Host header hostname (without the port)
    local_addr: str    # the local address it arrived on


@dataclass
class Stats:
    """Counters of one local address (or all of them)."""

    requests: collections.Counter = field(default_factory=collections.Counter)
    bytes_sent: int = 0
    active: int = 0
    max_active: int = 0
    connections: int = 0
    max_connections: int = 0
    first_request_at: float | None = None  # time.time() of the first / last request head received
    last_request_at: float | None = None
    concurrency_seen: collections.Counter = field(default_factory=collections.Counter)  # active at arrival -> n

    @property
    def requests_total(self) -> int:
        return sum(self.requests.values())

    def copy(self) -> "Stats":
        return dataclasses.replace(self, requests=collections.Counter(self.requests),
                                   concurrency_seen=collections.Counter(self.concurrency_seen))


RoutesT = Union[Mapping[str, Route], Callable[[Request], Union[Route, None]]]


def loopback_hosts(n: int, first: int = 2) -> list[str]:
    """``n`` distinct loopback addresses: 127.0.0.<first>, ... (continuing into 127.0.1.x)."""
    out, a, b = [], 0, first
    while len(out) < n:
        if b > 254:
            a, b = a + 1, 1
        out.append(f"127.0.{a}.{b}")
        b += 1
    return out


class _Core:
    """The asyncio server; lives on one event loop (in a thread of this or another process)."""

    def __init__(self, routes: RoutesT, hosts: Sequence[str], port: int, sndbuf: int | None,
                 log_size: int = 100_000):
        self.routes = routes
        self.hosts = list(hosts)
        self.port = port
        self.sndbuf = sndbuf
        self.stats: dict[str, Stats] = {h: Stats() for h in self.hosts}
        self.log: collections.deque = collections.deque(maxlen=log_size)
        self.seen: collections.Counter = collections.Counter()  # (host, path) -> n, for fail_first
        self.servers: list[asyncio.base_events.Server] = []
        self.lock = threading.Lock()

    async def start(self) -> int:
        for attempt in range(50):
            try:
                port = self.port
                servers = []
                for h in self.hosts:
                    srv = await asyncio.start_server(self._handle, h, port, reuse_address=True, backlog=1024,
                                                     limit=1 << 16)
                    servers.append(srv)
                    if port == 0:
                        port = srv.sockets[0].getsockname()[1]
                self.servers, self.port = servers, port
                return port
            except OSError:
                for s in servers:
                    s.close()
                if self.port != 0 or attempt == 49:
                    raise
        raise RuntimeError("unreachable")

    async def stop(self) -> None:
        for s in self.servers:
            s.close()
        for s in self.servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 1.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - shutting down
                pass

    def snapshot(self, host: str | None) -> Stats:
        with self.lock:
            if host is not None:
                return self.stats[host].copy()
            total = Stats()
            for s in self.stats.values():
                total.requests.update(s.requests)
                total.concurrency_seen.update(s.concurrency_seen)
                total.bytes_sent += s.bytes_sent
                total.active += s.active
                total.connections += s.connections
                total.max_active = max(total.max_active, s.max_active)
                total.max_connections = max(total.max_connections, s.max_connections)
                for attr, pick in (("first_request_at", min), ("last_request_at", max)):
                    vals = [v for v in (getattr(total, attr), getattr(s, attr)) if v is not None]
                    setattr(total, attr, pick(vals) if vals else None)
            if len(self.stats) > 1:  # whole-server maxima are not the max of per-host maxima
                total.max_active = self._max_active_all
                total.max_connections = self._max_conn_all
            return total

    _max_active_all = 0
    _max_conn_all = 0

    def request_log(self, host: str | None) -> list[LoggedRequest]:
        with self.lock:
            return [r for r in self.log if host is None or r.local_addr == host]

    def reset(self) -> None:
        with self.lock:
            for h in self.stats:
                s = self.stats[h]
                self.stats[h] = Stats(active=s.active, max_active=s.active, connections=s.connections,
                                      max_connections=s.connections)
            self._max_active_all = sum(s.active for s in self.stats.values())
            self._max_conn_all = sum(s.connections for s in self.stats.values())
            self.seen.clear()
            self.log.clear()

    def _bump(self, st: Stats, what: str, delta: int) -> None:
        with self.lock:
            if what == "active":
                st.active += delta
                st.max_active = max(st.max_active, st.active)
                if delta > 0:
                    st.concurrency_seen[st.active] += 1
                cur = sum(s.active for s in self.stats.values())
                self._max_active_all = max(self._max_active_all, cur)
            else:
                st.connections += delta
                st.max_connections = max(st.max_connections, st.connections)
                cur = sum(s.connections for s in self.stats.values())
                self._max_conn_all = max(self._max_conn_all, cur)

    def _lookup(self, req: Request) -> Route | None:
        if callable(self.routes):
            return self.routes(req)
        bare = req.path.split("?", 1)[0]
        for key in (req.host + req.path, req.local_addr + req.path, req.path,
                    req.host + bare, req.local_addr + bare, bare):
            if key in self.routes:
                return self.routes[key]
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        local = writer.get_extra_info("sockname")[0]
        st = self.stats[local]
        if self.sndbuf and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        self._bump(st, "conn", +1)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, target, version = lines[0].split(" ", 2)
                except ValueError:
                    return
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                if int(headers.get("content-length", "0") or 0):
                    await reader.readexactly(int(headers["content-length"]))
                path = urlsplit(target).path + ("?" + urlsplit(target).query if urlsplit(target).query else "") \
                    if target.startswith("http") else target
                host = headers.get("host", local).rsplit(":", 1)[0] if not headers.get("host", "").startswith("[") \
                    else headers["host"].split("]")[0] + "]"
                with self.lock:
                    n = self.seen[(local, path)]
                    self.seen[(local, path)] += 1
                    st.requests[path] += 1
                    st.last_request_at = time.time()
                    if st.first_request_at is None:
                        st.first_request_at = st.last_request_at
                    self.log.append(LoggedRequest(st.last_request_at, method, path, host, local))
                req = Request(method, path, host, local, headers, n)
                self._bump(st, "active", +1)
                try:
                    keep = await self._respond(req, writer, st, version, headers)
                finally:
                    self._bump(st, "active", -1)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            self._bump(st, "conn", -1)
            if not writer.transport.is_closing():
                writer.close()

    async def _send(self, writer: asyncio.StreamWriter, st: Stats, data: bytes) -> None:
        if writer.transport.is_closing():
            raise ConnectionResetError("peer closed")
        writer.written = getattr(writer, "written", 0) + len(data)
        writer.write(data)
        try:
            await writer.drain()
        finally:
            self._account(writer, st)

    def _account(self, writer: asyncio.StreamWriter, st: Stats) -> None:
        """Add the bytes that left asyncio's buffer for the kernel since the last call."""
        sent = getattr(writer, "written", 0) - writer.transport.get_write_buffer_size()
        with self.lock:
            st.bytes_sent += max(0, sent - getattr(writer, "accounted", 0))
        writer.accounted = max(sent, getattr(writer, "accounted", 0))

    async def _flush(self, writer: asyncio.StreamWriter, st: Stats) -> None:
        for _ in range(400):  # wait (up to ~2 s) for the tail of a response to reach the kernel
            if writer.transport.is_closing() or not writer.transport.get_write_buffer_size():
                break
            await asyncio.sleep(0.005)
        self._account(writer, st)

    async def _respond(self, req: Request, writer, st: Stats, version: str, req_headers: dict) -> bool:
        route = self._lookup(req)
        if route is None:
            route = Route(b"not found", status=404, content_type="text/plain")
        if route.delay_s:
            await asyncio.sleep(route.delay_s)
        if route.reset:
            _reset(writer)
            return False
        status = route.status or (302 if route.redirect_to else 200)
        body = route.body
        ctype = route.content_type
        if req.n < route.fail_first:
            status, body, ctype = route.fail_status, b"temporarily failing", "text/plain"
        keep = (route.content_length and route.truncate_to is None
                and req_headers.get("connection", "").lower() != "close" and version == "HTTP/1.1")
        head = [f"HTTP/1.1 {status} {_REASON_PHRASES.get(status, 'Status')}", f"Content-Type: {ctype}",
                "Server: clip-curate-testing"]
        if route.content_length:
            head.append(f"Content-Length: {len(body) if req.method != 'HEAD' else 0}")
        if route.redirect_to and req.n >= route.fail_first:
            head.append(f"Location: {route.redirect_to}")
        head += [f"{k}: {v}" for k, v in route.header_items()]
        head.append("Connection: keep-alive" if keep else "Connection: close")
        await self._send(writer, st, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if req.method == "HEAD":
            return keep
        data = body if route.truncate_to is None else body[: route.truncate_to]
        if route.drip_bytes_per_s:
            step = max(1, int(route.drip_bytes_per_s / 20))
            for i in range(0, len(data), step):
                await self._send(writer, st, data[i:i + step])
                await asyncio.sleep(step / route.drip_bytes_per_s)
        else:
            step = 1 << 16
            for i in range(0, len(data), step):
                await self._send(writer, st, data[i:i + step])
        await self._flush(writer, st)
        if route.truncate_to is not None:  # close cleanly (FIN) mid-body: the client sees a short read
            writer.close()
            return False
        return keep


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Thread:
    """Runs a _Core on an event loop in a daemon thread."""

    def __init__(self, core: _Core):
        self.core = core
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="webserver", daemon=True)

    def start(self) -> int:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self.core.start(), self.loop).result(30)

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.core.stop(), self.loop).result(5)
        finally:
            async def _cancel_all():
                for t in asyncio.all_tasks():
                    if t is not asyncio.current_task():
                        t.cancel()
            try:
                asyncio.run_coroutine_threadsafe(_cancel_all(), self.loop).result(5)
            except Exception:  # noqa: BLE001 - shutting down
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            if not self.thread.is_alive():
                self.loop.close()


def _child_main(routes, hosts, port, sndbuf, log_size, conn) -> None:
    runner = _Thread(_Core(routes, hosts, port, sndbuf, log_size))
    try:
        conn.send(("port", runner.start()))
    except BaseException as exc:  # noqa: BLE001 - report to the parent
        conn.send(("error", repr(exc)))
        return
    while True:
        try:
            cmd, arg = conn.recv()
        except EOFError:
            break
        if cmd == "stats":
            conn.send(runner.core.snapshot(arg))
        elif cmd == "log":
            conn.send(runner.core.request_log(arg))
        elif cmd == "reset":
            runner.core.reset()
            conn.send(True)
        elif cmd == "stop":
            break
    runner.stop()
    try:
        conn.send(True)
    except (BrokenPipeError, OSError):
        pass


class WebServer:
    """A local HTTP server on one port of one or more loopback addresses (a context manager).

    ``process=True`` runs it in a separate (spawned) process so that a benchmark's client does not
    share the GIL with it; ``routes`` must then be picklable (a dict of Routes or a module-level
    function). ``log_size``: request heads kept for :meth:`request_log`.
    """

    def __init__(self, routes: RoutesT, host: str = "127.0.0.1", port: int = 0, *,
                 hosts: Sequence[str] | None = None, process: bool = False, sndbuf: int | None = None,
                 log_size: int = 100_000):
        self.hosts = list(hosts) if hosts else [host]
        self._routes, self._port, self._process, self._sndbuf = routes, port, process, sndbuf
        self._log_size = log_size
        self.port: int | None = None
        self._runner: _Thread | None = None
        self._proc = None
        self._conn = None
        self._lock = threading.Lock()

    def start(self) -> "WebServer":
        if self._process:
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            self._proc = ctx.Process(target=_child_main, daemon=True,
                                     args=(self._routes, self.hosts, self._port, self._sndbuf, self._log_size,
                                           child))
            self._proc.start()
            if not parent.poll(60):
                self._proc.kill()
                raise RuntimeError("web server process did not start")
            kind, value = parent.recv()
            if kind != "port":
                raise OSError(f"web server process failed: {value}")
            self._conn, self.port = parent, value
        else:
            self._runner = _Thread(_Core(self._routes, self.hosts, self._port, self._sndbuf, self._log_size))
            self.port = self._runner.start()
        return self

    def stop(self) -> None:
        if self._proc is not None:
            try:
                self._conn.send(("stop", None))
                self._conn.poll(5) and self._conn.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
            self._proc = None
        if self._runner is not None:
            self._runner.stop()
            self._runner = None

    def __enter__(self) -> "WebServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.hosts[0]}:{self.port}"

    def url(self, path: str = "/", host: str | None = None) -> str:
        """Absolute URL of ``path`` on ``host`` (default: the first address)."""
        if not path.startswith("/"):
            path = "/" + path
        return f"http://{host or self.hosts[0]}:{self.port}{path}"

    def stats(self, host: str | None = None) -> Stats:
        """Counters of one local address, or of the whole server (``host=None``)."""
        if self._proc is not None:
            with self._lock:
                self._conn.send(("stats", host))
                return self._conn.recv()
        return self._runner.core.snapshot(host)

    def request_log(self, host: str | None = None) -> list[LoggedRequest]:
        """Request heads received (on local address ``host``), oldest first."""
        if self._proc is not None:
            with self._lock:
                self._conn.send(("log", host))
                return self._conn.recv()
        return self._runner.core.request_log(host)

    def reset_stats(self) -> None:
        if self._proc is not None:
            with self._lock:
                self._conn.send(("reset", None))
                self._conn.recv()
        else:
            self._runner.core.reset()

    def requests(self, path: str | None = None, host: str | None = None) -> int:
        """How many requests the server saw (for ``path``, on ``host``)."""
        s = self.stats(host)
        return s.requests_total if path is None else s.requests[path]


# ---------------------------------------------------------------------------------------------
# Ready-made bodies and the standard fault web


def tiny_jpeg(width: int = 64, height: int = 48, seed: int = 0, quality: int = 85) -> bytes:
    """A small real JPEG (a colour gradient with noise), deterministic in ``seed``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     np.full_like(x, (seed * 37) % 256)], axis=-1)
    img = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode(body: bytes, coding: str) -> bytes:
    """``body`` as ``coding``: ``gzip``, ``deflate`` (zlib-wrapped, RFC 9110) or ``deflate-raw`` (a bare
    deflate stream, which some servers label ``deflate``)."""
    wbits = {"gzip": 31, "deflate": 15, "deflate-raw": -15}[coding]
    co = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return co.compress(body) + co.flush()


@functools.lru_cache(maxsize=4)
def gzip_bomb(size: int, prefix: bytes = b"") -> bytes:
    """One gzip member that inflates to ``prefix`` + ``size`` zero bytes (300 MB -> about 300 KB), built
    from one repeated 1 MiB deflate block, so making it never holds ``size`` bytes. A ``prefix`` such as
    ``b"\\xff\\xd8\\xff"`` makes it look like a JPEG to a client that sniffs the first bytes."""
    unit = 1 << 20
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = co.compress(prefix) + co.flush(zlib.Z_FULL_FLUSH) if prefix else b""
    block = co.compress(bytes(unit)) + co.flush(zlib.Z_FULL_FLUSH)  # a full flush resets the history: repeatable
    n, rest = divmod(size, unit)
    tail = co.compress(bytes(rest)) + co.flush()
    crc = zlib.crc32(prefix)
    zeros = bytes(unit)
    for _ in range(n):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(bytes(rest), crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + head + block * n + tail + struct.pack("<II", crc & 0xFFFFFFFF, (len(prefix) + size) & 0xFFFFFFFF)


def fault_routes(image: bytes | None = None, *, big_bytes: int = 2_000_000, slow_s: float = 10.0,
                 drip_bytes_per_s: float = 2000.0, private_url: str = "http://127.0.0.1:9/x.jpg",
                 other_host_url: str | None = None, bomb_bytes: int = 30_000_000) -> dict[str, Route]:
    """The standard fault web (path -> Route) used by the download tests and the demo.

    ``/ok.jpg`` a real JPEG; ``/404``; ``/500-then-ok.jpg`` (two 500s, then the image); ``/500``
    forever; ``/drip.jpg`` (``drip_bytes_per_s``, outlives a short deadline); ``/reset``;
    ``/truncated-transfer.jpg`` (connection dropped mid-body); ``/truncated.jpg`` (a cut JPEG file, a
    complete transfer); ``/random.jpg`` (random bytes as image/jpeg); ``/html-as-image`` (HTML as
    image/jpeg); ``/loop-a`` <-> ``/loop-b``; ``/redirect-private`` (to ``private_url``);
    ``/redirect-ok`` (to /ok.jpg); ``/redirect-other-host`` (to ``other_host_url``); ``/big.jpg``
    (``big_bytes`` JPEG-looking bytes); ``/big-unsized.jpg`` (same, no Content-Length);
    ``/noai.jpg``, ``/noimageai.jpg``, ``/noindex.jpg``, ``/none.jpg``, ``/otherbot-noai.jpg``,
    ``/clip-curate-noai.jpg`` (X-Robots-Tag variants); ``/slow.jpg`` (answers after ``slow_s``);
    ``/gzip.jpg``, ``/deflate.jpg``, ``/deflate-raw.jpg`` (the image with ``Content-Encoding: gzip`` /
    ``deflate``); ``/br.jpg`` (labelled ``br``, a coding the downloader does not decode);
    ``/corrupt-gzip.jpg`` (a gzip stream cut short); ``/gzip-bomb.jpg`` (``gzip_bomb(bomb_bytes)`` behind
    the JPEG magic number, so only a size cap on the decoded bytes stops it);
    ``/robots.txt`` is left to the caller.
    """
    import os

    img = image if image is not None else tiny_jpeg()
    jpeg = "image/jpeg"
    big = img[:3] + bytes(big_bytes - 3)
    rng_bytes = os.urandom(2048)
    while rng_bytes[:2] == b"\xff\xd8":
        rng_bytes = os.urandom(2048)
    routes = {
        "/ok.jpg": Route(img, content_type=jpeg),
        "/404": Route(b"missing", status=404, content_type="text/plain"),
        "/410": Route(b"gone", status=410, content_type="text/plain"),
        "/500-then-ok.jpg": Route(img, content_type=jpeg, fail_first=2),
        "/500": Route(b"broken", status=500, content_type="text/plain"),
        "/503": Route(b"busy", status=503, content_type="text/plain"),
        "/drip.jpg": Route(img + bytes(20_000), content_type=jpeg, drip_bytes_per_s=drip_bytes_per_s),
        "/reset": Route(reset=True),
        "/truncated-transfer.jpg": Route(img, content_type=jpeg, truncate_to=len(img) // 2),
        "/truncated.jpg": Route(img[: len(img) // 2], content_type=jpeg),
        "/random.jpg": Route(rng_bytes, content_type=jpeg),
        "/html-as-image": Route(b"<!doctype html><html><body>login</body></html>", content_type=jpeg),
        "/html": Route(b"<!doctype html><html><body>page</body></html>", content_type="text/html"),
        "/loop-a": Route(redirect_to="/loop-b"),
        "/loop-b": Route(redirect_to="/loop-a"),
        "/redirect-ok": Route(redirect_to="/ok.jpg"),
        "/redirect-private": Route(redirect_to=private_url),
        "/big.jpg": Route(big, content_type=jpeg),
        "/big-unsized.jpg": Route(big, content_type=jpeg, content_length=False),
        "/noai.jpg": Route(img, content_type=jpeg, headers={"X-Robots-Tag": "noai"}),
        "/noimageai.jpg": Route(img, content_type=jpeg, headers={"X-Robots-Tag": "noimageai, nofollow"}),
        "/noindex.jpg": Route(img, content_type=jpeg, headers={"X-Robots-Tag": "noindex"}),
        "/none.jpg": Route(img, content_type=jpeg, headers={"X-Robots-Tag": "none"}),
        "/otherbot-noai.jpg": Route(img, content_type=jpeg, headers={"X-Robots-Tag": "otherbot: noai"}),
        "/clip-curate-noai.jpg": Route(img, content_type=jpeg, headers={"X-Robots-Tag": "clip-curate: noai"}),
        "/slow.jpg": Route(img, content_type=jpeg, delay_s=slow_s),
        "/gzip.jpg": Route(encode(img, "gzip"), content_type=jpeg, headers={"Content-Encoding": "gzip"}),
        "/deflate.jpg": Route(encode(img, "deflate"), content_type=jpeg, headers={"Content-Encoding": "deflate"}),
        "/deflate-raw.jpg": Route(encode(img, "deflate-raw"), content_type=jpeg,
                                  headers={"Content-Encoding": "deflate"}),
        "/br.jpg": Route(b"\x0b\x02\x80" + img, content_type=jpeg, headers={"Content-Encoding": "br"}),
        "/corrupt-gzip.jpg": Route(encode(img, "gzip")[:-40], content_type=jpeg, headers={"Content-Encoding": "gzip"}),
        "/gzip-bomb.jpg": Route(gzip_bomb(bomb_bytes, img[:3]), content_type=jpeg,
                                headers={"Content-Encoding": "gzip"}),
    }
    for i in range(30):  # a redirect chain longer than any sane --max-redirects
        routes[f"/chain{i}"] = Route(redirect_to=f"/chain{i + 1}")
    routes["/chain30"] = Route(redirect_to="/ok.jpg")
    if other_host_url:
        routes["/redirect-other-host"] = Route(redirect_to=other_host_url)
    return routes
