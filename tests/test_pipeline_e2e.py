"""End to end: a mixed list of >= 500 URLs on a local fault server through the real Beam pipeline.

Every row's outcome is checked (curated, or rejected with the expected stage and reason), and
input rows == curated + rejected, with the DirectRunner in multi-process mode (2 workers).
"""
import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from clip_curate.synthetic.webserver import Route, WebServer, fault_routes

pytestmark = pytest.mark.slow


def _photos() -> dict[str, tuple[bytes, str]]:
    """Real photos (scikit-image) in many formats: name -> (bytes, content type)."""
    astronaut = Image.fromarray(skdata.astronaut())
    coffee = Image.fromarray(skdata.coffee())
    chelsea = Image.fromarray(skdata.chelsea())
    camera = Image.fromarray(skdata.camera())
    out = {}

    def enc(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    out["astronaut.jpg"] = (enc(astronaut, "JPEG", quality=90), "image/jpeg")
    out["coffee.png"] = (enc(coffee, "PNG"), "image/png")
    out["chelsea.webp"] = (enc(chelsea, "WEBP", quality=85), "image/webp")
    out["camera.gif"] = (enc(camera.convert("P"), "GIF"), "image/gif")
    out["coffee.bmp"] = (enc(coffee, "BMP"), "image/bmp")
    out["chelsea.tiff"] = (enc(chelsea, "TIFF"), "image/tiff")
    out["astronaut-cmyk.jpg"] = (enc(astronaut.convert("CMYK"), "JPEG"), "image/jpeg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    out["coffee-exif.jpg"] = (enc(coffee, "JPEG", exif=exif), "image/jpeg")
    sixteen = Image.fromarray((np.asarray(camera, dtype=np.uint16) * 257).astype(np.uint16))
    out["camera16.png"] = (enc(sixteen, "PNG"), "image/png")
    return out


def _bomb_png() -> bytes:
    """A small PNG whose header declares 30000 x 30000 pixels."""
    import struct
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = zlib.compress(b"\x00" * (30000 * 3 + 1) * 50)  # only a few rows of data
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


# fault path in fault_routes -> expected (stage, reason); None = curated
FAULTS = {
    "/404": ("download", "http_404"),
    "/500": ("download", "http_5xx"),
    "/drip.jpg": ("download", "timeout"),
    "/reset": ("download", "connection_error"),
    "/truncated.jpg": ("image", "decode_error"),
    "/random.jpg": ("download", "not_image"),
    "/html-as-image": ("download", "not_image"),
    "/loop-a": ("download", "redirect_loop"),
    "/big.jpg": ("download", "too_large"),
    "/noai.jpg": ("download", "opted_out"),
    "/noimageai.jpg": ("download", "opted_out"),
    "/otherbot-noai.jpg": None,
    "/redirect-ok": None,
    "/500-then-ok.jpg": None,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, local_net_flags):
    tmp = tmp_path_factory.mktemp("e2e")
    photos = _photos()
    routes = fault_routes(photos["astronaut.jpg"][0], big_bytes=3_000_000, drip_bytes_per_s=3000)
    routes["/bomb.png"] = Route(_bomb_png(), content_type="image/png")
    expected = {}
    rows = []
    with WebServer(lambda req: _route(req, routes, photos)) as srv:
        for i in range(520):
            kind = i % 26
            if kind < 9:  # real photos, every format, each URL unique
                name = list(photos)[kind]
                path, outcome = f"/photo/{i}/{name}", None
            elif kind < 9 + len(FAULTS):
                fault = list(FAULTS)[kind - 9]
                path, outcome = f"{fault}?i={i}", FAULTS[fault]
                if fault == "/500-then-ok.jpg":
                    path = f"/flaky/{i}.jpg"
            elif kind == 23:
                path, outcome = f"/bomb.png?i={i}", ("image", "too_large_pixels")
            else:
                path, outcome = f"/photo/{i}/coffee.png", None
            url = srv.url(path)
            rows.append({"url": url, "caption": f"item {i}", "case": path})
            expected[url] = outcome
        urls = tmp / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(rows), urls)
        out = tmp / "out"
        res = subprocess.run(
            [sys.executable, "-m", "clip_curate.cli", "run", "--input", str(urls), "--output", str(out),
             "--stages", "download,image", *local_net_flags(host_failure_limit=0),
             "--timeout", "2", "--deadline", "4", "--retries", "3", "--retry-backoff", "0.05",
             "--max-bytes", "2000000", "--per-host-connections", "16",
             "--image-size", "128", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
            capture_output=True, text=True, timeout=600)
        served = srv.stats().requests_total
    assert res.returncode == 0, res.stderr[-3000:]
    return out, expected, res, served


def _route(req, routes, photos):
    path = req.path.split("?")[0]
    if path.startswith("/photo/"):
        body, ctype = photos[path.rsplit("/", 1)[1]]
        return Route(body, content_type=ctype)
    if path.startswith("/flaky/"):
        return Route(photos["astronaut.jpg"][0], content_type="image/jpeg", fail_first=2)
    return routes.get(path)


def test_every_row_has_its_expected_outcome(world):
    out, expected, res, _ = world
    curated = pq.read_table(out / "curated").to_pylist()
    rejected = pq.read_table(out / "rejected").to_pylist()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == len(expected) == 520
    assert stats["input_rows"] == stats["curated_rows"] + stats["rejected_rows"]
    assert len(curated) + len(rejected) == 520
    assert len({r["uid"] for r in curated + rejected}) == 520
    got = {r["url"]: None for r in curated}
    got.update({r["url"]: (r["stage"], r["reason"]) for r in rejected})
    wrong = {u: (expected[u], got.get(u)) for u in expected if expected[u] != got.get(u)}
    assert not wrong, list(wrong.items())[:10]
    for r in rejected:
        assert r["detail"] is not None
    assert sum(stats["rejected_by"]["download"].values()) == sum(1 for v in expected.values() if v and v[0] == "download")


def test_curated_images_are_resized_jpegs_with_metadata(world):
    out, _, _, _ = world
    for r in pq.read_table(out / "curated").to_pylist():
        img = Image.open(io.BytesIO(r["image"]["bytes"]))  # the Hugging Face {bytes, path} image struct
        assert img.format == "JPEG" and img.mode == "RGB"
        assert (img.width, img.height) == (r["width"], r["height"])
        assert min(r["width"], r["height"]) == 128  # keep_ratio: shorter side = --image-size
        assert r["original_width"] >= r["width"] and len(r["sha256"]) == 64
        assert r["phash"] is None and r["orb_keypoints"] is None  # no dedup stage reads them: not computed
        if "coffee-exif" in r["url"]:  # EXIF orientation 6: portrait after rotation
            assert r["original_height"] > r["original_width"]
