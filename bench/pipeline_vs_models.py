"""Benchmark: the full default pipeline against a bare loop of its models' forward passes, same images.

    python bench/pipeline_vs_models.py                                   # CPU, 2,000 images, ViT-B-32 random
    python bench/pipeline_vs_models.py --device cuda --precision bf16 --batch-size 256 --images 8192   # GPU

1. Pool (no network): ``--images`` real-photo JPEGs of 300-900 px (``bench/image_decode.real_photos``: crops
   of scikit-image's photos, turned/flipped/colour-permuted so dedup keeps most) with English captions, written as an img2dataset-style Parquet pool (``jpg``
   column; docs/pools.md).
2. Pipeline: ``clip-curate run --input POOL --clip-model ViT-B-32 --clip-pretrained none`` with the default
   stages (caption rules and language, image decode/resize, embed, CLIP score, dedup, safety with the
   opennsfw classifier, audit), a fresh process on the DirectRunner. images/s = input rows / wall time.
   A second run on ``--startup-images`` rows measures the fixed cost (start-up, model loads, audit), so
   "steady" = (N - n) / (wall_N - wall_n).
3. Bare loop, in this process, after loading: the same forward passes on the same images with the same
   batch sizes and threads (``--threads``, default: all cores, on both sides; ``--streams K``: K worker processes
   of the pipeline against K threads of the bare loop, each forward on ``--threads``): ``ClipEmbedder.embed`` (image + text towers, the stage's own forward) on every
   image, and the opennsfw network (``NSFWModel.scores``) on as many images as reached the safety stage
   (``safety_in``: dedup drops rows before it). Inputs are prepared before the clock starts, so the bare
   figure is the models' throughput alone.

Prints both images/s, the ratios (wall, steady, and CPU time: the pipeline process tree's CPU seconds against the
bare loop's, which a shared machine disturbs less), and the pipeline's busy time per stage (stats.json
``timings``) per input image.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ADJ = ("red", "small", "old", "bright", "quiet", "wooden", "busy", "sunny", "dark", "tiny", "famous", "wet")
NOUN = ("cat", "rocket", "coffee cup", "astronaut", "street", "garden", "camera", "kitchen", "harbour", "forest",
        "bicycle", "mountain", "market", "bridge", "museum")
PLACE = ("in the morning", "on a table", "near the river", "at night", "in the city", "from above", "in winter",
         "on display", "with friends", "after the rain")


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"a {ADJ[rng.integers(len(ADJ))]} {NOUN[rng.integers(len(NOUN))]} {PLACE[rng.integers(len(PLACE))]}, "
            f"photo {i}" for i in range(n)]


def varied_photos(n: int, seed: int = 0) -> list[bytes]:
    """``real_photos`` with each crop also flipped, turned, colour-permuted and gamma-shifted at random, so
    that dedup keeps most of the pool (plain crops of ten photos are mostly near duplicates of each other)."""
    import io

    from PIL import Image

    from bench.image_decode import real_photos

    rng = np.random.default_rng(seed + 1)
    out = []
    for data in real_photos(n, seed):
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        arr = np.rot90(arr, int(rng.integers(4)))[:, ::-1 if rng.random() < 0.5 else 1][..., rng.permutation(3)]
        gamma = float(rng.uniform(0.5, 2.0))
        arr = (255.0 * (arr / 255.0) ** gamma).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_pool(directory: str, images: list[bytes], texts: list[str], per_file: int = 500) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    for k in range(0, len(images), per_file):
        n = len(images[k:k + per_file])
        table = pa.table({
            "url": [f"http://127.0.0.1/pool/{k + i}.jpg" for i in range(n)],
            "caption": texts[k:k + per_file],
            "key": [f"{k + i:09d}" for i in range(n)],
            "status": ["success"] * n,
            "jpg": pa.array(images[k:k + per_file], pa.binary()),
        })
        pq.write_table(table, os.path.join(directory, f"{k // per_file:05d}.parquet"))


def run_pipeline(pool: str, out: str, args, extra: list[str]) -> dict:
    """One ``clip-curate run`` in a fresh process; returns its stats.json with ``bench_wall_s``."""
    cmd = [sys.executable, "-m", "clip_curate.cli", "run", "--input", pool, "--output", out, "--overwrite",
           "--clip-model", args.model, "--clip-pretrained", args.pretrained, "--device", args.device,
           "--precision", args.precision, "--batch-size", str(args.batch_size),
           "--nsfw-batch-size", str(args.nsfw_batch_size), *extra]
    import resource

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"pipeline failed ({proc.returncode}): {' '.join(cmd)}")
    with open(os.path.join(out, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    stats["bench_wall_s"] = wall
    stats["bench_cpu_s"] = cpu
    return stats


def in_streams(work, starts: list[int], streams: int) -> None:
    """``work(starts)`` for the batch starts, split over ``streams`` threads (batch k to thread k mod streams).
    The traced CLIP towers and onnxruntime release the GIL, so streams run their forward passes side by side,
    as the pipeline's worker threads do."""
    if streams <= 1:
        work(starts)
        return
    import threading

    threads = [threading.Thread(target=work, args=(starts[k::streams],)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def bare_loop(stored: list[bytes], texts: list[str], n_safety: int, args) -> dict:
    """images/s of the models alone: CLIP image + text on every image, opennsfw on ``n_safety`` of them."""
    import torch

    from clip_curate.models.clip import ModelConfig
    from clip_curate.models.nsfw import NSFWModel, stack_pixels
    from clip_curate.stages.embed import ClipEmbedder, pixel_plan, prepare_image

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(clip_model=args.model, clip_pretrained=args.pretrained, device=args.device,
                      precision=args.precision, batch_size=args.batch_size)
    embedder = ClipEmbedder(cfg)
    nsfw = NSFWModel(args.device, precision=args.precision)
    plan = pixel_plan(embedder.loaded.preprocess)
    t0 = time.process_time()
    pixels = np.stack([prepare_image(b, plan) for b in stored])
    clip_prep = time.process_time() - t0
    tokens = embedder.loaded.tokenizer(texts).numpy().astype(np.int64)
    t0 = time.process_time()
    nsfw_pixels, index, _ = stack_pixels(stored[:n_safety])
    nsfw_prep = time.process_time() - t0
    bs, nbs = args.batch_size, args.nsfw_batch_size
    embedder.embed(pixels[:bs], tokens[:bs])          # warm-up (allocator, kernels)
    nsfw.scores(nsfw_pixels[:nbs])
    def clip_batches(starts):
        for i in starts:
            embedder.embed(pixels[i:i + bs], tokens[i:i + bs])

    def nsfw_batches(starts):
        for i in starts:
            nsfw.scores(nsfw_pixels[i:i + nbs])

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    in_streams(clip_batches, list(range(0, len(pixels), bs)), args.streams)
    t_clip = time.perf_counter() - t0
    t1 = time.perf_counter()
    in_streams(nsfw_batches, list(range(0, len(nsfw_pixels), nbs)), args.streams)
    t_nsfw = time.perf_counter() - t1
    cpu = time.process_time() - cpu0
    return {"images_per_s": len(stored) / (t_clip + t_nsfw), "clip_s": t_clip, "nsfw_s": t_nsfw,
            "cpu_ms_per_image": 1000 * cpu / len(stored),
            "clip_ms_per_image": 1000 * t_clip / len(stored), "nsfw_ms_per_image": 1000 * t_nsfw / max(len(index), 1),
            "clip_prep_ms_per_image": 1000 * clip_prep / len(stored),
            "nsfw_prep_ms_per_image": 1000 * nsfw_prep / max(n_safety, 1),
            "torch_threads": torch.get_num_threads(), "nsfw_backend": nsfw.backend, "device": str(embedder.device)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--startup-images", type=int, default=128, help="size of the run that measures fixed costs")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default="none")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--batch-size", type=int, default=64, help="CLIP batch (the pipeline's --batch-size default)")
    ap.add_argument("--nsfw-batch-size", type=int, default=32, help="opennsfw batch (--nsfw-batch-size default)")
    ap.add_argument("--pipeline-arg", action="append", default=[],
                    help="extra clip-curate run flag, e.g. --pipeline-arg=--direct_num_workers=2")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads on both sides (OMP_NUM_THREADS of the pipeline process)")
    ap.add_argument("--streams", type=int, default=1,
                    help="parallel streams on both sides: the bare loop splits its batches over this many threads, "
                         "the pipeline runs this many DirectRunner worker processes (multi_processing); each stream's "
                         "forward uses --threads torch threads")
    ap.add_argument("--keep", metavar="DIR", help="build the pool and outputs in DIR and keep them")
    args = ap.parse_args(argv)

    import torch

    from clip_curate.stages.image import ImageConfig, process_image

    if args.device == "cuda" and not torch.cuda.is_available():
        print("not measured: no GPU available (--device cuda)")
        return 2
    load0 = os.getloadavg()
    t = time.perf_counter()
    raw = varied_photos(args.images)
    texts = captions(args.images)
    stored = [process_image(r, ImageConfig()).fields["image"] for r in raw]
    print(f"# {args.images} real-photo JPEGs (300-900 px, {sum(map(len, raw)) / len(raw) / 1024:.0f} KiB avg) "
          f"made in {time.perf_counter() - t:.0f} s; load average {load0[0]:.2f}", flush=True)
    tmp = args.keep or tempfile.mkdtemp(prefix="pipe-vs-models-")
    try:
        pool, small = os.path.join(tmp, "pool"), os.path.join(tmp, "pool-small")
        write_pool(pool, raw, texts)
        write_pool(small, raw[:args.startup_images], texts[:args.startup_images])
        extra = list(args.pipeline_arg)
        if args.streams > 1:
            extra += [f"--direct_num_workers={args.streams}", "--direct_running_mode=multi_processing"]
        fixed = run_pipeline(small, os.path.join(tmp, "out-small"), args, extra)
        full = run_pipeline(pool, os.path.join(tmp, "out"), args, extra)
        counters = full.get("counters", {})
        n_safety = int(counters.get("safety_in", args.images))
        bare = bare_loop(stored, texts, n_safety, args)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    n, n0 = args.images, args.startup_images
    wall, wall0 = full["bench_wall_s"], fixed["bench_wall_s"]
    pipe = n / wall
    steady = (n - n0) / max(wall - wall0, 1e-9)
    load1 = os.getloadavg()
    print(f"# model {args.model}@{args.pretrained} {args.precision} batch {args.batch_size} (opennsfw "
          f"{args.nsfw_batch_size}, {bare['nsfw_backend']}) on {bare['device']}: "
          f"{platform.machine()} {os.cpu_count()} cores, {args.streams} stream(s) x {bare['torch_threads']} torch "
          f"threads; "
          f"load average {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"# rows reaching safety: {n_safety} of {n}; curated {full.get('curated_rows')}, "
          f"rejected {full.get('rejected_rows')} {json.dumps(full.get('rejected_by', {}))}")
    print("# bare loop per image: CLIP image+text {clip_ms_per_image:.1f} ms, opennsfw {nsfw_ms_per_image:.1f} ms "
          "(host preprocessing outside the clock: CLIP {clip_prep_ms_per_image:.2f} ms, opennsfw "
          "{nsfw_prep_ms_per_image:.2f} ms)".format(**bare))
    print("# pipeline busy ms per input image by stage (stats.json timings):")
    for name, ms in sorted(full.get("timings", {}).items(), key=lambda kv: -kv[1]):
        if name.endswith("_msecs"):
            print(f"#   {name:<32}{ms / n:8.2f}")
    print(f"{'side':<34}{'images/s':>10}")
    print(f"{'bare model loop':<34}{bare['images_per_s']:>10.2f}")
    print(f"{'pipeline (wall, with start-up)':<34}{pipe:>10.2f}")
    print(f"{'pipeline (steady, start-up removed)':<34}{steady:>10.2f}")
    cpu_pipe = 1000 * full["bench_cpu_s"] / n
    cpu_steady = 1000 * (full["bench_cpu_s"] - fixed["bench_cpu_s"]) / (n - n0)
    print(f"fixed cost of a run: {wall0 - n0 / steady:.1f} s")
    print(f"CPU ms per image: bare {bare['cpu_ms_per_image']:.1f}, pipeline {cpu_pipe:.1f} "
          f"(steady {cpu_steady:.1f}); pipeline wall {full.get('timings', {}).get('wall_seconds')} s")
    print(f"ratio pipeline/bare: wall {pipe / bare['images_per_s']:.3f}  steady {steady / bare['images_per_s']:.3f}  "
          f"CPU time {bare['cpu_ms_per_image'] / cpu_pipe:.3f} (steady {bare['cpu_ms_per_image'] / cpu_steady:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
