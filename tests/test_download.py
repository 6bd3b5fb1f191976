"""Download stage: pure rules, and real Beam pipelines against real local HTTP servers (127.0.0.0/8)."""
from __future__ import annotations

import hashlib
import json
import time

import pytest

from clip_curate import records
from clip_curate.stages.download import (Download, DownloadConfig, address_block_reason, check_url, parse_resolve,
                                  sniff_image, status_reason, x_robots_opt_out)
from clip_curate.fields import ConfigError
from clip_curate.synthetic.webserver import Route, WebServer, fault_routes, loopback_hosts, tiny_jpeg

JPEG = tiny_jpeg()
FAST = dict(timeout=1.0, deadline=2.0, retries=2, retry_backoff=0.05, per_host_rps=0, robots_timeout=0.5)


# ---------------------------------------------------------------------------------------------
# Harness: a real pipeline (conftest's run_transform), rows as JSON with the body as its size and hash


def _as_written(row):
    body = row.get("image_bytes")
    rec = {k: v for k, v in row.items() if k != "image_bytes"}
    if body is not None:
        rec["nbytes"], rec["sha256"] = len(body), hashlib.sha256(body).hexdigest()
    return json.loads(json.dumps(rec))


@pytest.fixture(scope="session")
def run_download(run_transform):
    def run(rows, cfg: DownloadConfig, beam_args=()):
        """Run Create(rows) | Download(cfg); returns (kept, rejected, counters dict, wall seconds)."""
        ran = run_transform(rows, Download(cfg), options=beam_args)
        return [_as_written(r) for r in ran.kept], [_as_written(r) for r in ran.rejected], ran.counters, ran.wall
    return run


def rows_for(urls):
    return [{"uid": f"u{i}", "url": u, "caption": f"c{i}"} for i, u in enumerate(urls)]


def by_url(rows):
    return {r["url"]: r for r in rows}


# ---------------------------------------------------------------------------------------------
# Pure core


def test_check_url():
    assert check_url("https://Example.COM./a.jpg").host == "example.com"
    assert check_url("ftp://x/y").reason == "blocked_scheme"
    assert check_url("file:///etc/passwd").reason == "blocked_scheme"
    assert check_url("javascript:alert(1)").reason == "blocked_scheme"
    assert check_url("/relative.jpg").reason == "invalid_url"
    assert check_url(None).reason == "invalid_url"
    assert check_url("http://[::1]:8080/x").host == "::1"


@pytest.mark.parametrize("addr, reason", [
    ("8.8.8.8", None), ("93.184.216.34", None), ("2606:4700::1111", None),
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "link-local"), ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"), ("100.64.0.1", "non-global"),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"), ("fc00::1", "private"),
    ("ff02::1", "multicast"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("::ffff:8.8.8.8", None), ("64:ff9b::a9fe:a9fe", "link-local"), ("2002:7f00:1::", "loopback"),
    ("fe80::1%eth0", "link-local"),
])
def test_address_block_reason(addr, reason):
    assert address_block_reason(addr) == reason


@pytest.mark.parametrize("values, expected", [
    (["noai"], "noai"), (["NoImageAI, nofollow"], "noimageai"), (["noindex"], "noindex"), (["none"], "none"),
    (["nofollow", "noarchive"], None), ([], None),
    (["otherbot: noai"], None), (["clip-curate: noai"], "clip-curate: noai"),
    (["otherbot: noai, noindex"], None), (["otherbot: nofollow", "noai"], "noai"),
    (["googlebot: nofollow, clip-curate: noimageai"], "clip-curate: noimageai"),
    (["unavailable_after: 25 Jun 2010 15:00:00 PST, noai"], "noai"),
    (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None), (["max-image-preview: none"], None),
])
def test_x_robots_opt_out(values, expected):
    assert x_robots_opt_out(values, "clip-curate") == expected


