"""Decode, validate and resize downloaded images; re-encode as JPEG.

Pure core: ``process_image(raw, cfg)`` returns the stored-image fields or a (reason, detail) rejection.
Order: header-only probe (format, dimensions; the decompression-bomb guard runs here, before any pixel is
decoded) -> decode (JPEG: libjpeg-turbo via simplejpeg with DCT scaling straight to >= the target size;
other formats: Pillow with ``draft``/``reducing_gap``) -> EXIF orientation -> RGB -> resize (img2dataset's
modes) -> JPEG encode. ``DecodeResize`` is the thin Beam wrapper.
"""
from __future__ import annotations

import hashlib
import io
import time
import warnings
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from PIL import Image, ImageOps

from clip_curate import records
from clip_curate.options import ConfigError, opt

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageConfig:
    """How downloaded images are validated and resized."""

    image_size: int = opt(256, "target size in pixels (see --resize-mode)")
    resize_mode: str = opt("keep_ratio", "no: keep as is; keep_ratio: shorter side = image size; center_crop: "
                                         "shorter side = image size, then a centred square crop; border: fit "
                                         "inside a square with black borders (img2dataset semantics)",
                           choices=RESIZE_MODES)
    upscale: bool = opt(False, "also enlarge images smaller than --image-size")
    min_size: int = opt(0, "reject images whose shorter original side is below this (too_small)")
    max_aspect_ratio: float = opt(0.0, "reject images whose long/short side ratio exceeds this (0 = off)")
    max_pixels: int = opt(89_478_485, "decompression-bomb guard: reject images declaring more pixels "
                                      "(too_large_pixels) without decoding them")
    jpeg_quality: int = opt(95, "JPEG quality of stored images (1-100)")

    def __post_init__(self):
        if self.image_size < 8:
            raise ConfigError(f"--image-size must be >= 8, got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"--jpeg-quality must be 1..100, got {self.jpeg_quality}")
        if self.max_pixels < 1:
            raise ConfigError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if self.min_size < 0 or self.max_aspect_ratio < 0:
            raise ConfigError("--min-size and --max-aspect-ratio must be >= 0")


@dataclass
class ImageResult:
    fields: dict[str, Any] | None = None
    reason: str | None = None
    detail: str = ""


def _reject(reason: str, detail: str) -> ImageResult:
    return ImageResult(reason=reason, detail=detail)


def probe(raw: bytes) -> tuple[str, int, int, int]:
    """(format, width, height, EXIF orientation) from the header only; raises on unreadable bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own guard reports the size
        try:
            img = Image.open(io.BytesIO(raw))  # lazy: reads the header, decodes no pixels
        finally:
            Image.MAX_IMAGE_PIXELS = saved
        orientation = 1
        try:
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
        except Exception:  # broken EXIF never fails the image
            orientation = 1
        return img.format or "", img.width, img.height, orientation


def _target_decode_size(w: int, h: int, cfg: ImageConfig) -> tuple[int, int]:
    """Smallest (w, h) the decoder may produce so the resize still has >= target pixels."""
    if cfg.resize_mode == "no":
        return w, h
    s = cfg.image_size
    if cfg.resize_mode == "border":
        scale = s / max(w, h)
    else:
        scale = s / min(w, h)
    return max(1, int(w * scale)), max(1, int(h * scale))


def _decode_jpeg_fast(raw: bytes, w: int, h: int, cfg: ImageConfig) -> np.ndarray | None:
    try:
        import simplejpeg
    except ImportError:
        return None
    tw, th = _target_decode_size(w, h, cfg)
    try:
        return simplejpeg.decode_jpeg(raw, colorspace="RGB", fastdct=True, fastupsample=True,
                                      min_width=tw, min_height=th)
    except (ValueError, RuntimeError):
        return None  # CMYK, progressive oddities...: Pillow fallback decides


def _decode_pillow(raw: bytes, w: int, h: int, cfg: ImageConfig) -> np.ndarray:
    img = Image.open(io.BytesIO(raw))
    if img.format == "JPEG":
        tw, th = _target_decode_size(w, h, cfg)
        img.draft("RGB" if img.mode != "CMYK" else "CMYK", (tw, th))
    img.seek(0)  # first frame of GIF/WebP/TIFF animations
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"))


_ORIENT = {  # EXIF orientation -> the array transform Pillow's exif_transpose applies
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1),
}


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    fn = _ORIENT.get(orientation)
    return np.ascontiguousarray(fn(arr)) if fn else arr


def resize(arr: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """img2dataset's resize modes on an RGB array (cv2 INTER_AREA for shrinking)."""
    import cv2

    h, w = arr.shape[:2]
    s = cfg.image_size
    if cfg.resize_mode == "no":
        return arr

    def scaled(scale: float) -> np.ndarray:
        if scale >= 1.0 and not cfg.upscale:
            return arr
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        return cv2.resize(arr, (nw, nh), interpolation=interp)

    if cfg.resize_mode == "keep_ratio":
        return scaled(s / min(w, h))
    if cfg.resize_mode == "center_crop":
        out = scaled(s / min(w, h))
        oh, ow = out.shape[:2]
        cw, ch = min(ow, s), min(oh, s)
        x, y = (ow - cw) // 2, (oh - ch) // 2
        return np.ascontiguousarray(out[y:y + ch, x:x + cw])
    # border: fit inside s x s, pad with black to a square
    out = scaled(s / max(w, h))
    oh, ow = out.shape[:2]
    side = max(s, oh, ow) if cfg.upscale or max(oh, ow) >= s else max(oh, ow)
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    y, x = (side - oh) // 2, (side - ow) // 2
    canvas[y:y + oh, x:x + ow] = out
    return canvas


def encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    try:
        import simplejpeg
        return simplejpeg.encode_jpeg(np.ascontiguousarray(arr), quality=quality, colorspace="RGB")
    except ImportError:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=quality)
        return buf.getvalue()


