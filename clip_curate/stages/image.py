"""Decode, validate and resize downloaded images; re-encode as JPEG.

Pure core: ``process_image(raw, cfg)`` returns the stored-image fields or a (reason, detail) rejection.
Order: header-only open (format, dimensions; the decompression-bomb guard runs here, before any pixel is
decoded and before the EXIF block is read) -> decode (JPEG: libjpeg-turbo via simplejpeg with DCT scaling
straight to >= the target size; other formats and JPEGs simplejpeg refuses: Pillow with ``draft``) -> EXIF
orientation -> RGB -> resize (img2dataset's modes, OpenCV) -> JPEG encode.
``DecodeResize`` is the thin Beam wrapper.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from clip_curate.fields import ConfigError, opt
from clip_curate.stages.base import IMAGE, RAW_IMAGE, RowFilter, RowStage, Stage, Verdict, register

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
# Formats Pillow may open: the web's raster formats. Exotic plugins (EPS runs Ghostscript, PSD, ICO...) stay
# off: a body in any other format is a decode_error.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_EXIF_ORIENTATION = 0x0112
_BORDER_FILL = 255  # img2dataset pads ``border`` mode with white


@dataclass(frozen=True)
class ImageConfig:
    """How downloaded images are validated and resized."""

    image_size: int = opt(256, "target size in pixels (see --resize-mode)")
    resize_mode: str = opt("keep_ratio", "no: keep the size; keep_ratio: shorter side = --image-size; center_crop: "
                                         "shorter side = --image-size, then a centred square crop; border: longer "
                                         "side = --image-size, then white padding to a square (img2dataset's modes)",
                           choices=RESIZE_MODES)
    upscale: bool = opt(False, "also enlarge images smaller than --image-size (off: they are kept at their size, "
                               "like img2dataset's --resize_only_if_bigger)")
    min_size: int = opt(0, "reject images whose shorter original side is below this many pixels (too_small; 0 = off)")
    max_aspect_ratio: float = opt(0.0, "reject images whose long/short side ratio exceeds this (bad_aspect_ratio; "
                                       "0 = off)")
    max_pixels: int = opt(89_478_485, "decompression-bomb guard: reject images whose header declares more pixels "
                                      "(too_large_pixels), without decoding them")
    jpeg_quality: int = opt(95, "JPEG quality of stored images (1-100)")

    def __post_init__(self):
        if self.image_size < 8:
            raise ConfigError(f"--image-size: must be >= 8, got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"--resize-mode: must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"--jpeg-quality: must be 1..100, got {self.jpeg_quality}")
        if self.max_pixels < 1:
            raise ConfigError(f"--max-pixels: must be >= 1, got {self.max_pixels}")
        if self.min_size < 0:
            raise ConfigError(f"--min-size: must be >= 0 (0 = off), got {self.min_size}")
        if self.max_aspect_ratio != 0 and self.max_aspect_ratio < 1:
            raise ConfigError(f"--max-aspect-ratio: must be >= 1 (long/short side) or 0 = off, "
                              f"got {self.max_aspect_ratio}")


@dataclass
class ImageResult:
    """Either ``fields`` (the stored-image fields) or a rejection ``reason`` with its ``detail``."""

    fields: dict[str, Any] | None = None
    reason: str | None = None
    detail: str = ""


def _reject(reason: str, detail: str) -> ImageResult:
    return ImageResult(reason=reason, detail=detail)


_OPEN_FORMATS: tuple[str, ...] | None = None


def _open_formats() -> tuple[str, ...]:
    global _OPEN_FORMATS
    if _OPEN_FORMATS is None:
        Image.init()  # registers every plugin; Image.open(formats=...) needs the ones we name loaded
        _OPEN_FORMATS = tuple(f for f in FORMATS if f in Image.OPEN)
    return _OPEN_FORMATS


def open_header(raw: bytes, max_pixels: int = 89_478_485) -> Image.Image:
    """Open ``raw`` lazily: parses the header, decodes no pixels. Raises on unreadable bytes."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and max_pixels > limit:
        # Pillow raises its own DecompressionBombError above 2x its limit; ours must be the one that decides.
        Image.MAX_IMAGE_PIXELS = max_pixels
    return Image.open(io.BytesIO(raw), formats=_open_formats())


