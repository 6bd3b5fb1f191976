"""Download stage: many URLs at once inside each worker, politely and safely.

    rows ─► [Reshuffle (spread hosts over workers)] ─► _DownloadFn ─► kept rows (+ ``image_bytes``)
                                                                  └─► rejected rows (stage ``download``)

In a pipeline the rows come reshuffled from the reader, so the registered stage adds no Reshuffle of its own
(``Download(cfg)`` alone does).

Inside a worker, ``_DownloadFn.setup()`` starts an asyncio loop on a background thread with one
aiohttp session. ``process()`` hands each row to that loop and yields rows that have finished, keeping
up to ``--threads`` requests in flight (and a few times more rows queued so that rows for a busy host
wait without idling the slots of other hosts); ``finish_bundle()`` drains the rest.

Per URL: scheme check → DNS through the worker's caching resolver (``--resolve`` overrides, positive
and negative cache) → SSRF guard on every resolved address (the connection goes only to checked
addresses, on every redirect hop) → robots.txt of the origin (fetched once per worker, cached, ``protego``)
→ per-origin connection and requests/s limits → GET with connect/read timeouts inside a total per-URL
deadline → ``X-Robots-Tag`` opt-out read from the headers (the connection is closed before the body) →
status → body streamed (``Content-Encoding`` gzip/deflate undone on the fly) until ``--max-bytes``
received or decoded bytes → magic-number check of the decoded bytes. 5xx, 429, timeouts and connection
errors are retried with exponential backoff; an origin whose requests keep timing out or failing to connect
is cut off (circuit breaker) and its remaining rows are rejected ``host_unavailable``.

Robots.txt, politeness and the breaker are keyed by origin, ``scheme://host:port`` (RFC 9309 scopes a
robots.txt to the origin that serves it): two servers on one host name but different ports or schemes
are two sites. DNS results are per host name; slow-host metrics and logs name hosts.

The pure functions (:func:`check_url`, :func:`address_block_reason`, :func:`x_robots_opt_out`,
:func:`status_reason`, :func:`sniff_image`, :func:`parse_resolve`, :func:`content_codings`) and
:class:`BodyDecoder` carry the rules and are tested alone.
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import queue
import random
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import aiohttp
import apache_beam as beam
from aiohttp.abc import AbstractResolver
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from clip_curate import records
from clip_curate.fields import ConfigError, opt
from clip_curate.stages.base import RAW_IMAGE, Stage, register

log = logging.getLogger(__name__)

STAGE = "download"
DEFAULT_USER_AGENT = "clip-curate/0.1 (+https://github.com/clip-curate/clip-curate)"
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "none"})
# X-Robots-Tag directives that take a value after a colon (so "name: value" is not an agent scope).
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SLOW_HOST_LOG = 5            # hosts listed by the teardown log
SLOW_HOST_MSECS = 2000.0      # hosts slower than this on average get a per-host distribution metric
_MAX_SLOW_HOST_METRICS = 20   # per worker, to keep metric names bounded
_MAX_ORIGINS = 50_000         # per-origin state kept per worker (idle origins are forgotten beyond this)


@dataclass(frozen=True)
class DownloadConfig:
    """Network behaviour of the download stage (flags ``--timeout``, ``--retries`` ...)."""

    timeout: float = opt(10.0, "per-request connect and read timeout, seconds")
    deadline: float = opt(30.0, "total time per URL including retries and redirects, seconds")
    retries: int = opt(2, "retries after a 5xx, 429, timeout or connection error (with exponential backoff)")
    retry_backoff: float = opt(1.0, "first retry waits about this long (seconds, doubling, jittered)")
    user_agent: str = opt(DEFAULT_USER_AGENT, "User-Agent header; its first token is matched against "
                                              "robots.txt groups and agent-scoped X-Robots-Tag values")
    max_bytes: int = opt(20_000_000, "largest body, counted as received and after undoing Content-Encoding "
                                     "gzip/deflate; longer bodies are rejected too_large without being read "
                                     "or inflated further")
    max_redirects: int = opt(5, "redirects followed per URL")
    threads: int = opt(64, "concurrent downloads per worker process")
    respect_robots: bool = opt(True, "honour X-Robots-Tag noai/noimageai/noindex/none (also agent-scoped "
                                     "forms), read from the headers before the body")
    respect_robots_txt: bool = opt(True, "fetch each origin's (scheme://host:port) robots.txt once per worker and "
                                         "skip disallowed URLs")
    robots_timeout: float = opt(5.0, "timeout for fetching a robots.txt, seconds")
    per_host_connections: int = opt(4, "concurrent requests per origin (scheme://host:port) per worker")
    per_host_rps: float = opt(10.0, "requests per second per origin (scheme://host:port) per worker "
                                    "(0 = unlimited); a robots.txt Crawl-delay lowers it")
    resolve: tuple[str, ...] = opt((), "HOST:IP resolver override, like curl's --resolve", parse="append")
    allow_private_addresses: bool = opt(False, "allow loopback/private/link-local/reserved targets "
                                               "(local mirrors, tests)")
    allow_networks: tuple[str, ...] = opt((), "CIDR ranges allowed even when private, e.g. a local mirror "
                                              "10.1.2.0/24 (narrower than --allow-private-addresses)")
    dns_cache_size: int = opt(100_000, "host names kept in each worker's DNS cache")
    dns_timeout: float = opt(5.0, "DNS resolution timeout, seconds")
    host_failure_limit: int = opt(5, "consecutive timeouts/connection errors after which an origin's "
                                     "(scheme://host:port) remaining rows are rejected host_unavailable "
                                     "(0 = never)")

    def __post_init__(self):
        for name in ("timeout", "deadline", "dns_timeout", "robots_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be > 0 seconds, got {getattr(self, name)}")
        for name, low in (("retries", 0), ("max_redirects", 0), ("threads", 1), ("per_host_connections", 1),
                          ("dns_cache_size", 1), ("host_failure_limit", 0), ("max_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"--{name.replace('_', '-')}: must be an integer >= {low}, got {value!r}")
        if self.retry_backoff < 0:
            raise ConfigError(f"--retry-backoff: must be >= 0, got {self.retry_backoff}")
        if self.per_host_rps < 0:
            raise ConfigError(f"--per-host-rps: must be >= 0 (0 = unlimited), got {self.per_host_rps}")
        if not self.user_agent.strip():
            raise ConfigError("--user-agent: must not be empty; e.g. 'mybot/1.0 (+https://example.org/bot)'")
        parse_resolve(self.resolve)
        for net in self.allow_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"--allow-networks: {net!r} is not a CIDR range (e.g. 10.1.2.0/24)") from None

    @property
    def agent_token(self) -> str:
        """Product token of the user agent (``clip-curate``), lower case."""
        return agent_token(self.user_agent)


# ---------------------------------------------------------------------------------------------
# Pure core


def agent_token(user_agent: str) -> str:
    return user_agent.strip().split()[0].split("/")[0].lower()


def parse_resolve(entries: Iterable[str]) -> dict[str, str]:
    """``("a.test:127.0.0.2", "b.test:[::1]")`` -> ``{"a.test": "127.0.0.2", "b.test": "::1"}``."""
    out: dict[str, str] = {}
    for entry in entries:
        host, sep, ip = str(entry).partition(":")
        ip = ip.strip().strip("[]")
        # curl's HOST:PORT:IP form is accepted too (the port is ignored: overrides apply to every port).
        if ip.count(":") == 1 and ip.split(":")[0].isdigit():
            ip = ip.split(":", 1)[1].strip("[]")
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f"--resolve: expected HOST:IP (e.g. images.test:127.0.0.2), got {entry!r}") from None
        if not sep or not host.strip():
            raise ConfigError(f"--resolve: expected HOST:IP (e.g. images.test:127.0.0.2), got {entry!r}")
        out[host.strip().lower().rstrip(".")] = ip
    return out


@dataclass(frozen=True)
class UrlCheck:
    ok: bool
    reason: str = ""
    detail: str = ""
    scheme: str = ""
    host: str = ""
    port: int = 0

    @property
    def origin(self) -> str:
        """``scheme://host[:port]`` (RFC 6454 serialisation: the default port is left out), the key of
        robots.txt, politeness and the circuit breaker (RFC 9309: robots.txt applies per origin)."""
        return origin_of(self.scheme, self.host, self.port)


def origin_of(scheme: str, host: str, port: int = 0) -> str:
    """``origin_of("http", "127.0.0.1", 8080) == "http://127.0.0.1:8080"``; default ports are dropped and
    IPv6 literals bracketed, so every spelling of one origin gives one key."""
    default = 443 if scheme == "https" else 80
    netloc = f"[{host}]" if ":" in host else host
    return f"{scheme}://{netloc}" if port in (0, default) else f"{scheme}://{netloc}:{port}"


def check_url(url: Any) -> UrlCheck:
    """Scheme and syntax check: only absolute http(s) URLs with a host pass."""
    import yarl

    if not isinstance(url, str) or not url.strip():
        return UrlCheck(False, "invalid_url", f"not a URL: {url!r}")
    try:
        u = yarl.URL(url.strip())
        scheme = (u.scheme or "").lower()
        host = u.host
        port = u.port
    except (ValueError, TypeError) as exc:
        return UrlCheck(False, "invalid_url", f"{exc}: {url!r}")
    if scheme not in ("http", "https"):
        if not scheme:
            return UrlCheck(False, "invalid_url", f"not an absolute URL: {url!r}")
        return UrlCheck(False, "blocked_scheme", f"scheme {scheme!r} is not http/https")
    if not host:
        return UrlCheck(False, "invalid_url", f"no host in {url!r}")
    return UrlCheck(True, scheme=scheme, host=host.lower().rstrip("."), port=port or 0)


def address_block_reason(address: str) -> str | None:
    """Why an IP address must not be contacted (``"loopback"``, ``"private"`` ...), or None if public.

    Covers IPv4 and IPv6, including IPv4-mapped (``::ffff:10.0.0.1``), NAT64, 6to4 and Teredo forms
    that embed an IPv4 address.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    embedded = None  # an IPv6 form that carries an IPv4 address is judged by that address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            embedded = ip.ipv4_mapped
        elif ip in ipaddress.ip_network("64:ff9b::/96") or ip in ipaddress.ip_network("64:ff9b:1::/48"):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour is not None:
            embedded = ip.sixtofour
        elif ip.teredo is not None:
            embedded = ip.teredo[1]
        elif int(ip) >> 32 == 0 and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    target = embedded if embedded is not None else ip
    for label, hit in (("unspecified", target.is_unspecified), ("loopback", target.is_loopback),
                       ("link-local", target.is_link_local), ("multicast", target.is_multicast),
                       ("reserved", target.is_reserved), ("private", target.is_private),
                       ("site-local", getattr(target, "is_site_local", False))):
        if hit:
            return label
    if not target.is_global:
        return "non-global"
    return None


