"""Dedup scaling: semantic (SemDeDup) and near-duplicate (pHash LSH) at growing sizes.

What is timed (``core`` rows): the work the Beam stage does, in one process, without the runner:
semantic = faiss k-means on a 50k sample + split planning (``fit_semantic_model``), cluster/sub-bucket
keys for every row (``semantic_keys``), grouping by key, the per-group rule (``bucket_decisions`` →
``semantic_best_dropper``) and the per-uid combination; near = LSH band keys for every row, grouping by
key, the per-bucket rule (``bucket_decisions`` → ``near_best_dropper``) and the combination. Grouping is a
numpy sort standing in for the runner's shuffle. ``beam`` rows run the real ``Dedup`` transform on the
DirectRunner (in-memory, one process) on the same data, end to end.

Data: 512-d embeddings around n/500 random centres (cosine between members of a cluster ≈ 0.55) with
2.5 % planted twins (cosine ≈ 0.97 to their source); random 64-bit pHashes with 2.5 % twins 1–6 bits
away. Recall is measured on the planted twins (twin or source dropped, naming the other); at 10k rows
the semantic rule is also checked against exact all-pairs (missed = close pairs never sharing a bucket).
Each size runs in a fresh subprocess so peak RSS is per size.

    python bench/dedup_scale.py --sizes 10000,100000,1000000 --beam-sizes 10000
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

D = 512


def embeddings(n: int, seed: int = 0, spread: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = max(10, n // 500)
    x = np.empty((n, D), np.float32)
    centre_of = rng.integers(0, k, n)
    centres = rng.standard_normal((k, D)).astype(np.float32)
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        x[s:e] = centres[centre_of[s:e]] + spread * rng.standard_normal((e - s, D), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    twins = rng.choice(n, 2 * (n // 40), replace=False).reshape(2, -1)  # (source, twin) pairs
    x[twins[1]] = x[twins[0]] + 0.0108 * rng.standard_normal((twins.shape[1], D), dtype=np.float32)
    x[twins[1]] /= np.linalg.norm(x[twins[1]], axis=1, keepdims=True)
    return x, twins


def phashes(n: int, hamming: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    twins = rng.choice(n, 2 * (n // 40), replace=False).reshape(2, -1)
    t = h[twins[0]].copy()
    for j in range(twins.shape[1]):
        for bit in rng.choice(64, int(rng.integers(1, hamming + 1)), replace=False):
            t[j] ^= np.uint64(1) << np.uint64(int(bit))
    h[twins[1]] = t
    return h, twins


def _groups(row_of: np.ndarray, key_of: np.ndarray):
    """Rows per key (the shuffle's job in Beam): yields index arrays of groups with >= 2 members."""
    order = np.argsort(key_of, kind="stable")
    k, r = key_of[order], row_of[order]
    cuts = np.nonzero(k[1:] != k[:-1])[0] + 1
    for g in np.split(r, cuts):
        if len(g) > 1:
            yield g


def _combine(n: int, pairs: list[tuple[np.ndarray, np.ndarray]], score: np.ndarray) -> np.ndarray:
    """Per row: the best-ranked dropper over all its buckets (-1 = kept)."""
    best = np.full(n, -1, np.int64)
    if pairs:
        x = np.concatenate([p[0] for p in pairs])
        y = np.concatenate([p[1] for p in pairs])
        order = np.lexsort((y, -score[y], x))  # by row, then best-ranked dropper first
        x, y = x[order], y[order]
        first = np.concatenate([[True], x[1:] != x[:-1]])
        best[x[first]] = y[first]
    return best


def _recall(best: np.ndarray, twins: np.ndarray) -> float:
    a, b = twins
    return float(np.mean((best[a] == b) | (best[b] == a)))


def core_semantic(n: int, threshold: float = 0.95, max_group: int = 5000, sample: int = 50_000,
                  spread: float = 0.9) -> dict:
    from clip_curate.stages.dedup.semantic import fit_semantic_model, semantic_best_dropper, semantic_keys

    x, twins = embeddings(n, spread=spread)
    score = np.random.default_rng(1).random(n).astype(np.float32)  # clip_score: the rank
    t0 = time.perf_counter()
    pick = np.random.default_rng(2).permutation(n)[:min(n, sample)]
    model = fit_semantic_model(list(x[np.sort(pick)]), n, threshold, 0, max_group)
    t_fit = time.perf_counter()
    rows, keys, key_ids = [], [], {}
    for s in range(0, n, 4096):
        for i, ks in enumerate(semantic_keys(x[s:s + 4096], model), start=s):
            for k in ks:
                rows.append(i)
                keys.append(key_ids.setdefault(k, len(key_ids)))
    rows, keys = np.array(rows), np.array(keys)
    t_keys = time.perf_counter()
    pairs, sizes = [], []
    for g in _groups(rows, keys):
        g = g[np.argsort(-score[g], kind="stable")]  # rank order
        sizes.append(len(g))
        found = semantic_best_dropper(x[g], threshold)
        hit = found >= 0
        pairs.append((g[hit], g[found[hit]]))
    best = _combine(n, pairs, score)
    t_end = time.perf_counter()
    out = {"kind": "semantic", "rows": n, "mode": "core", "spread": spread, "wall_s": t_end - t0, "fit_s": t_fit - t0,
           "keys_s": t_keys - t_fit, "decide_s": t_end - t_keys, "k": int(len(model.centroids)),
           "keys_per_row": len(rows) / n, "max_group": int(max(sizes, default=0)),
           "dropped": int((best >= 0).sum()), "twin_recall": _recall(best, twins)}
    if n <= 20_000:  # exact all-pairs reference: which close pairs never met?
        order = np.argsort(-score, kind="stable")
        ref = np.full(n, -1)
        f = semantic_best_dropper(x[order], threshold)
        ref[order[f >= 0]] = order[f[f >= 0]]
        out["all_pairs_dropped"] = int((ref >= 0).sum())
        out["vs_all_pairs_recall"] = float(((best >= 0) & (ref >= 0)).sum() / max((ref >= 0).sum(), 1))
    return out


def core_near(n: int, hamming: int = 6) -> dict:
    from clip_curate.stages.dedup.near import band_masks, near_best_dropper

    h, twins = phashes(n, hamming)
    score = np.random.default_rng(1).random(n).astype(np.float32)
    t0 = time.perf_counter()
    masks = band_masks(hamming)
    rows = np.tile(np.arange(n), len(masks))
    keys = np.concatenate([h & np.uint64(m) for m in masks])  # key = (band id, masked value)
    band_id = np.repeat(np.arange(len(masks), dtype=np.uint64), n)
    t_keys = time.perf_counter()
    pairs, sizes = [], []
    order = np.lexsort((keys, band_id))
    k1, k2, r = band_id[order], keys[order], rows[order]
    cuts = np.nonzero((k1[1:] != k1[:-1]) | (k2[1:] != k2[:-1]))[0] + 1
    for g in np.split(r, cuts):
        if len(g) < 2:
            continue
        g = g[np.argsort(-score[g], kind="stable")]
        sizes.append(len(g))
        found = near_best_dropper(h[g], hamming)
        hit = found >= 0
        pairs.append((g[hit], g[found[hit]]))
    best = _combine(n, pairs, score)
    t_end = time.perf_counter()
    return {"kind": "near", "rows": n, "mode": "core", "wall_s": t_end - t0, "keys_s": t_keys - t0,
            "decide_s": t_end - t_keys, "max_group": int(max(sizes, default=0)), "keys_per_row": len(masks),
            "dropped": int((best >= 0).sum()), "twin_recall": _recall(best, twins)}


def _rows(_, kind: str, n: int):
    score = np.random.default_rng(1).random(n)
    if kind == "semantic":
        x = embeddings(n)[0]
        for i in range(n):
            yield {"uid": f"u{i:08d}", "clip_score": float(score[i]), "image_embedding": x[i]}
    else:
        h = phashes(n, 6)[0]
        for i in range(n):
            yield {"uid": f"u{i:08d}", "clip_score": float(score[i]), "phash": f"{int(h[i]):016x}"}


def beam_run(kind: str, n: int) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from clip_curate.stages.dedup import Dedup, DedupConfig

    cfg = DedupConfig(dedup=(kind,))
    twins = (embeddings(n) if kind == "semantic" else phashes(n, 6))[1]
    out_dir = tempfile.mkdtemp(prefix="dedup-bench-")
    t0 = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(flags=[], direct_running_mode="in_memory")) as p:
        # rows are generated inside the pipeline: a large Create would be pickled into the job graph
        rows = p | beam.Create([0]) | beam.FlatMap(_rows, kind, n) | beam.Reshuffle()
        _, rejected = rows | Dedup(cfg)
        (rejected | beam.Map(lambda r: f"{r['uid']} {r['detail'].rsplit(' ', 1)[-1]}")
         | beam.io.WriteToText(os.path.join(out_dir, "rejected")))
    wall = time.perf_counter() - t0
    dropped = dict(line.split() for f in glob.glob(os.path.join(out_dir, "rejected*")) for line in open(f))
    best = np.full(n, -1)
    for u, d in dropped.items():
        best[int(u[1:])] = int(d[1:])
    return {"kind": kind, "rows": n, "mode": "beam", "wall_s": wall, "dropped": len(dropped),
            "twin_recall": _recall(best, twins)}


