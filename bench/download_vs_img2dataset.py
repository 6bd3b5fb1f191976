"""Download + resize throughput: clip-curate vs img2dataset 1.47 on the same local web, in one run.

Serves ``--images`` synthetic JPEG photos of 300–900 px from a server in its own process on 127.0.0.1,
then runs img2dataset (``--processes_count 2 --thread_count 32 --image_size 256 --resize_mode keep_ratio
--output_format parquet``) and ``clip-curate run --stages download,image`` (same size, mode and worker
count) against it, and prints images/s, wall time and peak RSS (whole process tree, sampled from /proc
every 0.2 s) of each, plus the ratio.

    python bench/download_vs_img2dataset.py            # 2000 images
    python bench/download_vs_img2dataset.py --images 500
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from clip_curate.testing.webserver import Route, WebServer


def synthetic_photo(rng: np.random.Generator) -> bytes:
    """A photo-like JPEG (smooth gradients, shapes, noise) of 300–900 px per side."""
    w, h = int(rng.integers(300, 901)), int(rng.integers(300, 901))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(x / w) * rng.uniform(80, 255), (y / h) * rng.uniform(80, 255),
                     np.full((h, w), rng.uniform(0, 255))], axis=-1)
    base += rng.normal(0, 12, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def _tree_rss(pid: int) -> int:
    """RSS bytes of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return total


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of the process tree)."""
    peak = 0
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.2)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    done.set()
    t.join()
    wall = time.monotonic() - t0
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed: {err.decode()[-2000:]}")
    return wall, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--image-size", type=int, default=256)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    bodies = [synthetic_photo(rng) for _ in range(min(args.images, 200))]
    routes = {f"/img/{i}.jpg": Route(bodies[i % len(bodies)], content_type="image/jpeg") for i in range(args.images)}
    tmp = tempfile.mkdtemp(prefix="dl-bench-")
    results = []
    with WebServer(routes, process=True) as srv:
        url_file = os.path.join(tmp, "urls.parquet")
        urls = [srv.url(f"/img/{i}.jpg") for i in range(args.images)]
        pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(args.images)]}), url_file)
        i2d_out = os.path.join(tmp, "i2d")
        wall, rss = run_measured([
            "img2dataset", "--url_list", url_file, "--input_format", "parquet", "--url_col", "url",
            "--caption_col", "caption", "--output_format", "parquet", "--output_folder", i2d_out,
            "--processes_count", str(args.workers), "--thread_count", str(args.threads),
            "--image_size", str(args.image_size), "--resize_mode", "keep_ratio", "--enable_wandb", "False"])
        ok = sum(json.load(open(f)).get("successes", 0) for f in glob.glob(os.path.join(i2d_out, "*_stats.json")))
        results.append(("img2dataset 1.47", ok, wall, rss))
        cc_out = os.path.join(tmp, "cc")
        wall, rss = run_measured([
            sys.executable, "-m", "clip_curate.cli", "run", "--input", url_file, "--output", cc_out,
            "--stages", "download,image", "--allow-private-addresses", "--no-respect-robots-txt",
            "--threads", str(args.threads), "--per-host-connections", str(args.threads), "--per-host-rps", "0",
            "--image-size", str(args.image_size), "--resize-mode", "keep_ratio", "--no-store-embeddings",
            "--progress-seconds", "0", "--log-level", "WARNING",
            f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"])
        ok = json.load(open(os.path.join(cc_out, "stats.json")))["curated_rows"]
        results.append(("clip-curate", ok, wall, rss))

    print(f"\n{args.images} JPEGs (300–900 px) from one local server process -> {args.image_size} px keep_ratio; "
          f"{args.workers} processes, {args.threads} threads, {os.cpu_count()} CPUs\n")
    print("| tool | images ok | wall s | images/s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for tool, ok, wall, rss in results:
        print(f"| {tool} | {ok} | {wall:.1f} | {ok / wall:.0f} | {rss / 2**20:.0f} |")
    (_, ok_a, wall_a, rss_a), (_, ok_b, wall_b, rss_b) = results
    print(f"\nclip-curate / img2dataset: {(ok_b / wall_b) / max(ok_a / wall_a, 1e-9):.2f}x images/s, "
          f"{rss_b / max(rss_a, 1):.2f}x peak RSS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
