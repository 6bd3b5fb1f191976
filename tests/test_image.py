"""Image stage: real photos in many formats, EXIF, modes, resize modes, bomb guard, corrupt bytes."""
import io
import struct
import time
import tracemalloc
import zlib

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from clip_curate.image import DecodeResize, ImageConfig, process_image
from clip_curate.options import ConfigError

skdata = pytest.importorskip("skimage.data")


def enc(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


ASTRONAUT = Image.fromarray(skdata.astronaut())          # 512 x 512 RGB
COFFEE = Image.fromarray(skdata.coffee())                # 600 x 400 RGB
CAMERA = Image.fromarray(skdata.camera())                # 512 x 512 L


@pytest.mark.parametrize("name,data", [
    ("jpeg", enc(COFFEE, "JPEG", quality=90)),
    ("png", enc(COFFEE, "PNG")),
    ("webp", enc(COFFEE, "WEBP", quality=80)),
    ("gif", enc(COFFEE.convert("P"), "GIF")),
    ("bmp", enc(COFFEE, "BMP")),
    ("tiff", enc(COFFEE, "TIFF")),
    ("cmyk-jpeg", enc(COFFEE.convert("CMYK"), "JPEG")),
    ("png16", enc(Image.fromarray((np.asarray(COFFEE.convert("L"), dtype=np.uint16) * 257)), "PNG")),
    ("la", enc(COFFEE.convert("LA"), "PNG")),
    ("rgba", enc(COFFEE.convert("RGBA"), "PNG")),
    ("grey-jpeg", enc(CAMERA, "JPEG")),
])
def test_formats_decode_to_rgb_jpeg(name, data):
    res = process_image(data, ImageConfig(image_size=200))
    assert res.reason is None, (name, res.detail)
    f = res.fields
    out = Image.open(io.BytesIO(f["image"]))
    assert out.format == "JPEG" and out.mode == "RGB"
    assert (f["original_width"], f["original_height"]) == (600, 400) or name == "grey-jpeg"
    assert min(f["width"], f["height"]) == 200 and (f["width"], f["height"]) == out.size
    assert len(f["sha256"]) == 64 and len(f["phash"]) == 16
    if name in ("jpeg", "png", "webp", "cmyk-jpeg", "tiff", "bmp"):  # colours survive the conversion
        ref = np.asarray(COFFEE.resize(out.size), dtype=np.float32)
        assert np.abs(np.asarray(out, dtype=np.float32) - ref).mean() < 20, name


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    res = process_image(enc(COFFEE, "JPEG", exif=exif, quality=95), ImageConfig(image_size=100))
    f = res.fields
    assert (f["original_width"], f["original_height"]) == (400, 600)
    out = np.asarray(Image.open(io.BytesIO(f["image"])), dtype=np.float32)
    ref = np.asarray(COFFEE.transpose(Image.Transpose.ROTATE_270).resize((f["width"], f["height"])), dtype=np.float32)
    assert np.abs(out - ref).mean() < 20


@pytest.mark.parametrize("mode,size,expected", [
    ("keep_ratio", 100, (150, 100)), ("center_crop", 100, (100, 100)), ("border", 100, (100, 100)),
    ("no", 100, (600, 400)), ("keep_ratio", 1000, (600, 400)),  # no upscaling unless asked
])
def test_resize_modes(mode, size, expected):
    f = process_image(enc(COFFEE, "JPEG"), ImageConfig(image_size=size, resize_mode=mode)).fields
    assert (f["width"], f["height"]) == expected
    if mode == "border":  # letterboxed: black bars top and bottom
        arr = np.asarray(Image.open(io.BytesIO(f["image"])))
        assert arr[:5].mean() < 10 and arr[-5:].mean() < 10 and arr[45:55].mean() > 30


def test_upscale_when_asked():
    f = process_image(enc(COFFEE, "JPEG"), ImageConfig(image_size=800, upscale=True)).fields
    assert (f["width"], f["height"]) == (1200, 800)


def _bomb(w=30000, h=30000):
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (w * 3 + 1) * 20)) + chunk(b"IEND", b""))


def test_decompression_bomb_rejected_without_decoding():
    tracemalloc.start()
    t0 = time.perf_counter()
    res = process_image(_bomb(), ImageConfig(max_pixels=50_000_000))
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert res.reason == "too_large_pixels" and "30000x30000" in res.detail
    assert elapsed < 0.5 and peak < 20_000_000  # 2.7 GB if it had been decoded


@pytest.mark.parametrize("data,reason", [
    (enc(COFFEE, "JPEG")[:3000], "decode_error"),
    (bytes(range(256)) * 20, "decode_error"),
    (b"", "empty_body"),
    (enc(COFFEE.resize((40, 30)), "JPEG"), "too_small"),
    (enc(COFFEE.resize((600, 100)), "JPEG"), "bad_aspect_ratio"),
])
def test_rejections(data, reason):
    res = process_image(data, ImageConfig(min_size=64, max_aspect_ratio=3.0))
    assert res.reason == reason and res.detail


def test_phash_stable_under_reencode_and_resize_and_distinct_across_photos():
    def ph(img):
        return int(process_image(enc(img, "JPEG", quality=70), ImageConfig()).fields["phash"], 16)
    a = ph(ASTRONAUT)
    assert bin(a ^ ph(ASTRONAUT.resize((300, 300)))).count("1") <= 6
    assert bin(a ^ ph(COFFEE)).count("1") > 16


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--jpeg-quality"):
        ImageConfig(jpeg_quality=0)
    with pytest.raises(ConfigError, match="--resize-mode"):
        ImageConfig(resize_mode="stretch")


def test_decode_resize_transform_in_a_pipeline():
    rows = [{"uid": "ok", "image_bytes": enc(COFFEE, "JPEG")}, {"uid": "bad", "image_bytes": b"xx" * 100}]
    with beam.Pipeline() as p:
        kept, rejected = p | beam.Create(rows) | DecodeResize(ImageConfig(image_size=64))
        assert_that(kept | "k" >> beam.Map(lambda r: (r["uid"], r["width"], "image_bytes" in r)),
                    equal_to([("ok", 96, False)]), label="kept")
        assert_that(rejected | "r" >> beam.Map(lambda r: (r["uid"], r["stage"], r["reason"])),
                    equal_to([("bad", "image", "decode_error")]), label="rejected")
