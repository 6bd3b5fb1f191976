"""Decode, validate and resize downloaded images; re-encode as JPEG.

Pure core: ``process_image(raw, cfg, budget)`` returns the stored-image fields or a (reason, detail) rejection.
Order: header-only open (format, dimensions; the decompression-bomb guard runs here, before any pixel is
decoded and before the EXIF block is read) -> decode plan (the smallest decode that still covers the target:
JPEG DCT scaling, else the full image; its peak memory is known from the header, and a plan that would not fit
the worker's decode budget is rejected here) -> decode under the worker's :class:`PixelBudget` (JPEG:
libjpeg-turbo via simplejpeg with DCT scaling straight to >= the target size; other formats and JPEGs
simplejpeg refuses: Pillow with ``draft``, then converted and box-reduced strip by strip, so the full-size
image is the only full-size buffer) -> EXIF orientation -> RGB -> resize (img2dataset's modes, OpenCV) ->
JPEG encode, pHash and ORB keypoints of the stored image. ``DecodeResize`` is the thin Beam wrapper.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from PIL import Image

from clip_curate.fields import ConfigError, opt
from clip_curate.process_cache import ProcessCache, trim_heap
from clip_curate.stages.base import IMAGE, RAW_IMAGE, RowFilter, RowStage, Stage, Verdict, register

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
# Formats Pillow may open: the web's raster formats. Exotic plugins (EPS runs Ghostscript, PSD, ICO...) stay
# off: a body in any other format is a decode_error.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_EXIF_ORIENTATION = 0x0112
_BORDER_FILL = 255  # img2dataset pads ``border`` mode with white

#: Default pixels decoded at once per worker process (2**27, 4 bytes each: 512 MiB of decode buffers).
DECODE_PIXEL_BUDGET = 1 << 27
#: Budget pixels a decode needs besides the image itself at most: conversion strips and the reduced copies (8 MiB).
DECODE_RESERVE_PIXELS = 1 << 21
#: Default ``--max-pixels``: the largest RGB image (4 bytes/px in Pillow) whose decode fits the default budget
#: alone, 132,120,576 pixels (about 11,494 x 11,494).
MAX_PIXELS = DECODE_PIXEL_BUDGET - DECODE_RESERVE_PIXELS
#: ORB keypoints kept per stored image for near-duplicate dedup (``--orb-keypoints``).
ORB_KEYPOINTS = 128


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
    max_pixels: int = opt(MAX_PIXELS, "decompression-bomb guard: reject images whose header declares more "
                                      "pixels (too_large_pixels), without decoding them (default: the largest RGB "
                                      "image whose decode fits the default --decode-pixel-budget)")
    decode_pixel_budget: int = opt(DECODE_PIXEL_BUDGET, "pixels (4 bytes each) being decoded at once per worker "
                                                        "process, all its threads together: a decode waits for "
                                                        "room, and an image whose decode alone needs more is "
                                                        "rejected too_large_pixels before decoding")
    jpeg_quality: int = opt(95, "JPEG quality of stored images (1-100)")
    orb_keypoints: int = opt(ORB_KEYPOINTS, "ORB keypoints stored per image (orb_keypoints column) for near-"
                                            "duplicate dedup that survives crops and small rotations (0 = off: "
                                            "near dedup then compares pHashes only)")

    def __post_init__(self):
        if self.image_size < 8:
            raise ConfigError(f"--image-size: must be >= 8, got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"--resize-mode: must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"--jpeg-quality: must be 1..100, got {self.jpeg_quality}")
        if self.max_pixels < 1:
            raise ConfigError(f"--max-pixels: must be >= 1, got {self.max_pixels}")
        if self.decode_pixel_budget < 1 << 20:
            raise ConfigError(f"--decode-pixel-budget: must be >= 1048576 (1 Mpx), got {self.decode_pixel_budget}")
        if not 0 <= self.orb_keypoints <= 1024:
            raise ConfigError(f"--orb-keypoints: must be 0..1024 (0 = off), got {self.orb_keypoints}")
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


# ---------------------------------------------------------------------------------------------
# Decode memory: the plan (known from the header), the per-worker budget, the decoders

#: Bytes per pixel of a decoded Pillow image by mode (Pillow keeps multi-band 8-bit modes in 4 bytes).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
#: Extra bytes per pixel the Pillow decoder of a format holds besides the image: WebP goes through libwebp's
#: animation decoder (its canvas and previous-frame RGBA buffers, then a bytes copy: 12), AVIF returns an RGBA
#: frame that is copied in (6: measured 9.2 bytes/px in all). Measured by ``bench/decode_memory.py --formats``.
_DECODER_EXTRA = {"WEBP": 12, "AVIF": 6}
_STRIP_PIXELS = 1 << 18  # conversion tiles: about 256 Kpx
_STRIP_BYTES_PER_PX = 20  # a tile's temporaries (crop, RGBA, white, composite, RGB; 4 bytes/px each)
_REDUCED_BYTES_PER_PX = 6  # the reduced RGB array and one copy of it (orientation, grey -> RGB)


@dataclass(frozen=True)
class DecodePlan:
    """How one image is decoded: ``factor`` (JPEG DCT scale 1/2/4/8, or the integer box reduction applied
    strip by strip for other formats), ``peak_bytes``, the full-size buffers the decode holds at once, and of
    those ``coefficient_bytes``, a progressive JPEG's whole-image DCT coefficients (0 otherwise)."""

    factor: int
    peak_bytes: int
    coefficient_bytes: int = 0

    @property
    def pixels(self) -> int:
        """The plan's cost in budget pixels (4 bytes each)."""
        return -(-self.peak_bytes // 4)


def _jpeg_coefficient_bytes(img: Image.Image, width: int, height: int) -> int:
    """Bytes libjpeg buffers for a progressive JPEG's DCT coefficients (the whole image, whatever the scale)."""
    layers = getattr(img, "layer", None) or [("", 1, 1, 0)] * max(1, len(img.getbands()))
    hmax = max(lay[1] for lay in layers) or 1
    vmax = max(lay[2] for lay in layers) or 1
    blocks = sum(-(-(width * lay[1] // hmax) // 8) * -(-(height * lay[2] // vmax) // 8) for lay in layers)
    return blocks * 64 * 2


def plan_decode(img: Image.Image, width: int, height: int, min_w: int, min_h: int) -> DecodePlan:
    """The smallest decode of a lazily opened ``width`` x ``height`` image that still covers ``min_w`` x ``min_h``,
    and the memory it needs at its peak, from the header alone.

    JPEG: DCT scaling by 1/2, 1/4 or 1/8 while the result stays >= the minimum (power-of-two factors only:
    libjpeg's other n/8 factors are slower and measurably blurrier); the decoded image at that scale (4 bytes/px
    when Pillow decodes it), plus the whole-image coefficient buffer of a progressive JPEG. Other formats cannot
    decode smaller: the full image in Pillow's mode (1, 2 or 4 bytes/px; the WebP and AVIF decoders hold 12 and
    6 more), converted and reduced tile by tile by the integer factor that keeps >= the minimum. Both: a tile's
    temporaries and the reduced RGB array with one copy (6 bytes per reduced pixel; at factor 1 that is
    the full size).
    """
    coefficients = 0
    if img.format in ("JPEG", "MPO"):
        factor = next((f for f in (8, 4, 2) if -(-width // f) >= min_w and -(-height // f) >= min_h), 1)
        if img.info.get("progressive") or img.info.get("progression"):
            coefficients = _jpeg_coefficient_bytes(img, width, height)
        image = -(-width // factor) * -(-height // factor) * 4 + coefficients
    else:
        factor = max(1, min(width // max(min_w, 1), height // max(min_h, 1)))
        image = width * height * (_MODE_BYTES.get(img.mode, 4) + _DECODER_EXTRA.get(img.format, 0))
    reduced = -(-width // factor) * -(-height // factor)
    tile = min(width * height, max(_STRIP_PIXELS, factor * factor))
    return DecodePlan(factor, image + tile * _STRIP_BYTES_PER_PX + reduced * _REDUCED_BYTES_PER_PX, coefficients)


#: A decoded buffer this large (4 MiB: a 1.4 Mpx RGB array, or Pillow's full image) counts towards the next
#: heap trim. A JPEG decodes at reduced DCT scale, so web photos of several megapixels stay below it.
LARGE_DECODE_BYTES = 4 << 20
#: Bytes of large decoded buffers freed between heap trims (64 MiB; the budget's pixel count, as bytes, when less).
TRIM_EVERY_BYTES = 64 << 20


class PixelBudget:
    """Pixels being decoded at once by the threads of one worker process (a counting semaphore, first come
    first served, so a large decode is not starved by a stream of small ones). A request larger than the
    whole budget is capped to it (process_image rejects such images before asking).

    It also hands freed decode buffers back to the system: once decoded buffers of :data:`LARGE_DECODE_BYTES`
    or more (:meth:`freed`) add up to ``trim_every`` bytes since the last time, the next release runs
    :func:`~clip_curate.process_cache.trim_heap` (glibc keeps such buffers in its per-thread arenas otherwise,
    and a worker's memory grows with threads x image size whatever the budget). Rare by design: a trim also
    returns the free memory a CPU forward pass in the same worker would reuse, which then faults back in page
    by page."""

    def __init__(self, capacity: int, trim_every: int | None = None):
        self.capacity = int(capacity)
        self.trim_every = int(trim_every if trim_every is not None else min(self.capacity, TRIM_EVERY_BYTES))
        self._since_trim = 0
        self.trims = 0      # heap trims done (for tests and benches)
        self._free = self.capacity
        self._cond = threading.Condition()
        self._next = 0      # next ticket handed out
        self._serving = 0   # ticket allowed to take pixels next
        self.waits = 0      # acquisitions that had to wait (for tests and counters)
        self.in_use_peak = 0

    def acquire(self, pixels: int) -> int:
        n = min(max(int(pixels), 0), self.capacity)
        with self._cond:
            ticket = self._next
            self._next += 1
            if ticket != self._serving or self._free < n:
                self.waits += 1
                self._cond.wait_for(lambda: ticket == self._serving and self._free >= n)
            self._free -= n
            self._serving += 1
            self.in_use_peak = max(self.in_use_peak, self.capacity - self._free)
            self._cond.notify_all()
        return n

    def freed(self, nbytes: int) -> None:
        """A decode of this hold freed a buffer of ``nbytes``; those of :data:`LARGE_DECODE_BYTES` or more count
        towards the next heap trim, done when the hold is released."""
        if nbytes >= LARGE_DECODE_BYTES:
            with self._cond:
                self._since_trim += nbytes

    def release(self, pixels: int) -> None:
        with self._cond:
            if self._since_trim >= self.trim_every:  # before the next decode may take the pixels
                self._since_trim = 0
                self.trims += 1
                trim_heap()
            self._free += pixels
            self._cond.notify_all()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[int]:
        n = self.acquire(pixels)
        try:
            yield n
        finally:
            self.release(n)


_BUDGETS = ProcessCache()


def pixel_budget(capacity: int) -> PixelBudget:
    """This process's shared :class:`PixelBudget` of ``capacity`` pixels (one per process and capacity: every
    image DoFn instance, whatever thread runs it, draws from the same one)."""
    return _BUDGETS.get((os.getpid(), int(capacity)), lambda: PixelBudget(capacity))


def _decode_jpeg_fast(raw: bytes, width: int, height: int, factor: int) -> np.ndarray | None:
    """libjpeg-turbo decode of a ``width`` x ``height`` JPEG, DCT-scaled by 1/``factor``; None when simplejpeg
    declines."""
    try:
        import simplejpeg
    except ImportError:
        return None
    try:
        if factor == 1:
            return simplejpeg.decode_jpeg(raw, colorspace="RGB", fastdct=True, fastupsample=True)
        return simplejpeg.decode_jpeg(raw, colorspace="RGB", fastdct=True, fastupsample=True,
                                      min_width=-(-width // factor), min_height=-(-height // factor))
    except (ValueError, RuntimeError):
        return None  # CMYK/YCCK, arithmetic coding, recoverable corruption...: Pillow decides


_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def _strip_to_rgb(strip: Image.Image, peak: float) -> Image.Image:
    """One strip in any mode -> RGB (or L for wide greyscale): 16-bit data scaled (not truncated),
    transparency composited on white as img2dataset does."""
    if strip.mode in _WIDE_MODES:
        arr = np.asarray(strip, dtype=np.float32)
        return Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    if strip.mode in _ALPHA_MODES or (strip.mode == "P" and "transparency" in strip.info):
        rgba = strip.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return strip if strip.mode in ("RGB", "L") else strip.convert("RGB")


def _decode_pillow(img: Image.Image, factor: int, min_w: int, min_h: int) -> np.ndarray:
    """Decode the first frame with Pillow (JPEG: ``draft`` DCT scaling) into an RGB (or L) uint8 array,
    box-reduced by ``factor`` (non-JPEG). Conversion and reduction run tile by tile, so apart from the decoded
    image itself only ~256 Kpx temporaries and the (reduced) output exist."""
    if img.format in ("JPEG", "MPO"):
        img.draft(img.mode if img.mode in ("CMYK", "L") else "RGB", (min_w, min_h))
        factor = 1  # draft already scaled
    img.load()  # frame 0 of GIF / WebP / TIFF / MPO
    w, h = img.size
    peak = 255.0
    if img.mode in _WIDE_MODES:
        extrema = img.getextrema()
        peak = 65535.0 if float(extrema[1]) > 255 else 255.0  # 16-bit data, or 8-bit data in a wide mode
    # Tiles of about _STRIP_PIXELS whose sides are multiples of ``factor``: each reduces to whole output pixels,
    # so the result equals reducing the whole converted image.
    rows = factor * max(1, _STRIP_PIXELS // max(1, w * factor))
    cols = min(w, factor * max(1, _STRIP_PIXELS // (rows * factor)))
    out: np.ndarray | None = None
    for y0 in range(0, h, rows):
        for x0 in range(0, w, cols):
            tile = _strip_to_rgb(img.crop((x0, y0, min(w, x0 + cols), min(h, y0 + rows))), peak)
            if factor > 1:
                tile = tile.reduce(factor)
            part = np.asarray(tile)
            if out is None:
                out = np.empty((-(-h // factor), -(-w // factor)) + part.shape[2:], dtype=np.uint8)
            oy, ox = y0 // factor, x0 // factor
            out[oy:oy + part.shape[0], ox:ox + part.shape[1]] = part
    img.close()  # frees the full-size image now, not when the caller lets go of it
    return out


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
    """RGB uint8 array -> baseline JPEG bytes with 4:2:0 chroma subsampling, as img2dataset (OpenCV) and
    Pillow write them (libjpeg-turbo via simplejpeg, Pillow if missing). 4:2:0 encodes in ~60 % of the time
    of 4:4:4 and makes ~20 % smaller files at the same quality."""
    try:
        import simplejpeg
    except ImportError:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=quality, subsampling="4:2:0")
        return buf.getvalue()
    return simplejpeg.encode_jpeg(np.ascontiguousarray(arr), quality=quality, colorspace="RGB",
                                  colorsubsampling="420")


def phash_hex(arr: np.ndarray) -> str:
    """64-bit perceptual hash (``imagehash.phash``) of an RGB array, as 16 hex characters."""
    import imagehash

    return str(imagehash.phash(Image.fromarray(arr)))


# ---------------------------------------------------------------------------------------------
# ORB keypoints of the stored image (near-duplicate dedup that survives crops)

#: Keypoints are found on the stored image scaled to this shorter side (long side at most 4x it), so two
#: copies of one photo are compared at one scale whatever their stored sizes.
ORB_SIDE = 256
_ORB_MAX_LONG = 4 * ORB_SIDE
_ORB_VERSION = 1
_ORB_HEAD = struct.Struct("<BHHH")   # version, working width, working height, keypoint count
_ORB_POINT = np.dtype([("x", "<u2"), ("y", "<u2"), ("code", "<u8")])  # quarter pixels; first 64 descriptor bits
_ORB_LOCAL = threading.local()
#: A keypoint whose 256-bit descriptor is within this many bits of another keypoint's in the same image is
#: dropped: repeated structure (checkerboards, tiles, brick walls) would match other pictures of the pattern.
ORB_SELF_SIMILAR = 30


def orb_keypoints(arr: np.ndarray, n: int = ORB_KEYPOINTS) -> bytes | None:
    """The ``n`` strongest distinctive ORB keypoints of an RGB (or grey) array, packed for the
    ``orb_keypoints`` column.

    The array is scaled to a shorter side of :data:`ORB_SIDE` (long side at most 4x that); ``2n`` keypoints
    are detected, those that repeat within the image (descriptor within :data:`ORB_SELF_SIMILAR` bits of
    another's) are dropped, and the ``n`` strongest others keep their position (in quarter pixels) and the
    first 64 bits of their rBRIEF descriptor. None when fewer than 8 remain (flat or purely repetitive images:
    near dedup compares their pHash only). Layout: a
    ``<BHHH`` header (version, working width, working height, count), then ``count`` records
    ``<HHQ`` (x, y, code): 12 bytes per keypoint.
    """
    import cv2

    if n <= 0:
        return None
    grey = arr if arr.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    scale = min(ORB_SIDE / min(h, w), _ORB_MAX_LONG / max(h, w))
    ww, wh = max(1, round(w * scale)), max(1, round(h * scale))
    if (ww, wh) != (w, h):
        grey = cv2.resize(grey, (ww, wh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    orb = getattr(_ORB_LOCAL, "orb", None)
    if orb is None or getattr(_ORB_LOCAL, "n", None) != n:  # detectors are not thread-safe: one per thread
        orb = _ORB_LOCAL.orb = cv2.ORB_create(nfeatures=2 * n, scaleFactor=1.25, nlevels=4, edgeThreshold=31,
                                             patchSize=31, fastThreshold=12)
        _ORB_LOCAL.n = n
    kps, desc = orb.detectAndCompute(grey, None)
    if desc is None or len(kps) < 8:
        return None
    words = np.ascontiguousarray(desc).view("<u8")  # k x 4 words of 64 bits
    nearest = np.empty(len(words), dtype=np.int64)
    for i0 in range(0, len(words), 512):
        rows = words[i0:i0 + 512]
        d = np.bitwise_count(rows[:, None, 0] ^ words[None, :, 0]).astype(np.uint16)  # 0..256
        for k in range(1, 4):
            d += np.bitwise_count(rows[:, None, k] ^ words[None, :, k])
        d[np.arange(len(d)), np.arange(i0, i0 + len(d))] = 256
        nearest[i0:i0 + len(d)] = d.min(axis=1)
    order = sorted((i for i in range(len(kps)) if nearest[i] > ORB_SELF_SIMILAR),
                   key=lambda i: (-kps[i].response, kps[i].pt))[:n]
    if len(order) < 8:
        return None
    rec = np.empty(len(order), dtype=_ORB_POINT)
    rec["x"] = [min(65535, round(kps[i].pt[0] * 4)) for i in order]
    rec["y"] = [min(65535, round(kps[i].pt[1] * 4)) for i in order]
    rec["code"] = np.ascontiguousarray(desc[order, :8]).view("<u8").ravel()
    return _ORB_HEAD.pack(_ORB_VERSION, ww, wh, len(order)) + rec.tobytes()


def unpack_orb_keypoints(blob: Any) -> tuple[tuple[float, float], np.ndarray, np.ndarray] | None:
    """``orb_keypoints`` bytes -> ((width, height), xy, codes): the working frame and positions in units of
    its shorter side (float32, n x 2), the 64-bit codes (uint64). None for a missing or malformed value."""
    if not blob:
        return None
    try:
        blob = bytes(blob)
        version, ww, wh, count = _ORB_HEAD.unpack_from(blob)
    except (struct.error, TypeError, ValueError):
        return None
    if version != _ORB_VERSION or not ww or not wh or len(blob) != _ORB_HEAD.size + count * _ORB_POINT.itemsize:
        return None
    rec = np.frombuffer(blob, dtype=_ORB_POINT, offset=_ORB_HEAD.size)
    unit = 4.0 * min(ww, wh)
    xy = np.stack([rec["x"], rec["y"]], axis=1).astype(np.float32) / unit
    return (ww / min(ww, wh), wh / min(ww, wh)), xy, rec["code"].astype(np.uint64)


# ---------------------------------------------------------------------------------------------
# The whole stage for one image

#: The stored image's hashes a stage may read (``Stage`` configs name them in ``image_hashes``): pHash
#: (~1 ms per image) and ORB keypoints (~3 ms) are computed only when an enabled stage reads them.
#: ``sha256`` of the downloaded bytes (~0.05 ms) is always computed.
IMAGE_HASHES = frozenset({"phash", "orb_keypoints"})


def hashes_needed(configs: Any, enabled: tuple[str, ...]) -> frozenset[str]:
    """The :data:`IMAGE_HASHES` the enabled stages read: the union of each enabled stage config's
    ``image_hashes`` (a stage config without that attribute reads none)."""
    needed: set[str] = set()
    for name in enabled:
        needed |= set(getattr(getattr(configs, name, None), "image_hashes", ()) or ())
    return frozenset(needed & IMAGE_HASHES)


def stored_hashes(image: bytes, hashes: frozenset[str] = IMAGE_HASHES,
                  orb_n: int = ORB_KEYPOINTS) -> dict[str, Any]:
    """``phash`` / ``orb_keypoints`` of a stored JPEG (rows written without them, read back for dedup),
    computed as :func:`process_image` computes them, on the decoded stored JPEG instead of the array it
    encoded (so up to JPEG loss the same values)."""
    arr = _decode_jpeg_fast(image, 0, 0, 1)
    if arr is None:
        with Image.open(io.BytesIO(image)) as img:
            arr = np.asarray(img.convert("RGB"))
    out: dict[str, Any] = {}
    if "phash" in hashes:
        out["phash"] = phash_hex(arr)
    if "orb_keypoints" in hashes:
        out["orb_keypoints"] = orb_keypoints(arr, orb_n)
    return out


def process_image(raw: bytes | None, cfg: ImageConfig, budget: PixelBudget | None = None,
                  hashes: frozenset[str] = IMAGE_HASHES) -> ImageResult:
    """Raw downloaded bytes -> stored-image fields, or a rejection (reason, detail).

    Fields: ``image`` (JPEG), ``width``, ``height`` (stored), ``original_width``, ``original_height``
    (as displayed, EXIF orientation applied), ``sha256`` (of ``raw``), ``phash`` and ``orb_keypoints`` (of
    the stored image; each only when named in ``hashes``, else None). ``budget``: the worker's shared
    :class:`PixelBudget` the decode draws from (None: this call alone; the plan is still checked against
    ``cfg.decode_pixel_budget``).
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
    plan = plan_decode(img, w, h, min_w, min_h)
    capacity = budget.capacity if budget is not None else cfg.decode_pixel_budget
    if plan.pixels > capacity:
        return _reject("too_large_pixels", f"{fmt} {img.mode} {w}x{h} = {w * h} pixels: decoding needs "
                                           f"{plan.peak_bytes / 2**20:.0f} MiB = {plan.pixels} budget pixels > "
                                           f"--decode-pixel-budget {capacity}")
    with (budget.hold(plan.pixels) if budget is not None else _no_hold()):
        try:
            arr = _decode_jpeg_fast(raw, w, h, plan.factor) if fmt in ("JPEG", "MPO") else None
            decoded = plan.peak_bytes if arr is None else arr.nbytes + plan.coefficient_bytes  # Pillow: all of it
            if arr is None:
                arr = _decode_pillow(img, plan.factor, min_w, min_h)
        except Image.DecompressionBombError as exc:
            return _reject("too_large_pixels", str(exc))
        except Exception as exc:  # truncated, corrupt, unsupported mode
            return _reject("decode_error", f"{fmt}: {type(exc).__name__}: {exc}")
        finally:
            img.close()
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        out = resize(apply_orientation(arr, orientation), cfg, (ow, oh))
        del arr
        if budget is not None:
            budget.freed(decoded)
    return ImageResult(fields={
        "image": encode_jpeg(out, cfg.jpeg_quality),
        "width": int(out.shape[1]), "height": int(out.shape[0]),
        "original_width": int(ow), "original_height": int(oh),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "phash": phash_hex(out) if "phash" in hashes else None,
        "orb_keypoints": orb_keypoints(out, cfg.orb_keypoints) if "orb_keypoints" in hashes else None,
    })


@contextmanager
def _no_hold() -> Iterator[None]:
    yield None


class _DecodeResizeFn(RowFilter):
    stage = "image"

    def __init__(self, config: ImageConfig, hashes: frozenset[str] = IMAGE_HASHES):
        super().__init__(config)
        self.hashes = frozenset(hashes)

    def load(self):
        import cv2

        cv2.setNumThreads(1)  # one image per thread; Beam parallelises across threads and workers
        self._budget = pixel_budget(self.config.decode_pixel_budget)  # shared by the process's threads

    def judge(self, row):
        row = dict(row)  # never mutate an input element
        raw = row.pop("image_bytes", None)
        if raw is None:
            raw = row.get("image")  # pool rows that already hold an image
        result = process_image(raw, self.config, self._budget, self.hashes)
        if result.reason:
            return Verdict(row, result.reason, result.detail)
        row.update(result.fields)
        return Verdict(row)


class DecodeResize(RowStage):
    """Rows with ``image_bytes`` -> ``(kept, rejected)``.

    Kept rows lose ``image_bytes`` and gain ``image`` (JPEG), ``width``, ``height``, ``original_width``,
    ``original_height``, ``sha256``, ``phash`` and ``orb_keypoints``; rejected rows carry stage ``image``
    and a reason from ``records.REASONS["image"]``. A row without ``image_bytes`` but with ``image`` (a pool)
    is re-processed. Decodes of one worker process draw from one shared :class:`PixelBudget`. ``hashes``:
    which of :data:`IMAGE_HASHES` are computed (the others are None); in a pipeline, those an enabled stage
    reads (:func:`hashes_needed`).
    """

    def __init__(self, config: ImageConfig, hashes: frozenset[str] = IMAGE_HASHES):
        super().__init__(_DecodeResizeFn(config, hashes), label="DecodeResize")


def _build(cfg: ImageConfig, ctx) -> DecodeResize:
    return DecodeResize(cfg, hashes_needed(ctx.configs, ctx.enabled))


register(Stage("image", ImageConfig, build=_build, position=30,
               provides=frozenset({IMAGE}), needs=frozenset({RAW_IMAGE}), auto=True,
               title="decode, validate, resize"))
