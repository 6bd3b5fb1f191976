"""Image stage: real photos in many formats and modes, EXIF, resize modes vs img2dataset, bomb guard, faults."""
import io
import os
import struct
import time
import zlib

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageFile, ImageOps
from skimage import data as skdata

from clip_curate import records
from clip_curate.stages.image import DecodeResize, ImageConfig, output_size, process_image
from clip_curate.fields import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the bombs are the point


def enc(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decoded(fields):
    return np.asarray(Image.open(io.BytesIO(fields["image"])).convert("RGB"), dtype=np.float32)


def close_to(fields, ref: Image.Image, tol=12.0):
    """Mean absolute difference of the stored image and ``ref`` resized to it, in 0..255 levels."""
    out = decoded(fields)
    want = np.asarray(ref.convert("RGB").resize((out.shape[1], out.shape[0]), Image.Resampling.BOX), dtype=np.float32)
    return float(np.abs(out - want).mean()) < tol


ASTRONAUT = Image.fromarray(skdata.astronaut())          # 512 x 512 RGB
COFFEE = Image.fromarray(skdata.coffee())                # 600 x 400 RGB
CHELSEA = Image.fromarray(skdata.chelsea())              # 451 x 300 RGB
CAMERA = Image.fromarray(skdata.camera())                # 512 x 512 greyscale


def _animated_gif():
    frames = [COFFEE.convert("P"), COFFEE.transpose(Image.Transpose.FLIP_TOP_BOTTOM).convert("P")]
    return enc(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _png16_rgb():
    import cv2
    bgr16 = np.asarray(COFFEE, dtype=np.uint16)[:, :, ::-1] * 257
    return cv2.imencode(".png", np.ascontiguousarray(bgr16))[1].tobytes()


def _p_transparent():
    p = COFFEE.convert("P")
    return enc(p, "PNG", transparency=0)


FORMATS = [  # (name, bytes, reference the output must look like)
    ("jpeg", enc(COFFEE, "JPEG", quality=90), COFFEE),
    ("progressive-jpeg", enc(COFFEE, "JPEG", quality=90, progressive=True), COFFEE),
    ("png", enc(COFFEE, "PNG"), COFFEE),
    ("webp", enc(COFFEE, "WEBP", quality=85), COFFEE),
    ("gif", enc(COFFEE.convert("P"), "GIF"), COFFEE),
    ("animated-gif-first-frame", _animated_gif(), COFFEE),
    ("bmp", enc(COFFEE, "BMP"), COFFEE),
    ("tiff", enc(COFFEE, "TIFF"), COFFEE),
    ("cmyk-jpeg", enc(COFFEE.convert("CMYK"), "JPEG", quality=90), COFFEE),
    ("png16-grey", enc(Image.fromarray(np.asarray(COFFEE.convert("L"), dtype=np.uint16) * 257), "PNG"),
     COFFEE.convert("L")),
    ("png16-rgb", _png16_rgb(), COFFEE),
    ("la-png", enc(COFFEE.convert("LA"), "PNG"), COFFEE.convert("L")),
    ("rgba-png", enc(COFFEE.convert("RGBA"), "PNG"), COFFEE),
    ("p-transparent-png", _p_transparent(), COFFEE),
    ("grey-jpeg-camera", enc(CAMERA, "JPEG"), CAMERA),
    ("chelsea-jpeg", enc(CHELSEA, "JPEG"), CHELSEA),
    ("astronaut-png", enc(ASTRONAUT, "PNG"), ASTRONAUT),
]


@pytest.mark.parametrize("name,data,ref", FORMATS, ids=[f[0] for f in FORMATS])
def test_real_photos_in_every_format_decode_to_rgb_jpeg(name, data, ref):
    res = process_image(data, ImageConfig(image_size=200))
    assert res.reason is None, (name, res.detail)
    f = res.fields
    out = Image.open(io.BytesIO(f["image"]))
    assert out.format == "JPEG" and out.mode == "RGB" and (f["width"], f["height"]) == out.size
    assert (f["original_width"], f["original_height"]) == ref.size
    assert min(f["width"], f["height"]) == 200
    assert round(f["width"] / f["height"], 1) == round(ref.size[0] / ref.size[1], 1)
    assert len(f["sha256"]) == 64 and f["sha256"] == __import__("hashlib").sha256(data).hexdigest()
    assert len(f["phash"]) == 16 and int(f["phash"], 16) >= 0
    assert close_to(f, ref, tol=14 if "gif" in name or "p-" in name else 8), name


def test_transparent_pixels_become_white():
    rgba = np.zeros((300, 300, 4), dtype=np.uint8)  # fully transparent black
    f = process_image(enc(Image.fromarray(rgba), "PNG"), ImageConfig()).fields
    assert decoded(f).min() > 250


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_on_jpeg_fast_path(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = enc(COFFEE, "JPEG", exif=exif, quality=95)
    f = process_image(data, ImageConfig(image_size=200)).fields
    want = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert (f["original_width"], f["original_height"]) == want.size
    assert (f["width"], f["height"]) == ((300, 200) if orientation < 5 else (200, 300))
    assert close_to(f, want, tol=6)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_orientation_applied_on_other_formats(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    f = process_image(enc(COFFEE, fmt, exif=exif), ImageConfig(image_size=200)).fields
    assert (f["original_width"], f["original_height"], f["width"], f["height"]) == (400, 600, 200, 300)
    assert close_to(f, COFFEE.transpose(Image.Transpose.ROTATE_270), tol=6)


@pytest.mark.parametrize("mode,size,expected", [
    ("keep_ratio", 100, (150, 100)), ("center_crop", 100, (100, 100)), ("border", 100, (100, 100)),
    ("no", 100, (600, 400)),
    ("keep_ratio", 1000, (600, 400)), ("center_crop", 500, (600, 400)), ("border", 700, (600, 400)),  # no upscaling
    ("center_crop", 400, (400, 400)), ("border", 600, (600, 600)),  # equal side: crop / pad, no scaling
])
def test_resize_mode_output_sizes(mode, size, expected):
    f = process_image(enc(COFFEE, "JPEG"), ImageConfig(image_size=size, resize_mode=mode)).fields
    assert (f["width"], f["height"]) == expected
    assert (f["original_width"], f["original_height"]) == (600, 400)


def test_border_pads_white_and_center_crop_keeps_the_centre():
    f = process_image(enc(COFFEE, "PNG"), ImageConfig(image_size=120, resize_mode="border")).fields
    arr = decoded(f)  # 120 x 80 photo, 20 px white bars top and bottom
    assert arr[:18].min() > 245 and arr[-18:].min() > 245
    photo = np.asarray(COFFEE.resize((120, 80), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(arr[20:100] - photo).mean() < 8
    f = process_image(enc(COFFEE, "PNG"), ImageConfig(image_size=200, resize_mode="center_crop")).fields
    assert close_to(f, COFFEE.crop((100, 0, 500, 400)), tol=8)


@pytest.mark.parametrize("photo,size", [(ASTRONAUT, 100), (ASTRONAUT, 256), (COFFEE, 128), (CHELSEA, 200)])
def test_dct_scaled_fast_path_matches_a_full_lanczos_resize(photo, size):
    data = enc(photo, "JPEG", quality=95)
    f = process_image(data, ImageConfig(image_size=size, jpeg_quality=95)).fields
    ref = Image.open(io.BytesIO(data)).convert("RGB").resize((f["width"], f["height"]), Image.Resampling.LANCZOS)
    mse = float(np.mean((decoded(f) - np.asarray(ref, dtype=np.float32)) ** 2))
    assert 10 * np.log10(255 ** 2 / mse) > 30  # dB


def test_upscale_only_when_asked():
    f = process_image(enc(CHELSEA, "JPEG"), ImageConfig(image_size=600, upscale=True)).fields
    assert (f["width"], f["height"]) == (902, 600) and close_to(f, CHELSEA, tol=8)
    f = process_image(enc(CHELSEA, "JPEG"), ImageConfig(image_size=600)).fields
    assert (f["width"], f["height"]) == (451, 300)


def test_sizes_match_img2dataset_resizer():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would look for updates online
    from img2dataset import resizer as resizer_mod

    rng = np.random.default_rng(0)
    for mode in ("keep_ratio", "center_crop", "border"):
        i2d = resizer_mod.Resizer(image_size=256, resize_mode=mode, resize_only_if_bigger=True)
        for w, h in [(777, 513), (900, 301), (1023, 1025), (513, 777), (300, 255), (255, 300), (100, 50)]:
            data = enc(Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)), "JPEG")
            _, width, height, ow, oh, err = i2d(io.BytesIO(data))
            f = process_image(data, ImageConfig(image_size=256, resize_mode=mode)).fields
            assert err is None
            assert (f["width"], f["height"], f["original_width"], f["original_height"]) == (width, height, ow, oh), \
                (mode, w, h)


def _png_header_bomb(w, h, idat=b"\x00" * 1000):
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(idat)) + chunk(b"IEND", b""))


@pytest.fixture
def decodes(monkeypatch):
    """Records the format of every image Pillow decodes (a spy: Pillow still decodes)."""
    seen = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        seen.append(self.format)
        return real_load(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return seen


@pytest.mark.parametrize("w,h,max_pixels,shown", [
    (30000, 30000, 50_000_000, "900000000"),      # far beyond Pillow's own limit too
    (12000, 12000, 50_000_000, "12000x12000"),    # within Pillow's limit, beyond ours
])
def test_decompression_bomb_rejected_without_decoding(decodes, w, h, max_pixels, shown):
    t0 = time.perf_counter()
    res = process_image(_png_header_bomb(w, h), ImageConfig(max_pixels=max_pixels))
    assert res.reason == "too_large_pixels" and shown in res.detail and "--max-pixels" in res.detail
    assert time.perf_counter() - t0 < 0.5 and decodes == []


def test_real_zlib_bomb_is_never_inflated(decodes):
    # 4000 x 4000 of zeros: a 16 MB image in a ~16 KB file. The guard must stop it before Pillow inflates it;
    # the same file under a higher limit is decoded, proving the spy sees a decode.
    bomb = _png_header_bomb(4000, 4000, idat=b"\x00" * (4001 * 4000))
    assert len(bomb) < 50_000
    assert process_image(bomb, ImageConfig(max_pixels=10_000_000)).reason == "too_large_pixels"
    assert decodes == []
    assert process_image(bomb, ImageConfig(max_pixels=20_000_000)).reason is None
    assert decodes and set(decodes) == {"PNG"}


@pytest.mark.parametrize("name,data,reason", [
    ("truncated-jpeg", enc(COFFEE, "JPEG")[:3000], "decode_error"),
    ("truncated-png", enc(COFFEE, "PNG")[:5000], "decode_error"),
    ("random-bytes", np.random.default_rng(1).bytes(5000), "decode_error"),
    ("html", b"<!doctype html><html><body>not an image</body></html>", "decode_error"),
    ("eps-never-runs-ghostscript", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n", "decode_error"),
    ("empty", b"", "empty_body"),
    ("small", enc(COFFEE.resize((60, 40)), "JPEG"), "too_small"),
    ("panorama", enc(COFFEE.resize((600, 100)), "JPEG"), "bad_aspect_ratio"),
])
def test_rejections(name, data, reason):
    res = process_image(data, ImageConfig(min_size=64, max_aspect_ratio=3.0))
    assert res.fields is None and res.reason == reason and res.detail, name
    assert reason in records.REASONS["image"]


def test_min_size_and_aspect_use_displayed_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    tall = enc(COFFEE.resize((600, 150)), "JPEG", exif=exif)  # displayed 150 x 600
    res = process_image(tall, ImageConfig(max_aspect_ratio=3.0))
    assert res.reason == "bad_aspect_ratio" and res.detail.startswith("150x600")


def test_phash_stable_under_reencode_and_resize_distinct_across_photos():
    def ph(data):
        return int(process_image(data, ImageConfig()).fields["phash"], 16)

    def dist(a, b):
        return bin(a ^ b).count("1")
    for photo in (ASTRONAUT, COFFEE, CHELSEA):
        a = ph(enc(photo, "PNG"))
        assert dist(a, ph(enc(photo, "JPEG", quality=60))) <= 6
        assert dist(a, ph(enc(photo.resize((photo.width * 3 // 4, photo.height * 3 // 4)), "JPEG"))) <= 6
        assert dist(a, ph(enc(photo, "WEBP", quality=70))) <= 6
    hashes = [ph(enc(p, "JPEG")) for p in (ASTRONAUT, COFFEE, CHELSEA, CAMERA)]
    assert min(dist(x, y) for i, x in enumerate(hashes) for y in hashes[i + 1:]) > 16


def test_output_size_is_img2dataset_rounding():
    cfg = ImageConfig(image_size=256)
    assert output_size(777, 513, cfg) == (388, 256)
    assert output_size(200, 100, cfg) is None
    assert output_size(200, 100, ImageConfig(image_size=256, upscale=True)) == (512, 256)
    assert output_size(900, 300, ImageConfig(image_size=256, resize_mode="border")) == (256, 85)


@pytest.mark.parametrize("kwargs,flag", [
    ({"jpeg_quality": 0}, "--jpeg-quality"), ({"resize_mode": "stretch"}, "--resize-mode"),
    ({"image_size": 4}, "--image-size"), ({"max_pixels": 0}, "--max-pixels"),
    ({"min_size": -1}, "--min-size"), ({"max_aspect_ratio": 0.5}, "--max-aspect-ratio"),
])
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match="^" + flag):
        ImageConfig(**kwargs)


def test_decode_resize_transform_in_a_pipeline():
    rows = [{"uid": "ok", "url": "u1", "image_bytes": enc(COFFEE, "JPEG")},
            {"uid": "bad", "url": "u2", "image_bytes": b"xx" * 100},
            {"uid": "small", "url": "u3", "image_bytes": enc(CHELSEA.resize((45, 30)), "PNG")},
            {"uid": "bomb", "url": "u4", "image_bytes": _png_header_bomb(12000, 12000)}]
    p = beam.Pipeline()
    kept, rejected = p | beam.Create(rows) | DecodeResize(ImageConfig(image_size=64, min_size=32))
    assert_that(kept | "k" >> beam.Map(lambda r: (r["uid"], r["width"], r["height"], "image_bytes" in r,
                                                  r["image"][:2])),
                equal_to([("ok", 96, 64, False, b"\xff\xd8")]), label="kept")
    assert_that(rejected | "r" >> beam.Map(lambda r: (r["uid"], r["stage"], r["reason"], "image_bytes" in r)),
                equal_to([("bad", "image", "decode_error", False), ("small", "image", "too_small", False),
                          ("bomb", "image", "too_large_pixels", False)]), label="rejected")
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace(records.METRICS_NAMESPACE))["counters"]}
    assert counters["image_in"] == 4 and counters["image_out"] == 1
    assert counters["image_decode_error"] == counters["image_too_small"] == counters["image_too_large_pixels"] == 1