def exif_orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8) of a lazily opened image; 1 when absent or unreadable. Decodes no pixels."""
    if img.format == "TIFF":
        return 1  # Pillow's TIFF plugin reports the displayed size and applies the orientation on load
    try:
        # PngImageFile.getexif() decodes the whole image to look for a trailing eXIf chunk: use the base
        # method, which reads the chunks seen before the pixel data only.
        exif = Image.Image.getexif(img)
        value = int(exif.get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block never fails the image
        return 1
    return value if 1 <= value <= 8 else 1


def output_size(width: int, height: int, cfg: ImageConfig) -> tuple[int, int] | None:
    """Size the resize step scales an (oriented) ``width`` x ``height`` image to, before any crop or padding.

    Like img2dataset: ``keep_ratio``/``center_crop`` scale the shorter side, ``border`` the longer side, to
    ``image_size``. None: the image is kept exactly as it is (mode ``no``, or smaller than the target and
    no ``upscale``: no crop, no padding either).
    """
    if cfg.resize_mode == "no":
        return None
    side = max(width, height) if cfg.resize_mode == "border" else min(width, height)
    if side < cfg.image_size and not cfg.upscale:
        return None
    scale = cfg.image_size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decode_jpeg_fast(raw: bytes, width: int, height: int, min_w: int, min_h: int) -> np.ndarray | None:
    """libjpeg-turbo decode of a ``width`` x ``height`` JPEG, DCT-scaled by 1/2, 1/4 or 1/8 while the result
    stays >= (min_w, min_h); None when simplejpeg declines. (Power-of-two factors only: libjpeg's other n/8
    factors are slower and measurably blurrier.)"""
    try:
        import simplejpeg
    except ImportError:
        return None
    factor = next((f for f in (8, 4, 2) if -(-width // f) >= min_w and -(-height // f) >= min_h), 1)
    try:
        if factor == 1:
            return simplejpeg.decode_jpeg(raw, colorspace="RGB", fastdct=True, fastupsample=True)
        return simplejpeg.decode_jpeg(raw, colorspace="RGB", fastdct=True, fastupsample=True,
                                      min_width=-(-width // factor), min_height=-(-height // factor))
    except (ValueError, RuntimeError):
        return None  # CMYK/YCCK, arithmetic coding, recoverable corruption...: Pillow decides


def _decode_pillow(img: Image.Image, min_w: int, min_h: int) -> np.ndarray:
    """Decode the first frame with Pillow (JPEG: ``draft`` DCT scaling) into an RGB uint8 array."""
    if img.format in ("JPEG", "MPO"):
        img.draft(img.mode if img.mode in ("CMYK", "L") else "RGB", (min_w, min_h))
    img.load()  # frame 0 of GIF / WebP / TIFF / MPO
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0  # 16-bit data, or 8-bit data in a wide mode
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # composite on white, as img2dataset does
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(img.convert("RGB"))


_ORIENT = {  # EXIF orientation -> the array transform PIL.ImageOps.exif_transpose applies
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1),
}


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip an HxWxC array as EXIF ``orientation`` says it is displayed."""
    fn = _ORIENT.get(orientation)
    return np.ascontiguousarray(fn(arr)) if fn else arr


def resize(arr: np.ndarray, cfg: ImageConfig, original: tuple[int, int] | None = None) -> np.ndarray:
    """img2dataset's resize modes on an RGB array.

    ``original`` is the (width, height) the image has at full resolution when ``arr`` was decoded smaller
    (DCT scaling): the output size is computed from it, so it does not depend on the decode shortcut.
    """
    import cv2

    h, w = arr.shape[:2]
    ow, oh = original or (w, h)
    target = output_size(ow, oh, cfg)
    if target is None:
        if (w, h) != (ow, oh):  # decoded smaller but no resize planned: cannot happen with our decode sizes
            arr = cv2.resize(arr, (ow, oh), interpolation=cv2.INTER_LANCZOS4)
        return arr
    if target != (w, h):
        ratio = min(w / target[0], h / target[1])
        # >= 2x: area averaging (no aliasing). Below 2x (the usual case after DCT-scaled decoding): bicubic,
        # as sharp and ~8x faster than OpenCV's area path at non-integer factors. Upscaling: Lanczos.
        interp = cv2.INTER_AREA if ratio >= 2 else cv2.INTER_CUBIC if ratio > 1 else cv2.INTER_LANCZOS4
        arr = cv2.resize(arr, target, interpolation=interp)
    s = cfg.image_size
    h, w = arr.shape[:2]
    if cfg.resize_mode == "center_crop":
        x, y = (w - s) // 2, (h - s) // 2
        return np.ascontiguousarray(arr[y:y + s, x:x + s])
    if cfg.resize_mode == "border":
        canvas = np.full((s, s, 3), _BORDER_FILL, dtype=np.uint8)
        y, x = (s - h) // 2, (s - w) // 2
        canvas[y:y + h, x:x + w] = arr
        return canvas
    return arr


def encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    """RGB uint8 array -> baseline JPEG bytes (libjpeg-turbo via simplejpeg, Pillow if missing)."""
    try:
        import simplejpeg
    except ImportError:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=quality)
        return buf.getvalue()
    return simplejpeg.encode_jpeg(np.ascontiguousarray(arr), quality=quality, colorspace="RGB")