def phash_hex(arr: np.ndarray) -> str:
    """64-bit perceptual hash (imagehash pHash) as 16 hex characters."""
    import imagehash

    return str(imagehash.phash(Image.fromarray(arr)))


def process_image(raw: bytes | None, cfg: ImageConfig) -> ImageResult:
    """Raw downloaded bytes -> stored image fields, or a rejection (reason, detail)."""
    if not raw:
        return _reject("empty_body", "0 bytes")
    try:
        fmt, w, h, orientation = probe(raw)
    except (Image.DecompressionBombError,) as exc:
        return _reject("too_large_pixels", str(exc)[:200])
    except Exception as exc:  # unidentifiable / truncated header
        return _reject("decode_error", f"{type(exc).__name__}: {exc}"[:300])
    if w * h > cfg.max_pixels:
        return _reject("too_large_pixels", f"{w}x{h} = {w * h} pixels > --max-pixels {cfg.max_pixels}")
    if w < 1 or h < 1:
        return _reject("decode_error", f"invalid dimensions {w}x{h}")
    arr = None
    try:
        if fmt == "JPEG":
            arr = _decode_jpeg_fast(raw, w, h, cfg)
        if arr is None:
            arr = _decode_pillow(raw, w, h, cfg)
    except Image.DecompressionBombError as exc:
        return _reject("too_large_pixels", str(exc)[:200])
    except Exception as exc:  # truncated, corrupt, unsupported
        return _reject("decode_error", f"{fmt or 'unknown'}: {type(exc).__name__}: {exc}"[:300])
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    arr = _apply_orientation(arr, orientation)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if min(w, h) < cfg.min_size:
        return _reject("too_small", f"{w}x{h}: shorter side < --min-size {cfg.min_size}")
    if cfg.max_aspect_ratio and max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        return _reject("bad_aspect_ratio", f"{w}x{h}: aspect {max(w, h) / min(w, h):.2f} > "
                                           f"--max-aspect-ratio {cfg.max_aspect_ratio}")
    out = resize(arr, cfg)
    return ImageResult(fields={
        "image": encode_jpeg(out, cfg.jpeg_quality),
        "width": int(out.shape[1]), "height": int(out.shape[0]),
        "original_width": int(w), "original_height": int(h),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "phash": phash_hex(out),
    })


class _DecodeResizeFn(beam.DoFn):
    def __init__(self, cfg: ImageConfig):
        self._cfg = cfg
        ns = records.METRICS_NAMESPACE
        self._in = beam.metrics.Metrics.counter(ns, "image_in")
        self._out = beam.metrics.Metrics.counter(ns, "image_out")
        self._msecs = beam.metrics.Metrics.distribution(ns, "image_msecs")
        self._reasons = {r: beam.metrics.Metrics.counter(ns, f"image_{r}") for r in records.REASONS["image"]}

    def setup(self):
        Image.MAX_IMAGE_PIXELS = max(self._cfg.max_pixels, Image.MAX_IMAGE_PIXELS or 0)
        import cv2
        cv2.setNumThreads(1)  # one decode per worker thread; Beam parallelises across workers

    def process(self, row):
        self._in.inc()
        t0 = time.perf_counter()
        raw = row.pop("image_bytes", None)
        result = process_image(raw, self._cfg)
        self._msecs.update(int((time.perf_counter() - t0) * 1000))
        if result.reason:
            self._reasons[result.reason].inc()
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG,
                                           records.reject(row, "image", result.reason, result.detail))
            return
        self._out.inc()
        row.update(result.fields)
        yield row


class DecodeResize(beam.PTransform):
    """rows with ``image_bytes`` -> (kept rows with image/width/height/original_*/sha256/phash, rejected)."""

    def __init__(self, config: ImageConfig):
        super().__init__()
        self._config = config

    def expand(self, rows):
        out = rows | "DecodeResize" >> beam.ParDo(_DecodeResizeFn(self._config)).with_outputs(
            records.REJECTED_TAG, main="rows")
        return out.rows, out[records.REJECTED_TAG]