def x_robots_opt_out(values: Iterable[str], token: str, directives: frozenset = OPT_OUT_DIRECTIVES) -> str | None:
    """The opting-out directive in ``X-Robots-Tag`` header values that applies to agent ``token``, or None.

    ``"noai"`` and ``"noindex, nofollow"`` apply to every agent; ``"otherbot: noai"`` only to
    ``otherbot`` and ``"clip-curate: noimageai"`` only to us. A scope lasts until the end of the header
    value or the next ``agent:`` prefix; ``unavailable_after: ...`` and ``max-*: n`` are not scopes.
    """
    token = token.lower()
    for value in values:
        agent = None
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            name, colon, rest = part.partition(":")
            name = name.strip().lower()
            if colon and name not in _VALUED_DIRECTIVES:
                agent, directive = name, rest.strip().lower()
            else:
                directive = part.lower()
            if directive in directives and (agent is None or agent == token):
                return directive if agent is None else f"{agent}: {directive}"
    return None


def status_reason(status: int) -> str | None:
    """Rejection reason for a final HTTP status (None for 2xx)."""
    if 200 <= status < 300:
        return None
    if status == 404:
        return "http_404"
    if status == 429:
        return "http_429"
    if status >= 500:
        return "http_5xx"
    return "http_4xx"