def test_status_sniff_resolve():
    assert [status_reason(s) for s in (200, 206, 404, 410, 429, 500, 503)] == [
        None, None, "http_404", "http_4xx", "http_429", "http_5xx", "http_5xx"]
    assert sniff_image(JPEG[:16]) == "jpeg"
    assert sniff_image(b"\x89PNG\r\n\x1a\n" + bytes(8)) == "png"
    assert sniff_image(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_image(b"GIF89a" + bytes(10)) == "gif"
    assert sniff_image(b"<!doctype html>") is None
    assert parse_resolve(["A.test:127.0.0.2", "b.test:[::1]", "c.test:443:127.0.0.4"]) == {
        "a.test": "127.0.0.2", "b.test": "::1", "c.test": "127.0.0.4"}
    with pytest.raises(ConfigError, match="--resolve"):
        parse_resolve(["nocolon"])
    with pytest.raises(ConfigError, match="--resolve"):
        parse_resolve(["a.test:not-an-ip"])


@pytest.mark.parametrize("kwargs, flag", [
    ({"timeout": 0}, "--timeout"), ({"deadline": -1}, "--deadline"), ({"retries": -1}, "--retries"),
    ({"threads": 0}, "--threads"), ({"per_host_connections": 0}, "--per-host-connections"),
    ({"per_host_rps": -1}, "--per-host-rps"), ({"resolve": ("x",)}, "--resolve"),
    ({"user_agent": " "}, "--user-agent"), ({"allow_networks": ("10.0.0.0/33",)}, "--allow-networks"),
    ({"max_bytes": 0}, "--max-bytes"),
])
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        DownloadConfig(**kwargs)


def test_config_defaults_are_polite_and_honest():
    cfg = DownloadConfig()
    assert cfg.user_agent.startswith("clip-curate/") and "+https://" in cfg.user_agent
    assert cfg.agent_token == "clip-curate"
    assert cfg.respect_robots and cfg.respect_robots_txt and not cfg.allow_private_addresses
    assert cfg.per_host_connections <= 8 and 0 < cfg.per_host_rps <= 20


# ---------------------------------------------------------------------------------------------
# The fault web


EXPECTED = {  # path -> (kept?, reason)
    "/ok.jpg": None, "/500-then-ok.jpg": None, "/redirect-ok": None, "/truncated.jpg": None,
    "/otherbot-noai.jpg": None,
    "/404": "http_404", "/410": "http_4xx", "/500": "http_5xx", "/503": "http_5xx", "/drip.jpg": "timeout",
    "/slow.jpg": "timeout", "/reset": "connection_error", "/truncated-transfer.jpg": "connection_error",
    "/random.jpg": "not_image", "/html-as-image": "not_image", "/html": "not_image",
    "/loop-a": "redirect_loop", "/chain0": "too_many_redirects", "/big.jpg": "too_large",
    "/big-unsized.jpg": "too_large", "/noai.jpg": "opted_out", "/noimageai.jpg": "opted_out",
    "/noindex.jpg": "opted_out", "/none.jpg": "opted_out", "/clip-curate-noai.jpg": "opted_out",
}


def test_fault_web_exact_reasons(run_download):
    with WebServer(fault_routes(JPEG, slow_s=3.0, big_bytes=1_500_000)) as srv:
        urls = [srv.url(p) for p in EXPECTED] + ["ftp://127.0.0.1/x.jpg", "not a url"]
        cfg = DownloadConfig(**{**FAST, "host_failure_limit": 0}, allow_private_addresses=True,
                             max_bytes=1_000_000)
        kept, rejected, counters, _ = run_download(rows_for(urls), cfg)
        stats = srv.stats()
    assert len(kept) + len(rejected) == len(urls)
    got = {r["url"]: r["reason"] for r in rejected}
    got.update({r["url"]: None for r in kept})
    want = {srv.url(p): reason for p, reason in EXPECTED.items()}
    want.update({"ftp://127.0.0.1/x.jpg": "blocked_scheme", "not a url": "invalid_url"})
    assert got == want
    for r in rejected:
        assert r["stage"] == "download" and r["detail"] and "image_bytes" not in r
    k = by_url(kept)
    assert k[srv.url("/ok.jpg")]["sha256"] == hashlib.sha256(JPEG).hexdigest()
    assert k[srv.url("/ok.jpg")]["caption"] and k[srv.url("/ok.jpg")]["uid"]
    assert stats.requests["/500-then-ok.jpg"] == 3          # two 500s retried, then the image
    assert stats.requests["/500"] == 3                      # 1 + --retries, then given up
    assert stats.requests["/404"] == 1                      # 4xx is never retried
    assert stats.requests["/chain6"] == 0 and stats.requests["/chain5"] == 1
    assert counters["download_in"] == len(urls)
    assert counters["download_out"] == len(kept)
    assert counters["download_opted_out"] == 5 and counters["download_http_5xx"] == 2
    assert counters["download_bytes"] == sum(r["nbytes"] for r in kept)
    assert counters["download_msecs"].count == len(urls)


def test_ssrf_guard_blocks_loopback_without_a_request(run_download):
    with WebServer({"/a.jpg": Route(JPEG, content_type="image/jpeg")}) as srv:
        urls = [srv.url("/a.jpg"), srv.url("/a.jpg").replace("127.0.0.1", "local.test"),
                srv.url("/a.jpg").replace("127.0.0.1", "[::ffff:127.0.0.1]")]
        cfg = DownloadConfig(**FAST, resolve=("local.test:127.0.0.1",))
        kept, rejected, counters, _ = run_download(rows_for(urls), cfg)
        assert srv.stats().requests_total == 0
    assert kept == []
    assert sorted(r["reason"] for r in rejected) == ["blocked_address"] * 3
    assert "loopback" in rejected[0]["detail"] and counters["download_blocked_address"] == 3


def test_ssrf_guard_on_redirect_hop(run_download):
    origin, target = loopback_hosts(2, first=40)
    with WebServer({"/a.jpg": Route(JPEG, content_type="image/jpeg")}, host=target) as inner:
        routes = {"/to-private": Route(redirect_to=inner.url("/a.jpg")),
                  "/to-private-name": Route(redirect_to=inner.url("/a.jpg").replace(target, "inner.test")),
                  "/to-file": Route(redirect_to="file:///etc/passwd")}
        with WebServer(routes, host=origin) as outer:
            # Only the origin's address is allowed (a "public" site); the redirect target is private.
            cfg = DownloadConfig(**FAST, allow_networks=(f"{origin}/32",), resolve=(f"inner.test:{target}",))
            kept, rejected, _, _ = run_download(rows_for([outer.url(p) for p in routes]), cfg)
            assert inner.stats().requests_total == 0
            assert outer.stats().requests_total == 3 + 1        # + its robots.txt
    assert kept == []
    assert {r["url"].rsplit("/", 1)[1]: r["reason"] for r in rejected} == {
        "to-private": "blocked_address", "to-private-name": "blocked_address", "to-file": "blocked_scheme"}


def test_opt_out_closes_before_the_body(run_download):
    size = 20_000_000
    routes = {"/noai.jpg": Route(b"\xff\xd8\xff" + bytes(size - 3), content_type="image/jpeg",
                                 headers={"X-Robots-Tag": "noai"})}
    with WebServer(routes, sndbuf=65536) as srv:
        kept, rejected, _, _ = run_download(rows_for([srv.url("/noai.jpg")]),
                                            DownloadConfig(**FAST, allow_private_addresses=True))
        time.sleep(0.2)
        sent_respecting = srv.stats().bytes_sent
        srv.reset_stats()
        kept2, _, _, _ = run_download(rows_for([srv.url("/noai.jpg")]),
                                      DownloadConfig(**{**FAST, "deadline": 10.0}, allow_private_addresses=True,
                                                     respect_robots=False, max_bytes=2 * size))
        sent_ignoring = srv.stats().bytes_sent
    assert [r["reason"] for r in rejected] == ["opted_out"] and kept == []
    print("bytes sent for an opted-out 20 MB body:", sent_respecting)
    assert sent_respecting < size / 20, sent_respecting   # far less than the 20 MB body
    assert len(kept2) == 1 and kept2[0]["nbytes"] == size and sent_ignoring >= size


# ---------------------------------------------------------------------------------------------
# Politeness


def _many_hosts(n, first=60):
    hosts = loopback_hosts(n, first=first)
    names = [f"h{i}.test" for i in range(n)]
    return hosts, names, tuple(f"{nm}:{h}" for nm, h in zip(names, hosts))


def test_per_host_concurrency_limit_with_high_total_throughput(run_download):
    hosts, names, resolve = _many_hosts(20)
    routes = {"/img.jpg": Route(JPEG, content_type="image/jpeg", delay_s=0.1)}
    with WebServer(routes, hosts=hosts) as srv:
        urls = [f"http://{nm}:{srv.port}/img.jpg?i={i}" for i in range(12) for nm in names]
        cfg = DownloadConfig(**FAST, threads=64, per_host_connections=2, resolve=resolve,
                             allow_networks=("127.0.0.0/8",))
        kept, rejected, counters, wall = run_download(rows_for(urls), cfg)
        per_host = [srv.stats(h).max_active for h in hosts]
        total = srv.stats()
    assert len(kept) == 240 and rejected == []
    assert max(per_host) <= 2 and min(per_host) == 2, per_host
    assert total.max_active >= 20, total.max_active          # many hosts in flight at once
    # 12 URLs per host, 2 at a time, 0.1 s each: 0.6 s of serial host time; allow Beam overhead.
    assert total.last_request_at - total.first_request_at < 5.0
    assert counters["politeness_deferred"] > 0
    assert counters["dns_cache_hits"] == 240 - 20                # one lookup per name


def test_per_host_rps_limit(run_download):
    with WebServer({"/i.jpg": Route(JPEG, content_type="image/jpeg")}) as srv:
        urls = [srv.url(f"/i.jpg?n={i}") for i in range(11)]
        cfg = DownloadConfig(**{**FAST, "per_host_rps": 10.0}, allow_private_addresses=True,
                             respect_robots_txt=False)
        kept, _, _, _ = run_download(rows_for(urls), cfg)
        s = srv.stats()
    assert len(kept) == 11
    assert s.last_request_at - s.first_request_at >= 0.95     # 11 starts at 10/s: >= 1 s apart in all


def test_one_slow_host_does_not_stall_the_others(run_download):
    hosts, names, resolve = _many_hosts(20, first=90)
    slow_host = hosts[0]
    routes = {"/img.jpg": Route(JPEG, content_type="image/jpeg", delay_s=0.05),
              f"{slow_host}/img.jpg": Route(JPEG, content_type="image/jpeg", delay_s=10.0)}
    with WebServer(routes, hosts=hosts) as srv:
        urls = [f"http://{nm}:{srv.port}/img.jpg?i={i}" for i in range(10) for nm in names]
        cfg = DownloadConfig(timeout=0.5, deadline=1.0, retries=1, retry_backoff=0.05, per_host_rps=0,
                             threads=32, per_host_connections=2, host_failure_limit=3, resolve=resolve,
                             allow_networks=("127.0.0.0/8",), respect_robots_txt=False)
        fast_only = [u for u in urls if not u.startswith("http://h0.test")]
        _, _, _, wall_fast = run_download(rows_for(fast_only), cfg)
        kept, rejected, counters, wall = run_download(rows_for(urls), cfg)
        slow_requests = srv.stats(slow_host).requests_total
    assert len(kept) == 190
    assert {r["reason"] for r in rejected} <= {"timeout", "host_unavailable"} and len(rejected) == 10
    assert counters["download_host_unavailable"] >= 5           # the breaker cut the host off
    assert slow_requests <= 6                                     # bounded: not 10 URLs x 2 attempts
    assert wall < 3 * wall_fast + 2.0, (wall, wall_fast)


# ---------------------------------------------------------------------------------------------
# robots.txt


ROBOTS = b"User-agent: *\nDisallow: /private/\n\nUser-agent: otherbot\nDisallow: /\n"


def test_robots_txt_cases(run_download):
    hosts, names, resolve = _many_hosts(5, first=130)
    img = Route(JPEG, content_type="image/jpeg")
    routes = {"/public/a.jpg": img, "/private/b.jpg": img,
              f"{hosts[0]}/robots.txt": Route(ROBOTS, content_type="text/plain"),      # disallow /private/
              f"{hosts[1]}/robots.txt": Route(b"User-agent: clip-curate\nDisallow: /\n", content_type="text/plain"),
              f"{hosts[2]}/robots.txt": Route(b"oops", status=503),                    # 5xx: disallow for now
              # hosts[3]: no robots.txt (404): allow all
              f"{hosts[4]}/robots.txt": Route(ROBOTS, delay_s=3.0)}                    # timeout: disallow
    with WebServer(routes, hosts=hosts) as srv:
        urls = [f"http://{nm}:{srv.port}{path}" for nm in names for path in ("/public/a.jpg", "/private/b.jpg")]
        cfg = DownloadConfig(**FAST, resolve=resolve, allow_networks=("127.0.0.0/8",))
        kept, rejected, _, _ = run_download(rows_for(urls), cfg)
        seen = {h: srv.stats(h).requests for h in hosts}
    got = {r["url"].split("//")[1].split(":")[0] + r["url"].split(str(srv.port))[1]: r["reason"] for r in rejected}
    got.update({r["url"].split("//")[1].split(":")[0] + r["url"].split(str(srv.port))[1]: None for r in kept})
    assert got == {
        "h0.test/public/a.jpg": None, "h0.test/private/b.jpg": "robots_disallowed",
        "h1.test/public/a.jpg": "robots_disallowed", "h1.test/private/b.jpg": "robots_disallowed",
        "h2.test/public/a.jpg": "robots_unavailable", "h2.test/private/b.jpg": "robots_unavailable",
        "h3.test/public/a.jpg": None, "h3.test/private/b.jpg": None,
        "h4.test/public/a.jpg": "robots_unavailable", "h4.test/private/b.jpg": "robots_unavailable",
    }
    for h in hosts:
        assert seen[h]["/robots.txt"] == 1                      # fetched once per host, cached
    assert seen[hosts[0]]["/private/b.jpg"] == 0                 # disallowed: never requested
    assert seen[hosts[1]]["/public/a.jpg"] == 0
    assert seen[hosts[2]]["/public/a.jpg"] == 0 and seen[hosts[4]]["/public/a.jpg"] == 0
    assert "robots_unavailable" in records.TRANSIENT_REASONS


# ---------------------------------------------------------------------------------------------
# DNS, retry of transient failures, runners


def test_dns_cache_and_dns_error(run_download):
    with WebServer({"/i.jpg": Route(JPEG, content_type="image/jpeg")}, host="127.0.0.7") as srv:
        good = [f"http://img.test:{srv.port}/i.jpg?{i}" for i in range(6)]
        bad = [f"http://nowhere.invalid:{srv.port}/i.jpg?{i}" for i in range(4)]
        cfg = DownloadConfig(**FAST, resolve=("img.test:127.0.0.7",), allow_networks=("127.0.0.7/32",),
                             respect_robots_txt=False)
        kept, rejected, counters, _ = run_download(rows_for(good + bad), cfg)
    assert len(kept) == 6 and [r["reason"] for r in rejected] == ["dns_error"] * 4
    assert counters["dns_failures"] == 1                         # negative cache: one failed lookup
    assert counters["dns_cache_hits"] == (6 - 1) + (4 - 1)
    assert counters["download_dns_error"] == 4


def test_rows_recovered_once_the_server_is_back(run_download):
    with WebServer({"/i.jpg": Route(JPEG, content_type="image/jpeg")}) as srv:
        port = srv.port
    urls = [f"http://127.0.0.1:{port}/i.jpg?{i}" for i in range(5)]
    cfg = DownloadConfig(**{**FAST, "retries": 0}, allow_private_addresses=True, respect_robots_txt=False)
    _, rejected, _, _ = run_download(rows_for(urls), cfg)          # nothing listens: connection refused
    assert {r["reason"] for r in rejected} <= set(records.TRANSIENT_REASONS) and len(rejected) == 5
    retry_rows = [{k: r[k] for k in ("uid", "url", "caption")} for r in rejected
                  if r["reason"] in records.TRANSIENT_REASONS]
    with WebServer({"/i.jpg": Route(JPEG, content_type="image/jpeg")}, port=port):
        kept, rejected2, _, _ = run_download(retry_rows, cfg)
    assert len(kept) == 5 and rejected2 == []


@pytest.mark.slow
def test_multiprocess_direct_runner(run_download):
    with WebServer(fault_routes(JPEG)) as srv:
        urls = [srv.url("/ok.jpg") + f"?{i}" for i in range(8)] + [srv.url("/404"), srv.url("/noai.jpg")]
        cfg = DownloadConfig(**FAST, allow_private_addresses=True)
        kept, rejected, _, _ = run_download(rows_for(urls), cfg, beam_args=(
            "--direct_num_workers=2", "--direct_running_mode=multi_processing"))
    assert len(kept) == 8 and sorted(r["reason"] for r in rejected) == ["http_404", "opted_out"]


@pytest.mark.slow
def test_portable_runner(tmp_path, run_download):
    """The portable path (what Flink/Spark use): pickling and setup() must work in an SDK worker."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        with WebServer(fault_routes(JPEG)) as srv:
            urls = [srv.url("/ok.jpg") + f"?{i}" for i in range(4)] + [srv.url("/404")]
            cfg = DownloadConfig(**FAST, allow_private_addresses=True)
            kept, rejected, _, _ = run_download(rows_for(urls), cfg, beam_args=(
                "--runner=PortableRunner", f"--job_endpoint=localhost:{port}", "--environment_type=LOOPBACK"))
    finally:
        service.terminate()
        service.wait(10)
    assert len(kept) == 4 and [r["reason"] for r in rejected] == ["http_404"]


def test_results_stream_out_of_process_when_the_buffer_is_full(run_download):
    with WebServer({"/i.jpg": Route(JPEG, content_type="image/jpeg")}) as srv:
        urls = [srv.url(f"/i.jpg?{i}") for i in range(100)] + [srv.url("/missing")]
        cfg = DownloadConfig(**FAST, threads=1, allow_private_addresses=True)   # 64 rows queued at most
        kept, rejected, counters, _ = run_download(rows_for(urls), cfg)
        assert srv.stats().max_active == 1
    assert len(kept) == 100 and [r["reason"] for r in rejected] == ["http_404"]
    assert counters["download_in"] == 101 and counters["download_out"] == 100


def test_slow_hosts_get_a_latency_metric(run_download):
    routes = {"/i.jpg": Route(JPEG, content_type="image/jpeg"),
              "127.0.0.9/i.jpg": Route(JPEG, content_type="image/jpeg", delay_s=2.2)}
    with WebServer(routes, hosts=["127.0.0.8", "127.0.0.9"]) as srv:
        urls = [srv.url(f"/i.jpg?{i}", host=h) for h in srv.hosts for i in range(3)]
        cfg = DownloadConfig(**{**FAST, "timeout": 4.0, "deadline": 5.0}, allow_private_addresses=True,
                             respect_robots_txt=False)
        kept, _, counters, _ = run_download(rows_for(urls), cfg)
    assert len(kept) == 6
    slow = {k: v for k, v in counters.items() if k.startswith("download_slow_host_msecs/")}
    assert list(slow) == ["download_slow_host_msecs/127.0.0.9"] and slow[list(slow)[0]].min >= 2000
    assert counters["download_msecs"].max >= 2000 and counters["download_msecs"].min < 1000
