"""Dedup scaling: semantic (SemDeDup) and near-duplicate (pHash LSH) cores at growing sizes.

Measures the per-key work the Beam stage does (k-means fit on a sample, key assignment with multi-probing,
grouping by key, the per-bucket decision rule) in one process, with synthetic clustered 512-d embeddings
(2.5 % of rows are near-duplicate twins of another row) and random 64-bit pHashes (2.5 % near twins). Reports wall time and peak RSS per
size; time per row should stay roughly flat (n log n), not grow linearly (n²). The Beam shuffle itself is
the runner's job and is not timed here.

    python bench/dedup_scale.py --sizes 10000,100000,1000000
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from collections import defaultdict

import numpy as np

from clip_curate.dedup import DedupConfig, _semantic_model, band_keys, bucket_decisions, semantic_keys


def clustered_embeddings(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    k = max(10, n // 1000)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    x = centres[rng.integers(0, k, n)] + 0.9 * rng.standard_normal((n, d)).astype(np.float32)
    twins = rng.choice(n, n // 20, replace=False)
    a, b = twins[0::2], twins[1::2][: len(twins) // 2]
    x[b] = x[a[: len(b)]] + 0.01 * rng.standard_normal((len(b), d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_semantic(n: int, rng) -> tuple[float, int]:
    cfg = DedupConfig(dedup=("semantic",))
    x = clustered_embeddings(n, 512, rng)
    t0 = time.perf_counter()
    sample = list(x[rng.choice(n, min(n, cfg.semantic_sample), replace=False)])
    centroids, planes, bits = _semantic_model(sample, cfg, n)
    groups = defaultdict(list)
    for start in range(0, n, 4096):  # nearest centroids in blocks, then multi-probe keys per row
        block = x[start:start + 4096]
        for i, e in enumerate(block):
            for key in semantic_keys(e, centroids, planes, bits):
                groups[key].append({"uid": f"u{start + i:08d}", "rank": (0.0, 0, f"u{start + i:08d}"), "emb": e})
    dropped = len({u for members in groups.values() for u, _ in bucket_decisions(members, "semantic", cfg)})
    return time.perf_counter() - t0, dropped


def bench_near(n: int, rng) -> tuple[float, int]:
    cfg = DedupConfig(dedup=("near",), near_dup_hamming=6)
    hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    twins = rng.choice(n, n // 20, replace=False)
    a, b = twins[0::2], twins[1::2][: len(twins) // 2]
    hashes[b] = hashes[a[: len(b)]] ^ np.uint64(0b101)
    t0 = time.perf_counter()
    groups = defaultdict(list)
    for i, h in enumerate(hashes.tolist()):
        m = {"uid": f"u{i:08d}", "rank": (0.0, 0, f"u{i:08d}"), "phash": h}
        for key in band_keys(h, cfg.near_dup_hamming):
            groups[key].append(m)
    dropped = len({u for members in groups.values() for u, _ in bucket_decisions(members, "near", cfg)})
    return time.perf_counter() - t0, dropped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--kinds", default="semantic,near")
    args = p.parse_args(argv)
    rows = []
    for kind in args.kinds.split(","):
        for n in map(int, args.sizes.split(",")):
            rng = np.random.default_rng(0)
            wall, dropped = (bench_semantic if kind == "semantic" else bench_near)(n, rng)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append((kind, n, wall, dropped, peak))
            print(f"# {kind} n={n}: {wall:.1f} s, dropped {dropped}, peak RSS {peak:.0f} MB", file=sys.stderr)
    print("| kind | rows | wall s | µs/row | dropped | peak RSS MB (process so far) |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, n, wall, dropped, peak in rows:
        print(f"| {kind} | {n} | {wall:.1f} | {1e6 * wall / n:.0f} | {dropped} | {peak:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
