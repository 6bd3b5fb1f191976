"""Download stage: bodies sent with ``Content-Encoding`` gzip or deflate are decoded while they stream, and
``--max-bytes`` caps the decoded size, so a decompression bomb is rejected ``too_large`` without being
inflated (peak memory measured in a child process)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zlib

import pytest

from clip_curate.stages.download import (
    DECODED_ENCODINGS,
    BodyDecoder,
    Download,
    DownloadConfig,
    EncodingError,
    content_codings,
)
from clip_curate.synthetic.webserver import (
    Route,
    WebServer,
    encode,
    fault_routes,
    gzip_bomb,
    tiny_jpeg,
)

JPEG = tiny_jpeg(320, 240, seed=3)
FAST = dict(timeout=2.0, deadline=4.0, retries=0, per_host_rps=0, allow_private_addresses=True,
            respect_robots_txt=False)
BOMB_BYTES = 300_000_000


def decode_all(body: bytes, codings: list[str], limit: int, step: int = 1 << 16) -> tuple[bytes, bool]:
    """Feed ``body`` in ``step``-byte chunks; (decoded bytes, over the limit?)."""
    dec = BodyDecoder(codings, limit)
    out = []
    for i in range(0, len(body), step):
        out += dec.feed(body[i:i + step])
        if dec.over:
            return b"".join(out), True
    out += dec.finish()
    return b"".join(out), dec.over


# ---------------------------------------------------------------------------------------------
# Pure core


def test_content_codings():
    assert content_codings([]) == []
    assert content_codings(["identity"]) == []
    assert content_codings(["GZIP"]) == ["gzip"]
    assert content_codings(["x-gzip, identity", "Deflate"]) == ["gzip", "deflate"]
    assert DECODED_ENCODINGS == ("gzip", "deflate")


@pytest.mark.parametrize("step", [1, 7, 1 << 16])
@pytest.mark.parametrize("coding, codings", [
    ("gzip", ["gzip"]), ("deflate", ["deflate"]), ("deflate-raw", ["deflate"]),
])
def test_decoder_round_trip_in_any_chunking(coding, codings, step):
    body = encode(JPEG, coding)
    assert decode_all(body, codings, limit=len(JPEG), step=step) == (JPEG, False)


def test_decoder_stacked_multi_member_and_identity():
    assert decode_all(encode(encode(JPEG, "gzip"), "deflate"), ["gzip", "deflate"], 10**6) == (JPEG, False)
    two_members = gzip.compress(JPEG[:1000]) + gzip.compress(JPEG[1000:])
    assert decode_all(two_members, ["gzip"], 10**6, step=333) == (JPEG, False)
    assert decode_all(JPEG, [], 10**6) == (JPEG, False)


@pytest.mark.parametrize("codings, body", [
    (["gzip"], None), (["deflate"], "deflate"), ([], "identity"),
])
def test_decoder_never_yields_more_than_the_limit(codings, body):
    raw = {None: encode(JPEG, "gzip"), "deflate": encode(JPEG, "deflate"), "identity": JPEG}[body]
    out, over = decode_all(raw, codings, limit=len(JPEG) - 1, step=5)
    assert over and out == JPEG[: len(out)] and len(out) <= len(JPEG) - 1


def test_decoder_caps_a_bomb_at_the_limit():
    bomb = gzip_bomb(50_000_000)
    assert len(bomb) < 60_000                                  # about 1000:1
    dec = BodyDecoder(["gzip"], 1_000_000)
    made = 0
    for i in range(0, len(bomb), 1 << 16):
        pieces = dec.feed(bomb[i:i + (1 << 16)])
        assert all(len(p) <= 1 << 20 for p in pieces)             # made in small pieces, never one big buffer
        made += sum(map(len, pieces))
        assert made <= 1_000_000 and max(dec.made) <= 1_000_001
        if dec.over:
            break
    assert dec.over and made == 1_000_000
    # A stacked layer is capped too: deflate(gzip(bomb)) never inflates its inner layer past the limit.
    dec = BodyDecoder(["gzip", "deflate"], 1_000_000)
    dec.feed(encode(bomb, "deflate"))
    assert dec.over and max(dec.made) <= 1_000_001


@pytest.mark.parametrize("codings, body, message", [
    (["br"], b"\x0b\x02\x80abc", "br is not decoded"),
    (["gzip", "gzip", "gzip", "gzip"], b"", "more than 3 codings"),
    (["gzip"], encode(JPEG, "gzip")[:-40], "stream ends early"),
    (["gzip"], b"<html>not gzip at all</html>", "corrupt stream"),
    (["deflate"], b"x", "stream ends after 1 byte"),
    (["gzip"], b"", "empty stream"),
])
def test_decoder_errors(codings, body, message):
    with pytest.raises(EncodingError, match=message):
        decode_all(body, codings, 10**6)


def test_gzip_bomb_helper_is_a_valid_single_member():
    bomb = gzip_bomb(3_000_001)
    assert gzip.decompress(bomb) == bytes(3_000_001)
    d = zlib.decompressobj(31)
    d.decompress(bomb)
    assert d.eof and d.unused_data == b""                      # one member, checksum and size verified
    assert gzip.decompress(gzip_bomb(2_000_000, b"\xff\xd8\xff")) == b"\xff\xd8\xff" + bytes(2_000_000)


# ---------------------------------------------------------------------------------------------
# Real downloads


def test_encoded_bodies_are_decoded_and_bombs_rejected(run_transform):
    routes = fault_routes(JPEG, bomb_bytes=BOMB_BYTES)
    routes["/gzip-gzip.jpg"] = Route(encode(encode(JPEG, "gzip"), "gzip"), content_type="image/jpeg",
                                     headers=[("Content-Encoding", "gzip"), ("Content-Encoding", "gzip")])
    routes["/gzip-html.jpg"] = Route(encode(b"<!doctype html>" + bytes(100), "gzip"), content_type="image/jpeg",
                                     headers={"Content-Encoding": "gzip"})
    want = {"/ok.jpg": None, "/gzip.jpg": None, "/deflate.jpg": None, "/deflate-raw.jpg": None,
            "/gzip-gzip.jpg": None, "/br.jpg": "not_image", "/corrupt-gzip.jpg": "not_image",
            "/gzip-html.jpg": "not_image", "/gzip-bomb.jpg": "too_large"}
    with WebServer(routes) as srv:
        urls = [srv.url(p) for p in want]
        ran = run_transform([{"uid": p, "url": u, "caption": p} for p, u in zip(want, urls)],
                            Download(DownloadConfig(**FAST)))
    got = {r["uid"]: r["reason"] for r in ran.rejected}
    got.update({r["uid"]: None for r in ran.kept})
    assert got == want
    for row in ran.kept:                                       # the decoded bytes are the original JPEG
        assert hashlib.sha256(row["image_bytes"]).hexdigest() == hashlib.sha256(JPEG).hexdigest(), row["uid"]
    detail = {r["uid"]: r["detail"] for r in ran.rejected}
    assert "br is not decoded" in detail["/br.jpg"]
    assert "gzip" in detail["/corrupt-gzip.jpg"]
    assert detail["/gzip-bomb.jpg"] == "Content-Encoding gzip, decoded body > --max-bytes 20000000"
    assert "Content-Encoding gzip, decoded starts b'<!doctyp'" in detail["/gzip-html.jpg"]
    assert ran.counters["download_bytes"] == len(JPEG) * 5    # decoded sizes


def test_gzip_robots_txt_is_decoded(run_transform):
    robots = encode(b"User-agent: *\nDisallow: /private/\n", "gzip")
    routes = {"/robots.txt": Route(robots, content_type="text/plain", headers={"Content-Encoding": "gzip"}),
              "/public/a.jpg": Route(JPEG, content_type="image/jpeg"),
              "/private/a.jpg": Route(JPEG, content_type="image/jpeg")}
    with WebServer(routes) as srv:
        rows = [{"uid": p, "url": srv.url(p), "caption": p} for p in ("/public/a.jpg", "/private/a.jpg")]
        ran = run_transform(rows, Download(DownloadConfig(**{**FAST, "respect_robots_txt": True})))
        asked = [r.path for r in srv.request_log()]
    assert [r["uid"] for r in ran.kept] == ["/public/a.jpg"]
    assert [(r["uid"], r["reason"]) for r in ran.rejected] == [("/private/a.jpg", "robots_disallowed")]
    assert "/private/a.jpg" not in asked


# The child downloads one small gzip JPEG (warming every code path), resets its peak-RSS mark
# (/proc/self/clear_refs, Linux), downloads the bomb and reads the mark again: the growth over the RSS at
# the reset is what the bomb cost. A fresh child, so no other work shares the process; the reset, so that
# the import-time peak (hundreds of MB) cannot hide the download's.
_CHILD = textwrap.dedent("""
    import json, re, sys
    from clip_curate.stages.download import DownloadConfig, _Engine

    def status(field):
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\\s+(\\d+) kB", f.read()).group(1)) * 1024

    warm, bomb, max_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engine = _Engine(DownloadConfig(timeout=5, deadline=20, retries=0, per_host_rps=0, max_bytes=max_bytes,
                                    allow_private_addresses=True, respect_robots_txt=False))
    engine.submit({"url": warm})
    (ok,) = engine.take(None)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    engine.submit({"url": bomb})
    (res,) = engine.take(None)
    peak = status("VmHWM")
    engine.close()
    print(json.dumps({"warm": ok.reason, "reason": res.reason, "detail": res.detail, "growth": peak - before,
                      "before": before}))
