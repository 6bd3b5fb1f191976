"""How much a CPU forward pass slows down when the other core works: the CLIP forward alone vs beside a neighbour.

The pipeline runs its forward passes while other work (decode, resize, hashes, Beam) runs on the other cores;
the bare model loop of ``bench/pipeline_vs_models.py`` runs them with the other cores idle. This bench pins
a traced ViT-B-32 image tower (random weights, batch 16, 1 torch thread) to CPU 0 and times it

- alone (the other cores idle),
- beside a neighbour process pinned to CPU 1, one at a time:
  ``python`` (a pure-Python loop: the interpreter, little memory traffic),
  ``image`` (the image stage's ``process_image`` on real-photo JPEGs: decode, resize, encode, pHash, ORB —
  the pipeline's own host work),
  ``memory`` (copying a 64 MiB array: memory bandwidth).

Each figure is the median of ``--rounds`` rounds of ``--batches`` batches, in ms per image of wall and CPU
time of the forward's thread; the slowdown is against "alone". Linux only (CPU affinity), >= 2 CPUs.

    python bench/forward_contention.py
    python bench/forward_contention.py --rounds 5 --batches 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

os.environ["OMP_NUM_THREADS"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

NEIGHBOURS = ("python", "image", "memory")


def neighbour(kind: str) -> None:
    """Busy forever with ``kind`` work (run in a child process pinned to another CPU)."""
    if kind == "python":
        while True:
            s = 0
            for i in range(100_000):
                s += i
    elif kind == "image":
        from image_decode import real_photos

        from clip_curate.stages.image import ImageConfig, process_image

        photos, cfg = real_photos(64, seed=1), ImageConfig()
        while True:
            for raw in photos:
                process_image(raw, cfg, hashes=frozenset({"phash", "orb_keypoints"}))
    elif kind == "memory":
        import numpy as np

        a = np.ones(8 * 1024 * 1024)
        while True:
            a.copy()
    else:
        raise SystemExit(f"unknown neighbour {kind!r}: choose from {', '.join(NEIGHBOURS)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=4, help="batches of 16 per round")
    ap.add_argument("--neighbour", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.neighbour:
        os.sched_setaffinity(0, {1})
        neighbour(args.neighbour)
        return 0
    if (os.cpu_count() or 1) < 2 or not hasattr(os, "sched_setaffinity"):
        print("not measured: needs Linux and >= 2 CPUs")
        return 2
    os.sched_setaffinity(0, {0})
    import open_clip
    import torch

    torch.set_num_threads(1)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    x = torch.randn(16, 3, 224, 224)
    with torch.inference_mode():
        tower = torch.jit.trace(model.visual, x, check_trace=False)
        tower(x), tower(x)

        def rounds() -> tuple[float, float]:
            walls, cpus = [], []
            for _ in range(args.rounds):
                t0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(args.batches):
                    tower(x)
                n = 16 * args.batches
                walls.append(1000 * (time.perf_counter() - t0) / n)
                cpus.append(1000 * (time.thread_time() - c0) / n)
            return statistics.median(walls), statistics.median(cpus)

        results = {"alone": rounds()}
        for kind in NEIGHBOURS:
            child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--neighbour", kind])
            try:
                time.sleep(3 if kind == "image" else 1)   # imports and first photos
                results[kind] = rounds()
            finally:
                child.kill()
                child.wait()
        results["alone again"] = rounds()
    base = results["alone"][0]
    print(f"# ViT-B-32 image tower, traced, batch 16, 1 torch thread on CPU 0; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}; median of {args.rounds} rounds x {args.batches} batches")
    print("| CPU 1 runs | ms/image (wall) | ms/image (CPU) | slowdown |")
    print("|---|---:|---:|---:|")
    for name, (wall, cpu) in results.items():
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {wall / base - 1:+.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
