"""Download stage: robots.txt, politeness and the circuit breaker are per origin (scheme, host, port).

Every case puts two origins on one host name, 127.0.0.1, on two ports: what one origin says or does must
not change how the other is treated (RFC 9309 scopes a robots.txt to its origin).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate.stages.download import Download, DownloadConfig, check_url, origin_of
from clip_curate.synthetic.webserver import Route, WebServer, tiny_jpeg

JPEG = tiny_jpeg()
IMG = Route(JPEG, content_type="image/jpeg")
FAST = dict(timeout=1.0, deadline=3.0, retries=0, retry_backoff=0.05, per_host_rps=0, robots_timeout=1.0,
            allow_private_addresses=True)
DISALLOW_ALL = Route(b"User-agent: *\nDisallow: /\n", content_type="text/plain")


def rows_for(urls):
    return [{"uid": f"u{i}", "url": u, "caption": f"c{i}"} for i, u in enumerate(urls)]


def outcome(ran):
    """url -> None (kept) or the rejection reason."""
    got = {r["url"]: r["reason"] for r in ran.rejected}
    got.update({r["url"]: None for r in ran.kept})
    assert len(got) == len(ran.kept) + len(ran.rejected)
    return got


def paths(server):
    return [r.path for r in server.request_log()]


def test_origin_key():
    assert check_url("http://Example.com/a.jpg").origin == "http://example.com"
    assert check_url("http://example.com:80/a.jpg").origin == "http://example.com"
    assert check_url("https://example.com:443/a.jpg").origin == "https://example.com"
    assert check_url("http://example.com:8080/a.jpg").origin == "http://example.com:8080"
    assert check_url("https://example.com:80/a.jpg").origin == "https://example.com:80"
    assert check_url("http://[::1]:8080/x").origin == "http://[::1]:8080"
    assert origin_of("http", "127.0.0.1", 0) == "http://127.0.0.1"
    # one host name, three origins
    assert len({check_url(u).origin for u in ("http://a.test/x", "https://a.test/x", "http://a.test:81/x")}) == 3


def test_robots_txt_of_one_port_does_not_apply_to_the_other(run_transform):
    with WebServer({"/robots.txt": DISALLOW_ALL, "/img/a.jpg": IMG}) as closed, \
            WebServer({"/img/a.jpg": IMG}) as open_:                                  # no robots.txt: 404
        assert closed.hosts == open_.hosts == ["127.0.0.1"] and closed.port != open_.port
        urls = [s.url(f"/img/a.jpg?i={i}") for i in range(4) for s in (closed, open_)]
        ran = run_transform(rows_for(urls), Download(DownloadConfig(**FAST)))
        got = outcome(ran)
        closed_log, open_log = paths(closed), paths(open_)
    assert got == {u: ("robots_disallowed" if u.startswith(closed.base_url) else None) for u in urls}
    assert closed_log == ["/robots.txt"]                     # its robots.txt, once; never an image
    assert sorted(open_log) == ["/img/a.jpg?i=0", "/img/a.jpg?i=1", "/img/a.jpg?i=2", "/img/a.jpg?i=3",
                                "/robots.txt"]
    assert all(k["image_bytes"] == JPEG for k in ran.kept)
    detail = next(r["detail"] for r in ran.rejected)
    assert f"robots.txt of {closed.base_url} " in detail, detail


def test_unavailable_robots_txt_of_one_port_spares_the_other(run_transform):
    with WebServer({"/robots.txt": Route(b"busy", status=503), "/a.jpg": IMG}) as busy, \
            WebServer({"/robots.txt": Route(b"User-agent: *\nAllow: /\n"), "/a.jpg": IMG}) as fine:
        urls = [s.url(f"/a.jpg?i={i}") for i in range(3) for s in (busy, fine)]
        ran = run_transform(rows_for(urls), Download(DownloadConfig(**FAST)))
        got = outcome(ran)
        assert paths(busy) == ["/robots.txt"]
    assert got == {u: ("robots_unavailable" if u.startswith(busy.base_url) else None) for u in urls}


def test_circuit_breaker_cuts_off_one_origin_only(run_transform):
    with WebServer({"/a.jpg": Route(reset=True)}) as broken, WebServer({"/a.jpg": IMG}) as fine:
        # The broken origin's rows come first and one request per origin at a time: had both origins one
        # breaker, the good origin's rows would queue behind the broken ones and be cut off with them.
        urls = [broken.url(f"/a.jpg?i={i}") for i in range(8)] + [fine.url(f"/a.jpg?i={i}") for i in range(8)]
        cfg = DownloadConfig(**FAST, host_failure_limit=3, per_host_connections=1, respect_robots_txt=False)
        ran = run_transform(rows_for(urls), Download(cfg, reshuffle=False), via_file=True)  # one bundle
        got = outcome(ran)
        broken_urls = set(paths(broken))
    assert all(got[u] is None for u in urls[8:])
    assert {got[u] for u in urls[:8]} == {"connection_error", "host_unavailable"}
    assert broken_urls == {f"/a.jpg?i={i}" for i in range(3)}   # the limit, then no more requests
    assert sum(got[u] == "connection_error" for u in urls[:8]) == 2  # the third is reported with the cut-off
    cut = next(r["detail"] for r in ran.rejected if r["reason"] == "host_unavailable")
    assert cut.startswith(f"{broken.base_url}: 3 consecutive failures"), cut


def test_per_host_connections_hold_per_origin(run_transform):
    """One connection per origin: each origin never sees two requests at once, and the two origins are
    served at the same time (each one's first image waits until the other's first image request arrived,
    which a single limit for the host name would never let happen)."""
    arrived = {"a": threading.Event(), "b": threading.Event()}

    def rendezvous(me, other):
        def routes(req):
            if req.path.startswith("/first"):
                arrived[me].set()
                arrived[other].wait(5.0)  # blocks only this server's own loop thread
            return IMG
        return routes

    with WebServer(rendezvous("a", "b")) as a, WebServer(rendezvous("b", "a")) as b:
        urls = [a.url("/first.jpg"), b.url("/first.jpg")] + [s.url(f"/more.jpg?i={i}") for i in range(3)
                                                             for s in (a, b)]
        cfg = DownloadConfig(**{**FAST, "timeout": 3.0, "deadline": 6.0}, per_host_connections=1,
                             respect_robots_txt=False)
        ran = run_transform(rows_for(urls), Download(cfg, reshuffle=False), via_file=True)  # one bundle
        got = outcome(ran)
        max_active = a.stats().max_active, b.stats().max_active
    assert got == {u: None for u in urls}
    assert max_active == (1, 1)


@pytest.mark.slow
def test_retry_from_keeps_per_origin_robots_decisions(tmp_path, local_net_flags):
    """The ``--retry-from`` case: a row that failed with connection_error on one port is retried while
    another port of the same host still answers its robots.txt with 503; the retried row is downloaded."""
    state = {"up": False}

    def flaky(req):  # allows everything in robots.txt; its images reset the connection until it is "up"
        if req.path == "/robots.txt":
            return Route(b"User-agent: *\nAllow: /\n", content_type="text/plain")
        return IMG if state["up"] else Route(reset=True)

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "clip_curate.cli", "run", *map(str, args), "--stages", "download,image",
             *local_net_flags(respect_robots_txt=True, host_failure_limit=0), "--retries", "0",
             "--robots-timeout", "2", "--progress-seconds", "0"], capture_output=True, text=True, timeout=300)

    with WebServer(flaky) as web, WebServer({"/robots.txt": Route(b"busy", status=503), "/b.jpg": IMG}) as busy:
        rows = ([{"url": web.url(f"/a{i}.jpg"), "caption": f"flaky {i}"} for i in range(4)]
                + [{"url": busy.url(f"/b.jpg?i={i}"), "caption": f"busy {i}"} for i in range(4)])
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
        first = cli("--input", tmp_path / "urls.parquet", "--output", tmp_path / "out")
        assert first.returncode == 0, first.stderr[-2000:]
        stats = json.loads((tmp_path / "out" / "stats.json").read_text())
        assert stats["rejected_by"]["download"] == {"connection_error": 4, "robots_unavailable": 4}

        state["up"] = True
        retry = cli("--retry-from", tmp_path / "out", "--output", tmp_path / "retry")
        assert retry.returncode == 0, retry.stderr[-2000:]
        rstats = json.loads((tmp_path / "retry" / "stats.json").read_text())
        busy_paths = [r.path for r in busy.request_log()]
    assert rstats["input_rows"] == 8
    assert rstats["rejected_by"] == {"download": {"robots_unavailable": 4}}
    assert sorted(pq.read_table(tmp_path / "retry" / "curated").column("caption").to_pylist()) == \
        sorted(f"flaky {i}" for i in range(4))
    assert set(busy_paths) == {"/robots.txt"}               # never asked for an image