def sniff_image(head: bytes) -> str | None:
    """Image format from the first bytes of a body (None: not an image we can decode)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        return "heif"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ico"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jpeg2000"
    return None


DECODED_ENCODINGS = ("gzip", "deflate")  # Content-Encoding values undone (x-gzip is gzip, identity is nothing)
_MAX_CODINGS = 3                          # more stacked codings than this are refused
ROBOTS_MAX_BYTES = 500_000                # robots.txt bytes parsed (decoded); the rest is ignored
_PIECE = 1 << 20                          # decoded bytes made per zlib call (bounds the copies capping makes)


class EncodingError(ValueError):
    """A body whose ``Content-Encoding`` cannot be undone (unsupported coding, corrupt or cut stream)."""


def content_codings(values: Iterable[str]) -> list[str]:
    """``Content-Encoding`` header values -> codings in the order they were applied, lower case, without
    ``identity`` (``["gzip, identity"]`` -> ``["gzip"]``; ``x-gzip`` is ``gzip``)."""
    out = []
    for value in values:
        for token in str(value).split(","):
            token = token.strip().lower()
            if token and token != "identity":
                out.append("gzip" if token == "x-gzip" else token)
    return out


class _ZlibLayer:
    """One gzip or deflate layer, streaming; every call returns at most ``room`` bytes, in pieces of at
    most :data:`_PIECE` bytes (so that capping never needs a copy of a large buffer)."""

    def __init__(self, coding: str):
        self.coding = coding
        self.head = b""      # deflate: the first bytes, until they say zlib-wrapped or raw (as servers send both)
        self.d = zlib.decompressobj(31) if coding == "gzip" else None
        self.fed = 0

    def _start(self, data: bytes) -> bytes:
        self.head += data
        if len(self.head) < 2:
            return b""
        b0, b1 = self.head[0], self.head[1]
        wrapped = b0 & 0x0F == 8 and (b0 << 8 | b1) % 31 == 0  # RFC 1950 header
        self.d = zlib.decompressobj(15 if wrapped else -15)
        data, self.head = self.head, b""
        return data

    def decode(self, data: bytes, room: int) -> tuple[list[bytes], bytes]:
        """(output pieces, at most ``room`` bytes in all; input not consumed because ``room`` ran out)."""
        self.fed += len(data)
        if self.d is None:
            data = self._start(data)
            if self.d is None:
                return [], b""
        out = []
        try:
            while data and room > 0:
                if self.d.eof:  # gzip allows several members one after another; anything else is trailing junk
                    if self.coding != "gzip" or not data.startswith(b"\x1f\x8b"):
                        return out, b""
                    self.d = zlib.decompressobj(31)
                piece = self.d.decompress(data, min(room, _PIECE))
                if piece:
                    out.append(piece)
                room -= len(piece)
                data = self.d.unconsumed_tail or (self.d.unused_data if self.d.eof else b"")
        except zlib.error as exc:
            raise EncodingError(f"Content-Encoding {self.coding}: corrupt stream ({exc})") from None
        return out, data

    def finish(self, room: int) -> bytes:
        if not self.fed:
            raise EncodingError(f"Content-Encoding {self.coding}: empty stream")
        if self.d is None:
            raise EncodingError(f"Content-Encoding {self.coding}: stream ends after {len(self.head)} byte")
        try:
            out = self.d.flush(max(room, 1))
        except zlib.error as exc:
            raise EncodingError(f"Content-Encoding {self.coding}: corrupt stream ({exc})") from None
        if not self.d.eof:
            raise EncodingError(f"Content-Encoding {self.coding}: stream ends early")
        return out


class BodyDecoder:
    """Undo a body's ``Content-Encoding`` (gzip, deflate, stacked) while it streams, never producing more
    than ``limit`` + 1 bytes at any layer: a decompression bomb is never inflated past the cap.

    ``feed(chunk)`` returns the decoded pieces that ``chunk`` completes; once the decoded body (or a stacked
    layer's output) would pass ``limit``, ``over`` is set and what comes out stops at ``limit`` bytes in all.
    ``finish()`` returns the last pieces and checks that every stream ended. Raises :class:`EncodingError`
    for a coding not in :data:`DECODED_ENCODINGS` (at construction) and for corrupt or cut streams.
    """

    def __init__(self, codings: list[str], limit: int):
        unknown = [c for c in codings if c not in DECODED_ENCODINGS]
        if unknown:
            raise EncodingError(f"Content-Encoding {', '.join(codings)}: {unknown[0]} is not decoded "
                                f"(decoded: {', '.join(DECODED_ENCODINGS)})")
        if len(codings) > _MAX_CODINGS:
            raise EncodingError(f"Content-Encoding {', '.join(codings)}: more than {_MAX_CODINGS} codings")
        self.codings = list(codings)
        self.limit = limit
        self.layers = [_ZlibLayer(c) for c in reversed(codings)]  # the last coding applied is undone first
        self.made = [0] * len(self.layers)                         # bytes each layer produced so far
        self.decoded = 0                                           # bytes returned so far
        self.over = False

    def feed(self, chunk: bytes) -> list[bytes]:
        return self._run([chunk] if chunk else [], final=False)

    def finish(self) -> list[bytes]:
        return [] if self.over else self._run([], final=True)

    def _run(self, pieces: list[bytes], final: bool) -> list[bytes]:
        for i, layer in enumerate(self.layers):
            out, rest = [], b""
            for piece in pieces:
                room = self.limit + 1 - self.made[i]
                got, rest = layer.decode(piece, room) if room > 0 else ([], piece)
                out += got
                self.made[i] += sum(map(len, got))
                if rest:
                    break
            room = self.limit + 1 - self.made[i]
            if final and not self.over and not rest and room > 0:
                tail = layer.finish(room)
                self.made[i] += len(tail)
                out.append(tail)
            if rest or self.made[i] > self.limit:
                self.over = True
            pieces = out
        kept = []
        for piece in pieces:
            keep = self.limit - self.decoded
            if len(piece) > keep:
                self.over, piece = True, piece[:keep]
            if piece:
                kept.append(piece)
                self.decoded += len(piece)
        return kept


TRANSIENT_FAILURES = frozenset({"timeout", "connection_error", "http_5xx", "http_429"})
_HOST_FAILURES = frozenset({"timeout", "connection_error"})  # what the circuit breaker counts


# ---------------------------------------------------------------------------------------------
# The asyncio engine (one per worker process, built in DoFn.setup)


class _Fail(Exception):
    """A rejection decided inside a fetch: ``reason`` from records.REASONS['download']."""

    retry_after = 0.0

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class _DnsError(OSError):
    pass


class _Blocked(OSError):
    pass


class CachingResolver(AbstractResolver):
    """DNS for one worker: ``--resolve`` overrides, bounded LRU with positive and negative entries, a
    lookup timeout, and the SSRF filter (only allowed addresses are ever returned to the connector).

    Overrides are answered like lookups (and cached, so hit counts mean the same with and without
    them). Names under ``.invalid`` fail without a lookup (RFC 6761)."""

    def __init__(self, overrides: dict[str, str], cache_size: int, timeout: float, allow_private: bool,
                 allow_networks: tuple = (), positive_ttl: float = 3600.0, negative_ttl: float = 600.0):
        self.overrides = overrides
        self.allow_networks = tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)
        self.cache: collections.OrderedDict[str, tuple[float, Any]] = collections.OrderedDict()
        self.inflight: dict[str, asyncio.Future] = {}
        self.cache_size, self.timeout, self.allow_private = cache_size, timeout, allow_private
        self.positive_ttl, self.negative_ttl = positive_ttl, negative_ttl
        self.hits = self.lookups = self.failures = 0

    async def addresses(self, host: str, count: bool = True) -> list[str]:
        """All addresses of ``host`` (raises _DnsError)."""
        try:
            ipaddress.ip_address(host.strip("[]"))
            return [host.strip("[]")]
        except ValueError:
            pass
        now = time.monotonic()
        entry = self.cache.get(host)
        if entry is not None and entry[0] > now:
            self.cache.move_to_end(host)
            if count:
                self.hits += 1
            if isinstance(entry[1], Exception):
                raise _DnsError(str(entry[1]))
            return entry[1]
        if host in self.inflight:
            if count:
                self.hits += 1
            return await asyncio.shield(self.inflight[host])
        fut = asyncio.get_running_loop().create_future()
        self.inflight[host] = fut
        try:
            result = await self._lookup(host)
            self._store(host, result, self.positive_ttl)
            fut.set_result(result)
            return result
        except _DnsError as exc:
            self.failures += 1
            self._store(host, exc, self.negative_ttl)
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            del self.inflight[host]

    def _store(self, host: str, value: Any, ttl: float) -> None:
        self.cache[host] = (time.monotonic() + ttl, value)
        self.cache.move_to_end(host)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    async def _lookup(self, host: str) -> list[str]:
        self.lookups += 1
        if host in self.overrides:
            return [self.overrides[host]]
        if host == "invalid" or host.endswith(".invalid"):
            raise _DnsError(f"{host}: reserved name (RFC 6761), never resolves")
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), self.timeout)
        except asyncio.TimeoutError:
            raise _DnsError(f"{host}: no answer within {self.timeout:g} s") from None
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise _DnsError(f"{host}: {exc}") from None
        addrs = list(dict.fromkeys(info[4][0] for info in infos))
        if not addrs:
            raise _DnsError(f"{host}: no addresses")
        return addrs

    async def allowed(self, host: str, count: bool = True) -> list[str]:
        """Addresses of ``host`` that may be contacted (raises _DnsError, _Blocked)."""
        addrs = await self.addresses(host, count)
        if self.allow_private:
            return addrs
        ok = [a for a in addrs if address_block_reason(a) is None or self._listed(a)]
        if not ok:
            raise _Blocked(f"{host} -> {addrs[0]} is {address_block_reason(addrs[0])}; "
                           "use --allow-networks CIDR or --allow-private-addresses for local mirrors")
        return ok

    def _listed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        return any(ip.version == n.version and ip in n for n in self.allow_networks)

    # aiohttp AbstractResolver interface: what the connector connects to
    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        addrs = await self.allowed(host, count=False)
        return [{"hostname": host, "host": a, "port": port,
                 "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in addrs]

    async def close(self) -> None:
        pass


@dataclass
class _Origin:
    """Per-origin (scheme, host, port) robots.txt, politeness and health state (lives on the engine's loop)."""

    sem: asyncio.Semaphore
    interval: float
    next_start: float = 0.0
    consecutive_failures: int = 0
    down: str = ""
    robots: Any = None  # asyncio.Future -> (protego parser | None, problem text | None)


@dataclass
class _Result:
    row: dict
    reason: str | None = None
    detail: str = ""
    nbytes: int = 0
    msecs: float | None = None  # time in requests (all attempts and hops), not in politeness queues
    host: str = ""


class _Engine:
    """Owns the loop thread, the aiohttp session, the resolver and per-origin state of one worker."""

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self.token = cfg.agent_token
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="clip-curate-download", daemon=True)
        self.thread.start()
        self.done: queue.Queue = queue.Queue()
        self.inflight = 0
        self.deferred = 0
        self.host_msecs: dict[str, list[float]] = {}
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> None:
        cfg = self.cfg
        self.resolver = CachingResolver(parse_resolve(cfg.resolve), cfg.dns_cache_size, cfg.dns_timeout,
                                        cfg.allow_private_addresses, cfg.allow_networks)
        connector = aiohttp.TCPConnector(limit=cfg.threads * 2, limit_per_host=cfg.per_host_connections + 1,
                                         use_dns_cache=False, resolver=self.resolver, ttl_dns_cache=None)
        # auto_decompress stays off: aiohttp would inflate before --max-bytes is counted; BodyDecoder
        # undoes gzip/deflate itself and caps the decoded size while it streams.
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, trust_env=False,
            headers={"User-Agent": cfg.user_agent, "Accept": "image/avif,image/webp,image/*,*/*;q=0.8",
                     "Accept-Encoding": "identity"})
        self.slots = asyncio.Semaphore(cfg.threads)
        self.origins: dict[str, _Origin] = {}  # origin_of(...) -> state

    def close(self) -> None:
        async def _close():
            await self.session.close()
            await asyncio.sleep(0.05)
        try:
            asyncio.run_coroutine_threadsafe(_close(), self.loop).result(10)
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    # -- Beam-thread side ------------------------------------------------------------------
    def submit(self, row: dict) -> None:
        self.inflight += 1
        fut = asyncio.run_coroutine_threadsafe(self._job(row), self.loop)
        fut.add_done_callback(lambda f: self.done.put(_job_result(f, row)))

    def take(self, block_while_over: int | None) -> list[_Result]:
        """Finished results; blocks while more than ``block_while_over`` rows are in flight (None: drain)."""
        out = []
        limit = 0 if block_while_over is None else block_while_over
        while self.inflight > limit:
            out.append(self.done.get())
            self.inflight -= 1
        while True:
            try:
                out.append(self.done.get_nowait())
                self.inflight -= 1
            except queue.Empty:
                return out

    def drain(self):
        """Every row still in flight, each yielded as soon as it finishes (steady output at a bundle's end,
        so the steps after the download, and progress lines, see rows while the last ones download)."""
        while self.inflight > 0:
            res = self.done.get()
            self.inflight -= 1
            yield res

    def counters(self) -> dict[str, int]:
        r = self.resolver
        return {"dns_cache_hits": r.hits, "dns_failures": r.failures, "dns_lookups": r.lookups,
                "politeness_deferred": self.deferred}

    # -- loop side ------------------------------------------------------------------------
    def _origin(self, origin: str) -> _Origin:
        st = self.origins.get(origin)
        if st is None:
            if len(self.origins) >= _MAX_ORIGINS:
                self._evict_idle_origins()
            rps = self.cfg.per_host_rps
            st = self.origins[origin] = _Origin(asyncio.Semaphore(self.cfg.per_host_connections),
                                                1.0 / rps if rps > 0 else 0.0)
        return st

    def _evict_idle_origins(self) -> None:
        """Forget the oldest idle tenth of the origins (their robots.txt, breaker and rate state)."""
        idle = [o for o, st in self.origins.items()
                if not st.sem.locked() and (st.robots is None or st.robots.done())]
        for o in idle[: max(1, len(self.origins) // 10)]:
            del self.origins[o]

    async def _job(self, row: dict) -> _Result:
        res = _Result(row, msecs=0.0)
        try:
            res.row = dict(row)
            body = await self._fetch(row.get("url"), res)
            res.row["image_bytes"] = body
            res.nbytes = len(body)
        except _Fail as f:
            res.reason, res.detail = f.reason, f.detail
        except Exception as exc:  # noqa: BLE001 - unexpected client error: keep the row, say what it was
            res.reason, res.detail = "connection_error", f"{type(exc).__name__}: {exc}"
        return res

    async def _fetch(self, url: Any, res: _Result) -> bytes:
        cfg = self.cfg
        seen: set[str] = set()
        budget = [cfg.deadline]  # seconds of network time left (queueing for politeness slots is free)
        for hop in range(cfg.max_redirects + 2):
            chk = check_url(url)
            if not chk.ok:
                raise _Fail(chk.reason, chk.detail)
            if url in seen:
                raise _Fail("redirect_loop", f"{url} seen twice")
            seen.add(url)
            if hop > cfg.max_redirects:
                raise _Fail("too_many_redirects", f"more than {cfg.max_redirects} redirects, last {url}")
            res.host = res.host or chk.host  # metrics and logs name hosts; state is per origin
            st = self._origin(chk.origin)
            if st.down:
                raise _Fail("host_unavailable", st.down)
            await self._check_address(chk.host)
            if cfg.respect_robots_txt:
                await self._check_robots(url, chk, st)
            outcome = await self._attempts(url, chk.origin, st, budget, res)
            if isinstance(outcome, bytes):
                return outcome
            url = outcome  # redirect target
        raise _Fail("too_many_redirects", f"more than {cfg.max_redirects} redirects")

    async def _check_address(self, host: str) -> None:
        try:
            await self.resolver.allowed(host)
        except _DnsError as exc:
            raise _Fail("dns_error", str(exc)) from None
        except _Blocked as exc:
            raise _Fail("blocked_address", str(exc)) from None

    async def _slot(self, st: _Origin):
        """Acquire a host slot (respecting its requests/s), then a worker slot. Returns a releaser."""
        waited = st.sem.locked()
        await st.sem.acquire()
        now = time.monotonic()
        if st.interval:
            start = max(now, st.next_start)
            st.next_start = start + st.interval
            if start > now:
                waited = True
                await asyncio.sleep(start - now)
        if waited:
            self.deferred += 1
        await self.slots.acquire()

        def release():
            self.slots.release()
            st.sem.release()
        return release

    async def _attempts(self, url: str, origin: str, st: _Origin, budget: list, res: _Result) -> bytes | str:
        """GET with retries; returns the body, or the absolute URL of a redirect. Adds the time spent
        in requests (not in politeness queues) to ``res.msecs``."""
        cfg = self.cfg
        last = _Fail("timeout", "no attempt made")
        for attempt in range(cfg.retries + 1):
            if st.down:
                raise _Fail("host_unavailable", st.down)
            release = await self._slot(st)
            retry_after = 0.0
            try:
                if st.down:  # cut off while this row waited for a slot
                    raise _Fail("host_unavailable", st.down)
                left = budget[0]
                if left <= 0:
                    raise _Fail("timeout", f"deadline {cfg.deadline:g} s exceeded")
                t_req = time.monotonic()
                try:
                    outcome = await asyncio.wait_for(self._request(url), left)
                    st.consecutive_failures = 0
                    return outcome
                except (aiohttp.ServerTimeoutError, aiohttp.ConnectionTimeoutError) as exc:
                    raise _Fail("timeout", f"{type(exc).__name__}: {exc}".strip(": ")) from None
                except asyncio.TimeoutError:
                    raise _Fail("timeout", f"deadline {cfg.deadline:g} s exceeded") from None
                except aiohttp.ClientConnectorDNSError as exc:
                    raise _Fail("dns_error", str(exc)) from None
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError,
                        ConnectionError) as exc:
                    raise _Fail("connection_error", f"{type(exc).__name__}: {exc}") from None
                except (aiohttp.InvalidURL, ValueError) as exc:
                    raise _Fail("invalid_url", f"{type(exc).__name__}: {exc}") from None
                finally:
                    budget[0] -= time.monotonic() - t_req
                    res.msecs += (time.monotonic() - t_req) * 1000.0
            except _Fail as f:
                last = f
                if f.reason not in TRANSIENT_FAILURES:
                    raise
                if f.reason in _HOST_FAILURES:
                    st.consecutive_failures += 1
                    if cfg.host_failure_limit and st.consecutive_failures >= cfg.host_failure_limit and not st.down:
                        st.down = (f"{origin}: {st.consecutive_failures} consecutive failures "
                                   f"(last: {f.reason} {f.detail})")
                        log.warning("origin cut off: %s", st.down)
                else:
                    st.consecutive_failures = 0
                retry_after = f.retry_after
            finally:
                release()
            if attempt == cfg.retries:
                break
            wait = max(retry_after, cfg.retry_backoff * (2 ** attempt) * random.uniform(0.5, 1.5))
            if wait >= budget[0]:
                break
            budget[0] -= wait
            await asyncio.sleep(wait)
        if st.down and last.reason in _HOST_FAILURES:
            raise _Fail("host_unavailable", st.down + f"; this URL: {last.reason} {last.detail}")
        raise last

    async def _request(self, url: str) -> bytes | str:
        import yarl

        cfg = self.cfg
        timeout = _client_timeout(cfg.timeout)
        async with self.session.get(url, allow_redirects=False, timeout=timeout) as resp:
            if cfg.respect_robots:
                directive = x_robots_opt_out(resp.headers.getall("X-Robots-Tag", ()), self.token)
                if directive:
                    resp.close()  # drop the connection: the body is never read
                    raise _Fail("opted_out", f"X-Robots-Tag: {directive}")
            status = resp.status
            if status in _REDIRECT_STATUSES:
                location = resp.headers.get("Location")
                resp.close()
                if not location:
                    raise _Fail("http_4xx", f"HTTP {status} without Location")
                return str(resp.url.join(yarl.URL(location)))
            reason = status_reason(status)
            if reason:
                resp.close()
                fail = _Fail(reason, f"HTTP {status} {resp.reason or ''}".strip())
                if status in (429, 503):
                    fail.retry_after = _retry_after(resp.headers.get("Retry-After"))
                raise fail
            length = resp.content_length
            if length is not None and length > cfg.max_bytes:
                resp.close()
                raise _Fail("too_large", f"Content-Length {length} > --max-bytes {cfg.max_bytes}")
            try:
                decoder = BodyDecoder(content_codings(resp.headers.getall("Content-Encoding", ())), cfg.max_bytes)
            except EncodingError as exc:
                resp.close()
                raise _Fail("not_image", str(exc)) from None
            return await self._read_body(resp, decoder)

    async def _read_body(self, resp, decoder: BodyDecoder) -> bytes:
        """The decoded body; ``--max-bytes`` caps both the bytes received and the bytes decoded."""
        cfg = self.cfg
        chunks, received, sniffed = [], 0, False
        try:
            async for chunk in resp.content.iter_chunked(1 << 16):
                received += len(chunk)
                if received > cfg.max_bytes:
                    raise _Fail("too_large", f"body > --max-bytes {cfg.max_bytes}")
                chunks += decoder.feed(chunk)
                if decoder.over:
                    raise _Fail("too_large", f"{_coding_note(decoder)}body > --max-bytes {cfg.max_bytes}")
                if not sniffed and decoder.decoded >= 16:
                    sniffed = True
                    head = _first_bytes(chunks, 16)
                    if sniff_image(head) is None:
                        raise _Fail("not_image", f"not an image (Content-Type {resp.content_type}, "
                                                 f"{_coding_note(decoder)}starts {head[:8]!r})")
            chunks += decoder.finish()
            if decoder.over:
                raise _Fail("too_large", f"{_coding_note(decoder)}body > --max-bytes {cfg.max_bytes}")
        except EncodingError as exc:
            resp.close()
            raise _Fail("not_image", str(exc)) from None
        except _Fail:
            resp.close()  # drop the connection: the rest of the body is never read
            raise
        body = b"".join(chunks)
        if not body:
            raise _Fail("not_image", f"empty body (Content-Type {resp.content_type})")
        if sniff_image(body[:16]) is None:
            raise _Fail("not_image", f"not an image (Content-Type {resp.content_type}, "
                                     f"{_coding_note(decoder)}starts {body[:8]!r})")
        return body

    async def _check_robots(self, url: str, chk: UrlCheck, st: _Origin) -> None:
        if st.robots is None:
            st.robots = asyncio.ensure_future(self._fetch_robots(chk, st))
        parser, problem = await asyncio.shield(st.robots)
        if problem:
            raise _Fail("robots_unavailable", problem)
        if parser is not None and not parser.can_fetch(url, self.token):
            raise _Fail("robots_disallowed", f"robots.txt of {chk.origin} disallows {url} for {self.token}")

    async def _fetch_robots(self, chk: UrlCheck, st: _Origin) -> tuple[Any, str | None]:
        """(parser or None for allow-all, problem text or None). RFC 9309: 4xx -> allow all;
        5xx / timeout / connection error -> disallow all (temporarily: reason robots_unavailable)."""
        import yarl
        from protego import Protego

        cfg = self.cfg
        url = f"{chk.origin}/robots.txt"
        for _ in range(5):  # RFC 9309: follow at least five redirects
            release = await self._slot(st)
            try:
                async with self.session.get(url, allow_redirects=False, timeout=_client_timeout(cfg.robots_timeout,
                                                                                                cfg.robots_timeout)) as r:
                    if r.status in _REDIRECT_STATUSES and r.headers.get("Location"):
                        nxt = str(r.url.join(yarl.URL(r.headers["Location"])))
                        nchk = check_url(nxt)
                        if not nchk.ok:
                            return None, None
                        try:
                            await self.resolver.allowed(nchk.host, count=False)
                        except (_DnsError, _Blocked):
                            return None, None  # unreachable redirect target: treat as "no robots.txt"
                        url = nxt
                        continue
                    if 400 <= r.status < 500:
                        return None, None
                    if r.status >= 500:
                        return None, f"robots.txt of {chk.origin}: HTTP {r.status} (temporarily disallowed)"
                    text = (await _read_robots(r)).decode("utf-8", "replace")
            except EncodingError as exc:
                return None, f"robots.txt of {chk.origin}: {exc} (temporarily disallowed)"
            except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as exc:
                return None, f"robots.txt of {chk.origin}: {type(exc).__name__} {exc} (temporarily disallowed)"
            finally:
                release()
            parser = Protego.parse(text)
            delay = parser.crawl_delay(self.token)
            if delay:
                st.interval = max(st.interval, min(float(delay), 60.0))
            return parser, None
        return None, None


async def _read_robots(resp, limit: int = ROBOTS_MAX_BYTES) -> bytes:
    """The first ``limit`` decoded bytes of a robots.txt (RFC 9309 asks parsers to read at least 500 KiB);
    a gzip or deflate robots.txt is decoded like an image body (raises EncodingError)."""
    decoder = BodyDecoder(content_codings(resp.headers.getall("Content-Encoding", ())), limit)
    out, received = [], 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        received += len(chunk)
        out += decoder.feed(chunk)
        if decoder.over or received > limit:
            resp.close()
            return b"".join(out)[:limit]
    out += decoder.finish()
    return b"".join(out)


def _first_bytes(pieces: list[bytes], n: int) -> bytes:
    out = b""
    for piece in pieces:
        out += piece[: n - len(out)]
        if len(out) >= n:
            break
    return out


def _coding_note(decoder: BodyDecoder) -> str:
    return f"Content-Encoding {', '.join(decoder.codings)}, decoded " if decoder.codings else ""


def _job_result(fut, row: dict) -> _Result:
    try:
        return fut.result()
    except BaseException as exc:  # noqa: BLE001 - never lose a row, even to a bug or cancellation
        log.exception("download job crashed")
        return _Result(row, "connection_error", f"internal: {type(exc).__name__}: {exc}")


def _client_timeout(timeout: float, total: float | None = None):
    return aiohttp.ClientTimeout(total=total, sock_connect=timeout, sock_read=timeout)


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value), 0.0), 60.0) if value else 0.0
    except ValueError:
        return 0.0


