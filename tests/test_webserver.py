"""The local fault web server: routes, faults and counters, checked with plain sockets and urllib."""
from __future__ import annotations

import concurrent.futures
import http.client
import socket
import time
import urllib.error
import urllib.request

import pytest

from clip_curate.synthetic.webserver import Route, WebServer, fault_routes, loopback_hosts, tiny_jpeg

NO_REDIRECT = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,), {
    "redirect_request": lambda self, *a, **k: None}))


def fetch(url, timeout=5):
    try:
        with NO_REDIRECT.open(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def faults():
    with WebServer(fault_routes(slow_s=1.0)) as srv:
        yield srv


def test_ok_404_and_counters(faults):
    faults.reset_stats()
    status, headers, body = fetch(faults.url("/ok.jpg"))
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:3] == b"\xff\xd8\xff"
    assert fetch(faults.url("/404"))[0] == 404
    assert fetch(faults.url("/not-declared"))[0] == 404
    s = faults.stats()
    assert s.requests["/ok.jpg"] == 1 and s.requests_total == 3
    assert s.bytes_sent > len(body)
    assert faults.requests("/ok.jpg") == 1


def test_fail_first_then_success(faults):
    faults.reset_stats()
    assert [fetch(faults.url("/500-then-ok.jpg"))[0] for _ in range(3)] == [500, 500, 200]
    assert fetch(faults.url("/500"))[0] == 500 and fetch(faults.url("/500"))[0] == 500


def test_redirects_and_headers(faults):
    status, headers, _ = fetch(faults.url("/loop-a"))
    assert status == 302 and headers["Location"] == "/loop-b"
    assert fetch(faults.url("/noai.jpg"))[1]["X-Robots-Tag"] == "noai"


def test_reset_truncate_and_unsized(faults):
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected, urllib.error.URLError)):
        fetch(faults.url("/reset"))
    with pytest.raises(http.client.IncompleteRead):
        fetch(faults.url("/truncated-transfer.jpg"))
    status, headers, body = fetch(faults.url("/big-unsized.jpg"))
    assert "Content-Length" not in headers and len(body) == 2_000_000


def test_slow_and_drip(faults):
    t = time.monotonic()
    assert fetch(faults.url("/slow.jpg"))[0] == 200
    assert time.monotonic() - t >= 0.9
    with pytest.raises((TimeoutError, socket.timeout)):
        with urllib.request.urlopen(faults.url("/drip.jpg"), timeout=5) as r:
            sock_deadline = time.monotonic() + 1.0
            while time.monotonic() < sock_deadline:
                r.read(500)
            raise TimeoutError("drip still going after 1 s")


def test_several_loopback_hosts_and_concurrency():
    hosts = loopback_hosts(3)
    routes = {"/s": Route(b"x" * 100, delay_s=0.3), "127.0.0.3/only-here": Route(b"three")}
    with WebServer(routes, hosts=hosts) as srv:
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda i: fetch(srv.url("/s", host=hosts[i % 2])), range(8)))
        assert srv.stats(hosts[0]).max_active == 4 and srv.stats(hosts[1]).max_active == 4
        assert srv.stats().max_active == 8
        assert srv.stats(hosts[2]).requests_total == 0
        assert fetch(srv.url("/only-here", host="127.0.0.3"))[2] == b"three"
        assert fetch(srv.url("/only-here", host="127.0.0.2"))[0] == 404


def test_big_body_bytes_sent_stops_when_client_closes():
    with WebServer({"/big": Route(b"\xff\xd8\xff" + bytes(20_000_000), content_type="image/jpeg")},
                   sndbuf=65536) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(4096)
        s.close()
        time.sleep(0.3)
        assert 0 < srv.stats().bytes_sent < 5_000_000


def test_process_mode():
    with WebServer({"/a": Route(tiny_jpeg(), content_type="image/jpeg")}, hosts=loopback_hosts(2),
                   process=True) as srv:
        assert fetch(srv.url("/a", host="127.0.0.3"))[0] == 200
        assert srv.stats("127.0.0.3").requests["/a"] == 1
        srv.reset_stats()
        assert srv.stats().requests_total == 0
