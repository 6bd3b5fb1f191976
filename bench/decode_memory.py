"""Peak memory of the image stage in one worker process: a stream of max-size PNGs and JPEGs decoded by many
threads at once, under the per-worker decode budget (``--decode-pixel-budget``).

Each measurement runs in a fresh child process (Linux): the child imports the stage, warms it up on small
images, reads the image files, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and records its
RSS (the base), then runs the images through ``--threads`` threads, each with its own image-stage DoFn
(``setup()`` then ``process()``, as Beam runs one DoFn instance per bundle thread; the budget is shared by the
process), and reports the peak RSS. The images are written first by another child (a PNG is streamed row by
row, so writing one needs no full-size buffer).

    python bench/decode_memory.py                      # defaults: 11494 x 11494 PNG/JPEG, 64 threads
    python bench/decode_memory.py --threads 4 --no-budget   # the same without a budget (4 threads: fits RAM)
    python bench/decode_memory.py --budget 16000000 --threads 8 [--no-budget | --no-trim]
    python bench/decode_memory.py --formats            # one 20 Mpx image per format: plan vs measured
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np

DEFAULT_THREADS = 64  # the download stage's --threads default: every download in flight may reach the decoder


def write_png(path: str, width: int, height: int, alpha: bool = False) -> None:
    """A ``width`` x ``height`` RGB(A) PNG with smooth gradients and blocks (compresses to a few MB or less,
    like the flat-coloured giant PNGs of the web), written row by row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    x = np.arange(width)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8,
                                                                   6 if alpha else 2, 0, 0, 0)))
        comp, buf = zlib.compressobj(6), []
        for y in range(height):
            g = ((x // 97 + y // 97) % 2 * 90 + x * 160 // width).astype(np.uint8)
            planes = [g, g[::-1], np.full(width, y * 255 // height, np.uint8)] + ([g | 128] if alpha else [])
            buf.append(comp.compress(b"\x00" + np.stack(planes, 1).tobytes()))
            if sum(map(len, buf)) > 1 << 20:
                f.write(chunk(b"IDAT", b"".join(buf)))
                buf = []
        buf.append(comp.flush())
        f.write(chunk(b"IDAT", b"".join(buf)) + chunk(b"IEND", b""))


def write_jpeg(path: str, width: int, height: int, progressive: bool = False) -> None:
    """A ``width`` x ``height`` JPEG (quality 85, 4:2:0) of the same pattern as :func:`write_png`."""
    from PIL import Image

    img = Image.new("RGB", (width, height))
    x = np.arange(width)
    for y0 in range(0, height, 512):
        y = np.arange(y0, min(height, y0 + 512))[:, None]
        g = ((x[None, :] // 97 + y // 97) % 2 * 90 + x[None, :] * 160 // width).astype(np.uint8)
        band = np.stack([g, g[:, ::-1], np.broadcast_to((y * 255 // height).astype(np.uint8), g.shape)], 2)
        img.paste(Image.fromarray(np.ascontiguousarray(band)), (0, y0))
    img.save(path, "JPEG", quality=85, progressive=progressive)


def square_side(pixels: int) -> int:
    return math.isqrt(pixels)


# ---------------------------------------------------------------------------------------------
# The child process that measures

#: Linux: current RSS and the peak since the last reset (``/proc/self/clear_refs`` <- 5 resets the peak).
RSS_HELPERS = r"""
def _status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")
def peak_mb():
    return _status_mb("VmHWM")
"""

_CHILD = RSS_HELPERS + r"""
import concurrent.futures, io, json, sys, time
import numpy as np
from PIL import Image
import clip_curate.stages.image as image_stage
from clip_curate.stages.image import ImageConfig, _DecodeResizeFn, pixel_budget
args = json.loads(sys.argv[1])
cfg = ImageConfig(**args["config"])
if args.get("no_trim"):  # the budget never trims the heap: glibc alone keeps freed decode buffers
    image_stage.trim_heap = lambda: False
warm_fn = _DecodeResizeFn(cfg)
warm_fn.setup()
for fmt in ("PNG", "JPEG"):  # lazy imports and first-call allocations happen before the base is taken
    warm = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)).save(warm, fmt)
    list(warm_fn.process({"uid": "warm", "image_bytes": warm.getvalue()}))
bodies = [open(p, "rb").read() for p in args["paths"]]
base = reset_peak()
import threading
local = threading.local()
def work(i):
    fn = getattr(local, "fn", None)
    if fn is None:
        fn = local.fn = _DecodeResizeFn(cfg); fn.setup()
    out = list(fn.process({"uid": f"r{i}", "image_bytes": bodies[i % len(bodies)]}))
    r = out[0]
    return getattr(r, "value", r).get("reason") or "kept"
t0 = time.monotonic()
with concurrent.futures.ThreadPoolExecutor(args["threads"]) as ex:
    reasons = list(ex.map(work, range(args["images"])))
budget = pixel_budget(cfg.decode_pixel_budget)
print(json.dumps({"base_mb": round(base), "peak_mb": round(peak_mb()),
                  "wall_s": round(time.monotonic() - t0, 1), "reasons": {r: reasons.count(r) for r in set(reasons)},
                  "budget_waits": budget.waits, "budget_peak_pixels": budget.in_use_peak,
                  "heap_trims": budget.trims}))
"""


def measure(paths: list[str], config: dict, threads: int, images: int, no_trim: bool = False) -> dict:
    """Run ``images`` decodes of ``paths`` (cycled) on ``threads`` threads in a fresh process; its peak RSS."""
    arg = json.dumps({"paths": paths, "config": config, "threads": threads, "images": images,
                      "no_trim": no_trim})
    out = subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_images(directory: str, side: int, kinds=("png", "jpeg", "jpeg_progressive")) -> list[str]:
    """Write one image of each kind (``side`` x ``side``) in a child process; their paths."""
    paths = [os.path.join(directory, f"{k}-{side}.{'png' if k.startswith('png') else 'jpg'}") for k in kinds]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import decode_memory as d\n"
            "for k, p in zip(sys.argv[3].split(','), sys.argv[4:]):\n"
            "    s = int(sys.argv[2])\n"
            "    d.write_png(p, s, s, alpha=k == 'png_alpha') if k.startswith('png') else "
            "d.write_jpeg(p, s, s, progressive=k == 'jpeg_progressive')\n")
    subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), str(side),
                    ",".join(kinds), *paths], check=True)
    return paths


def formats(directory: str) -> list[dict]:
    """One 5000 x 4000 image per format and mode alone: the decode plan's peak vs the measured RSS growth."""
    code = RSS_HELPERS + r"""
import io, json, sys
import numpy as np
from PIL import Image
from clip_curate.stages.image import ImageConfig, open_header, output_size, plan_decode, process_image
cfg = ImageConfig()
w0 = io.BytesIO(); Image.new("RGB", (400, 300), (9, 9, 9)).save(w0, "PNG"); process_image(w0.getvalue(), cfg)
w0 = io.BytesIO(); Image.new("RGB", (400, 300), (9, 9, 9)).save(w0, "JPEG"); process_image(w0.getvalue(), cfg)
raw = open(sys.argv[1], "rb").read()
img = open_header(raw); w, h = img.size; t = output_size(w, h, cfg)
plan = plan_decode(img, w, h, min(w, t[0]), min(h, t[1]))
base = reset_peak()
res = process_image(raw, cfg)
grow = peak_mb() - base
print(json.dumps({"format": img.format, "mode": img.mode, "plan_mib": round(plan.peak_bytes / 2**20),
                  "measured_mib": round(grow), "bytes_per_px": round(grow * 2**20 / (w * h), 2),
                  "reason": res.reason}))
"""
    from PIL import Image

    y, x = np.mgrid[0:4000, 0:5000]
    g = ((x // 50 + y // 50) % 2 * 100 + x * 150 // 5000).astype(np.uint8)
    rgb = Image.fromarray(np.stack([g, g[:, ::-1], (y * 255 // 4000).astype(np.uint8)], 2))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(g))
    files = {"png-rgb.png": (rgb, "PNG", {"compress_level": 1}), "png-rgba.png": (rgba, "PNG", {"compress_level": 1}),
             "png-palette.png": (rgb.convert("P"), "PNG", {}),
             "png-16bit-grey.png": (Image.fromarray(g.astype(np.uint16) * 257), "PNG", {}),
             "jpeg-baseline.jpg": (rgb, "JPEG", {"quality": 90}),
             "jpeg-progressive.jpg": (rgb, "JPEG", {"quality": 90, "progressive": True}),
             "jpeg-progressive-444.jpg": (rgb, "JPEG", {"quality": 90, "progressive": True, "subsampling": 0}),
             "jpeg-cmyk.jpg": (rgb.convert("CMYK"), "JPEG", {"quality": 90}),
             "webp.webp": (rgb, "WEBP", {"quality": 80, "method": 0}), "gif.gif": (rgb.convert("P"), "GIF", {}),
             "tiff-deflate.tiff": (rgb, "TIFF", {"compression": "tiff_deflate"}), "bmp.bmp": (rgb, "BMP", {})}
    try:
        from PIL import features
        if features.check("avif"):
            files["avif.avif"] = (rgb, "AVIF", {"quality": 50, "speed": 10})
    except Exception:  # noqa: BLE001 - no AVIF codec in this Pillow
        pass
    rows = []
    for name, (img, fmt, kw) in files.items():
        path = os.path.join(directory, name)
        img.save(path, fmt, **kw)
        out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True)
        rows.append({"file": name, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def main(argv=None) -> int:
    from clip_curate.stages.image import DECODE_PIXEL_BUDGET, DECODE_RESERVE_PIXELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    p.add_argument("--images", type=int, default=0, help="decodes in the stream (default: 2 x threads)")
    p.add_argument("--budget", type=int, default=DECODE_PIXEL_BUDGET, help="--decode-pixel-budget")
    p.add_argument("--no-budget", action="store_true", help="a budget so large it never waits (the old behaviour)")
    p.add_argument("--no-trim", action="store_true",
                   help="never trim the heap after large decodes (glibc alone; the budget trims every 64 MiB)")
    p.add_argument("--formats", action="store_true", help="one image per format: plan vs measured")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.formats:
            for row in formats(tmp):
                print(json.dumps(row))
            return 0
        side = square_side(args.budget - DECODE_RESERVE_PIXELS)  # the largest square RGB image that fits
        paths = make_images(tmp, side)
        config = {"max_pixels": side * side, "decode_pixel_budget": 1 << 40 if args.no_budget else args.budget}
        res = measure(paths, config, args.threads, args.images or 2 * args.threads, args.no_trim)
        print(json.dumps({"threads": args.threads, "image": f"{side}x{side}",
                          "kinds": [os.path.basename(q) for q in paths],
                          "budget_pixels": config["decode_pixel_budget"], **res,
                          "peak_over_base_mb": res["peak_mb"] - res["base_mb"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