# ---------------------------------------------------------------------------------------------
# Beam wrappers


class _DownloadFn(beam.DoFn):
    """Concurrent downloads inside one worker; see the module docstring."""

    def __init__(self, config: DownloadConfig):
        self._cfg = config

    def setup(self):
        ns = records.METRICS_NAMESPACE
        self._counters = {name: Metrics.counter(ns, name) for name in (
            "download_in", "download_out", "download_bytes", "dns_failures", "dns_cache_hits",
            "politeness_deferred")}
        self._reasons = {r: Metrics.counter(ns, f"download_{r}") for r in records.REASONS[STAGE]}
        self._msecs = Metrics.distribution(ns, "download_msecs")
        self._host_dists: dict[str, Any] = {}
        self._engine = _Engine(self._cfg)
        self._reported = {"dns_cache_hits": 0, "dns_failures": 0, "politeness_deferred": 0}
        # Rows queued beyond the request slots: waiting rows hold no body, so a deep queue is cheap and
        # lets rows of other hosts overtake a busy host's backlog (no head-of-line blocking).
        self._max_inflight = max(self._cfg.threads * 16, 64)

    def process(self, row):
        self._counters["download_in"].inc()
        self._engine.submit(row)
        yield from self._emit(self._engine.take(self._max_inflight))

    def finish_bundle(self):
        for out in self._emit(self._engine.drain()):
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, MIN_TIMESTAMP, [GlobalWindow()]))
            else:
                yield WindowedValue(out, MIN_TIMESTAMP, [GlobalWindow()])
        self._flush_counters()

    def _emit(self, results: Iterable[_Result]):
        emitted = False
        for res in results:
            emitted = True
            if res.msecs is not None:
                self._msecs.update(int(res.msecs))
                if res.host and res.msecs:  # rows that made a request
                    self._host_msecs(res.host, res.msecs)
            if res.reason is None:
                self._counters["download_out"].inc()
                self._counters["download_bytes"].inc(res.nbytes)
                yield res.row
            else:
                self._reasons[res.reason].inc()
                yield beam.pvalue.TaggedOutput(records.REJECTED_TAG,
                                               records.reject(res.row, STAGE, res.reason, res.detail))
        if emitted:
            self._flush_counters()

    def _host_msecs(self, host: str, msecs: float) -> None:
        stats = self._engine.host_msecs.setdefault(host, [0, 0.0])
        stats[0] += 1
        stats[1] += msecs
        dist = self._host_dists.get(host)
        if dist is None and stats[0] >= 3 and stats[1] / stats[0] > SLOW_HOST_MSECS \
                and len(self._host_dists) < _MAX_SLOW_HOST_METRICS:
            dist = self._host_dists[host] = Metrics.distribution(records.METRICS_NAMESPACE,
                                                                 f"download_slow_host_msecs/{host}")
        if dist is not None:
            dist.update(int(msecs))

    def _flush_counters(self) -> None:
        now = self._engine.counters()
        for name, seen in self._reported.items():
            if now[name] > seen:
                self._counters[name].inc(now[name] - seen)
                self._reported[name] = now[name]

    def teardown(self):
        engine = getattr(self, "_engine", None)
        if engine is None:
            return
        slow = sorted(((tot / n, n, h) for h, (n, tot) in engine.host_msecs.items() if n),
                      reverse=True)[:_SLOW_HOST_LOG]
        if slow:
            log.info("download: slowest hosts (mean ms, URLs): %s",
                     ", ".join(f"{h} {m:.0f} ms x{n}" for m, n, h in slow))
        c = engine.counters()
        log.info("download: DNS lookups %d, cache hits %d, failures %d; politeness deferred %d",
                 c["dns_lookups"], c["dns_cache_hits"], c["dns_failures"], c["politeness_deferred"])
        engine.close()
        self._engine = None


class Download(beam.PTransform):
    """Download every row's ``url``: returns ``(kept, rejected)``; kept rows gain ``image_bytes``.

    Rows are reshuffled first (random keys) so that each host's URLs spread over workers and bundles;
    per-host limits (``--per-host-connections``, ``--per-host-rps``) hold per worker process.
    """

    def __init__(self, config: DownloadConfig | None = None, reshuffle: bool = True):
        super().__init__()
        self._cfg = config or DownloadConfig()
        self._reshuffle = reshuffle

    def expand(self, rows):
        if self._reshuffle:
            rows = rows | "SpreadHosts" >> beam.Reshuffle()
        out = rows | "Fetch" >> beam.ParDo(_DownloadFn(self._cfg)).with_outputs(records.REJECTED_TAG, main="kept")
        return out.kept, out[records.REJECTED_TAG]


# In a pipeline the reader has already reshuffled the rows (readers.base.ReadUrlList): a second Reshuffle
# would move every row through the shuffle again for nothing.
register(Stage("download", DownloadConfig, build=lambda cfg, ctx: Download(cfg, reshuffle=False), position=20,
               provides=frozenset({RAW_IMAGE}), title="download"))