def phash_hex(arr: np.ndarray) -> str:
    """64-bit perceptual hash (``imagehash.phash``) of an RGB array, as 16 hex characters."""
    import imagehash

    return str(imagehash.phash(Image.fromarray(arr)))


def process_image(raw: bytes | None, cfg: ImageConfig) -> ImageResult:
    """Raw downloaded bytes -> stored-image fields, or a rejection (reason, detail).

    Fields: ``image`` (JPEG), ``width``, ``height`` (stored), ``original_width``, ``original_height``
    (as displayed, EXIF orientation applied), ``sha256`` (of ``raw``), ``phash`` (of the stored image).
    """
    if not raw:
        return _reject("empty_body", "0 bytes")
    try:
        img = open_header(raw, cfg.max_pixels)
    except Image.DecompressionBombError as exc:  # Pillow's own header check (> 2x its limit) came first
        return _reject("too_large_pixels", f"{exc} (--max-pixels {cfg.max_pixels})")
    except Exception as exc:  # unidentified format, truncated header
        return _reject("decode_error", f"{type(exc).__name__}: {exc}")
    w, h = img.size
    fmt = img.format or "unknown"
    if w * h > cfg.max_pixels:
        return _reject("too_large_pixels", f"{fmt} {w}x{h} = {w * h} pixels > --max-pixels {cfg.max_pixels}")
    if w < 1 or h < 1:
        return _reject("decode_error", f"{fmt}: invalid dimensions {w}x{h}")
    orientation = exif_orientation(img)
    ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # as displayed
    if min(ow, oh) < cfg.min_size:
        return _reject("too_small", f"{ow}x{oh}: shorter side < --min-size {cfg.min_size}")
    if cfg.max_aspect_ratio and max(ow, oh) / min(ow, oh) > cfg.max_aspect_ratio:
        return _reject("bad_aspect_ratio", f"{ow}x{oh}: aspect {max(ow, oh) / min(ow, oh):.2f} > "
                                           f"--max-aspect-ratio {cfg.max_aspect_ratio}")
    target = output_size(ow, oh, cfg)
    # Smallest decode that still has >= the target's pixels, in stored (pre-rotation) orientation.
    if target is None:
        min_w, min_h = w, h
    else:
        tw, th = (target[1], target[0]) if orientation in (5, 6, 7, 8) else target
        min_w, min_h = min(w, tw), min(h, th)
    try:
        arr = _decode_jpeg_fast(raw, w, h, min_w, min_h) if fmt in ("JPEG", "MPO") else None
        if arr is None:
            arr = _decode_pillow(img, min_w, min_h)
    except Image.DecompressionBombError as exc:
        return _reject("too_large_pixels", str(exc))
    except Exception as exc:  # truncated, corrupt, unsupported mode
        return _reject("decode_error", f"{fmt}: {type(exc).__name__}: {exc}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    out = resize(apply_orientation(arr, orientation), cfg, (ow, oh))
    return ImageResult(fields={
        "image": encode_jpeg(out, cfg.jpeg_quality),
        "width": int(out.shape[1]), "height": int(out.shape[0]),
        "original_width": int(ow), "original_height": int(oh),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "phash": phash_hex(out),
    })


class _DecodeResizeFn(RowFilter):
    stage = "image"

    def load(self):
        import cv2

        cv2.setNumThreads(1)  # one image per thread; Beam parallelises across threads and workers

    def judge(self, row):
        row = dict(row)  # never mutate an input element
        raw = row.pop("image_bytes", None)
        if raw is None:
            raw = row.get("image")  # pool rows that already hold an image
        result = process_image(raw, self.config)
        if result.reason:
            return Verdict(row, result.reason, result.detail)
        row.update(result.fields)
        return Verdict(row)


class DecodeResize(RowStage):
    """Rows with ``image_bytes`` -> ``(kept, rejected)``.

    Kept rows lose ``image_bytes`` and gain ``image`` (JPEG), ``width``, ``height``, ``original_width``,
    ``original_height``, ``sha256`` and ``phash``; rejected rows carry stage ``image`` and a reason from
    ``records.REASONS["image"]``. A row without ``image_bytes`` but with ``image`` (a pool) is re-processed.
    """

    def __init__(self, config: ImageConfig):
        super().__init__(_DecodeResizeFn(config), label="DecodeResize")


register(Stage("image", ImageConfig, build=lambda cfg, ctx: DecodeResize(cfg), position=30,
               provides=frozenset({IMAGE}), needs=frozenset({RAW_IMAGE}), auto=True,
               title="decode, validate, resize"))
