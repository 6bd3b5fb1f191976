"""Image stage throughput on one core: decode + resize to 256 + JPEG encode of real photos (300–900 px).

Photos come from scikit-image's data (astronaut, coffee, chelsea, rocket, ...), resized and cropped to random
sizes of 300–900 px per side and stored as JPEG (quality 90), like typical web images. Each path is timed on
the same images, in CPU seconds of this process (robust on a shared machine) and wall seconds.

    python bench/image_decode.py            # 300 images, 3 rounds
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from clip_curate.stages.image import ImageConfig, process_image  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "cat", "camera", "colorwheel")


def real_photos(n: int, seed: int = 0) -> list[bytes]:
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = []
    for name in PHOTOS:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            sources.append(Image.fromarray(fn()).convert("RGB"))
        except Exception:  # some datasets need a download (pooch): skip them
            continue
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = int(rng.integers(300, 901)), int(rng.integers(300, 901))
        scale = max(w / src.width, h / src.height)
        big = src.resize((max(w, round(src.width * scale)), max(h, round(src.height * scale))), Image.BICUBIC)
        x, y = int(rng.integers(0, big.width - w + 1)), int(rng.integers(0, big.height - h + 1))
        buf = io.BytesIO()
        big.crop((x, y, x + w, y + h)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pillow_full(raw: bytes) -> bytes:
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    s = 256 / min(img.size)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    import cv2
    cv2.setNumThreads(1)
    from img2dataset.resizer import Resizer

    images = real_photos(args.images)
    cfg = ImageConfig(image_size=256, resize_mode="keep_ratio")
    i2d = Resizer(image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True)
    paths = {
        "clip-curate process_image (simplejpeg DCT-scaled + cv2 + pHash + sha256)": lambda b: process_image(b, cfg),
        "img2dataset 1.47 Resizer (cv2 full decode + albumentations)": lambda b: i2d(io.BytesIO(b)),
        "Pillow full decode + LANCZOS": pillow_full,
    }
    print(f"\n{len(images)} real photos, 300–900 px JPEG -> 256 px keep_ratio JPEG; one thread; "
          f"best of {args.rounds} rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| path | img/s (CPU time) | img/s (wall) |")
    print("|---|---:|---:|")
    for name, fn in paths.items():
        for b in images[:20]:
            fn(b)  # warm up
        best_cpu = best_wall = float("inf")
        for _ in range(args.rounds):
            c0, w0 = time.process_time(), time.perf_counter()
            for b in images:
                fn(b)
            best_cpu = min(best_cpu, time.process_time() - c0)
            best_wall = min(best_wall, time.perf_counter() - w0)
        print(f"| {name} | {len(images) / best_cpu:.0f} | {len(images) / best_wall:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
