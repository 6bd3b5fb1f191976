"""Benchmark: the Embed stage inside Beam vs a bare open_clip batched loop, same images/model/batch/dtype.

    python bench/embed_vs_open_clip.py                                   # CPU, synthetic-tiny
    python bench/embed_vs_open_clip.py --model ViT-B-32 --pretrained none --precision bf16 --device cuda --batch-size 256 \
        --images 8192                                                     # GPU, random-init ViT-B-32

Both sides start from the same JPEG bytes (``--image-px`` square scenes, quality 90) and captions and do
the same work: decode, the model's own preprocessing, tokenize, both towers, L2-normalise, copy to host.

* bare: ``for batch: PIL decode -> preprocess -> stack -> encode_image/encode_text`` in this process;
  timed after the model is loaded.
* beam: ``Create(chunk files) | FlatMap(load rows) | Embed(config)`` on the DirectRunner. "steady" is
  first Prepare element -> last embedded row (model loading happens in DoFn setup, before);
  "wall" is the whole ``pipeline.run()`` including pipeline start-up and model load.

Prints one table row per side and the ratio beam steady / bare.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_rows(n: int, px: int, seed: int = 0) -> list[dict]:
    """JPEG scenes with smooth backgrounds and a few shapes (realistic JPEG sizes), and captions."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    rows = []
    yy, xx = np.mgrid[0:px, 0:px] / px
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for i in range(n):
        c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
        t = (xx * rng.random() + yy * rng.random())[..., None] / 2
        bg = (c0 * (1 - t) + c1 * t + rng.normal(0, 6, (px, px, 3))).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(bg)
        draw = ImageDraw.Draw(img)
        k = int(rng.integers(1, 5))
        for _ in range(k):
            x, y, r = rng.integers(0, px, 2).tolist() + [int(rng.integers(px // 16, px // 5))]
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.integers(0, 255, 3).tolist()))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        rows.append({"uid": f"b{i:06d}", "url": f"http://127.0.0.1/{i}.jpg",
                     "caption": f"{k} {colours[i % 6]} circles on a smooth background", "image": buf.getvalue()})
    return rows


def bare_loop(rows, loaded, batch_size: int) -> float:
    """images/s of a plain open_clip loop (decode + preprocess + tokenize + both towers)."""
    import torch
    from PIL import Image

    from clip_curate.models.clip import autocast_context

    dev = loaded.device
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        x = torch.stack([loaded.preprocess(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in chunk])
        t = loaded.tokenizer([r["caption"] for r in chunk])
        with torch.inference_mode(), autocast_context(dev.type, loaded.precision):
            ie = loaded.model.encode_image(x.to(dev, non_blocking=True))
            te = loaded.model.encode_text(t.to(dev, non_blocking=True))
        ie = torch.nn.functional.normalize(ie.float(), dim=-1).cpu().numpy()
        te = torch.nn.functional.normalize(te.float(), dim=-1).cpu().numpy()
        n += len(chunk)
    return n / (time.perf_counter() - t0)


def _load_chunk(path):
    with open(path, "rb") as f:
        yield from pickle.load(f)


class _Stamp:
    """DoFn factory recording wall-clock ms of the first/last element (Beam distribution min/max)."""

    @staticmethod
    def make(name):
        import apache_beam as beam

        class Stamp(beam.DoFn):
            def setup(self):
                self._d = beam.metrics.Metrics.distribution("bench", name)

            def process(self, x):
                self._d.update(int(time.time() * 1000))
                yield x

        return Stamp()


def beam_run(chunk_paths, cfg, n: int, beam_args: list[str]) -> tuple[float, float]:
    """(steady images/s, wall images/s) of the Embed stage on the DirectRunner."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from clip_curate.stages.embed import Embed

    p = beam.Pipeline(options=PipelineOptions(beam_args))
    rows = (p | beam.Create(chunk_paths) | "Load" >> beam.FlatMap(_load_chunk)
            | "In" >> beam.ParDo(_Stamp.make("first_in")))
    kept, rejected = rows | Embed(cfg)
    _ = kept | "Out" >> beam.ParDo(_Stamp.make("last_out")) | "Count" >> beam.combiners.Count.Globally()
    t0 = time.perf_counter()
    result = p.run()
    result.wait_until_finish()
    wall = time.perf_counter() - t0
    dists = {d.key.metric.name: d.committed
             for d in result.metrics().query(MetricsFilter().with_namespace("bench"))["distributions"]}
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_name("embedded_rows"))["counters"]}
    assert counters.get("embedded_rows") == n, counters
    steady = (dists["last_out"].max - dists["first_in"].min) / 1000.0
    return n / steady, n / wall


def device_name(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic-tiny")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--image-px", type=int, default=256, help="side of the JPEG scenes")
    ap.add_argument("--repeats", type=int, default=1, help="take the best of N runs of each side")
    ap.add_argument("--beam-arg", action="append", default=[],
                    help="extra Beam option, e.g. --beam-arg=--direct_running_mode=multi_threading")
    args = ap.parse_args(argv)

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("not measured: no GPU available (--device cuda)")
        return 2
    from clip_curate.models.clip import ModelConfig, load_clip

    cfg = ModelConfig(clip_model=args.model, clip_pretrained=args.pretrained, device=args.device,
                      precision=args.precision, batch_size=args.batch_size)
    t = time.perf_counter()
    rows = make_rows(args.images, args.image_px)
    print(f"# {args.images} JPEGs of {args.image_px}px ({sum(len(r['image']) for r in rows) / len(rows) / 1024:.1f} "
          f"KiB avg) made in {time.perf_counter() - t:.1f}s", flush=True)
    loaded = load_clip(cfg)
    # warm-up (CUDA context, kernels, allocator) on both sides' behalf
    bare_loop(rows[:args.batch_size * 2], loaded, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        per = max(args.batch_size * 4, 256)
        for i in range(0, len(rows), per):
            paths.append(os.path.join(tmp, f"chunk{i:07d}.pkl"))
            with open(paths[-1], "wb") as f:
                pickle.dump(rows[i:i + per], f)
        beam_args = ["--direct_num_workers=1", "--direct_running_mode=in_memory"] + args.beam_arg
        bares, results = [], []
        for _ in range(args.repeats):  # alternate the sides so load changes on the machine hit both
            bares.append(bare_loop(rows, loaded, args.batch_size))
            results.append(beam_run(paths, cfg, len(rows), beam_args))
        bare = max(bares)
        steady, wall = max(r[0] for r in results), max(r[1] for r in results)
    dev = torch.device("cuda" if cfg.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    print(f"# model {args.model}{'@' + args.pretrained if args.pretrained else ''}  precision {args.precision}  "
          f"batch {args.batch_size}  device: {device_name(dev)}  beam args: {' '.join(beam_args)}")
    print(f"{'side':<28}{'images/s':>10}")
    print(f"{'bare open_clip loop':<28}{bare:>10.1f}")
    print(f"{'Beam Embed (steady)':<28}{steady:>10.1f}")
    print(f"{'Beam Embed (wall, w/ start)':<28}{wall:>10.1f}")
    print(f"ratio beam/bare (steady): {steady / bare:.3f}   (wall: {wall / bare:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