def _one(spec: str) -> dict:
    mode, kind, n, spread = spec.split(":")
    if mode == "beam":
        out = beam_run(kind, int(n))
    else:
        out = core_semantic(int(n), spread=float(spread)) if kind == "semantic" else core_near(int(n))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def print_table(results: list[dict]) -> None:
    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else ""

    print("| kind | what | rows | wall s | µs/row | peak RSS MB | k | keys/row | largest group | dropped "
          "| twin recall | recall vs all pairs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        what = r["mode"] + (f" (spread {r['spread']:g})" if r.get("spread", 0.9) != 0.9 else "")
        print(f"| {r['kind']} | {what} | {r['rows']:,} | {r['wall_s']:.1f} | {1e6 * r['wall_s'] / r['rows']:.0f} "
              f"| {r['peak_rss_mb']:.0f} | {cell(r, 'k', 'd')} | {cell(r, 'keys_per_row', '.3f')} "
              f"| {cell(r, 'max_group', ',')} | {r['dropped']:,} | {r['twin_recall']:.3f} "
              f"| {cell(r, 'vs_all_pairs_recall', '.3f')} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000", help="core sizes (comma-separated)")
    p.add_argument("--beam-sizes", default="10000", help="sizes also run through the Beam transform ('' = none)")
    p.add_argument("--kinds", default="semantic,near")
    p.add_argument("--spread", type=float, default=0.9,
                   help="semantic core: noise around cluster centres (0.9: member cosine ~0.55; 4: ~0.06, "
                        "heavily overlapping clusters)")
    p.add_argument("--threads", type=int, default=2, help="BLAS/faiss threads (the target is 2 cores)")
    p.add_argument("--json", help="append each result as a JSON line to this file")
    p.add_argument("--table", help="only print the table of a --json file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        print_table([json.loads(line) for line in open(args.table)])
        return 0
    if args.one:
        print(json.dumps(_one(args.one)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    specs = [f"core:{k}:{n}:{args.spread}" for k in args.kinds.split(",") for n in args.sizes.split(",") if n]
    specs += [f"beam:{k}:{n}:{args.spread}" for k in args.kinds.split(",") for n in args.beam_sizes.split(",") if n]
    results = []
    for spec in specs:
        proc = subprocess.run([sys.executable, __file__, "--one", spec], env=env, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print("#", json.dumps(r), file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