""")


def bomb_peak_rss_growth(srv, max_bytes: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, srv.url("/gzip.jpg"), srv.url("/gzip-bomb.jpg"),
                          str(max_bytes)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0 and "clear_refs" in out.stderr:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak-RSS mark")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gzip_bomb_memory_stays_flat():
    """300 MB of zeros behind a JPEG magic number as a ~300 KB gzip body: rejected too_large at the default
    --max-bytes (20 MB), and the download's peak RSS grows by about the cap, far below the bomb's size."""
    bomb = gzip_bomb(BOMB_BYTES, JPEG[:3])
    assert len(bomb) < BOMB_BYTES / 900
    with WebServer(fault_routes(JPEG, bomb_bytes=BOMB_BYTES)) as srv:
        m = bomb_peak_rss_growth(srv, DownloadConfig().max_bytes)
        bomb_requests = srv.requests("/gzip-bomb.jpg")
    print(f"gzip bomb ({len(bomb)} bytes -> {BOMB_BYTES} bytes): peak RSS growth {m['growth'] / 1e6:.1f} MB "
          f"(RSS before {m['before'] / 1e6:.0f} MB)")
    assert m["warm"] is None
    assert m["reason"] == "too_large" and "gzip" in m["detail"], m
    assert bomb_requests == 1                                  # never retried
    assert m["growth"] < 100_000_000, m                         # vs 300 MB inflated
