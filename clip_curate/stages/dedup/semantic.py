"""Dedup kind ``semantic``: CLIP image embeddings within a cosine threshold (SemDeDup).

Keys: k-means clusters fitted on a deterministic sample (a side input), each split along principal
directions into bounded sub-buckets; rows near a boundary go to both sides, so close pairs share a key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import apache_beam as beam
import numpy as np

from clip_curate.records import METRICS_NAMESPACE as NS, uid_hash
from clip_curate.stages.dedup.core import DedupKind, KindInputs, register_kind
from clip_curate.stages.dedup.rule import decide_bucket


def semantic_best_dropper(emb: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """For embeddings in rank order: index of the best-ranked earlier row with cosine >= threshold, or -1."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(emb)
    found = np.full(n, -1, dtype=np.int64)
    for i0 in range(1, n, block):
        i1 = min(i0 + block, n)
        open_rows = np.arange(i1 - i0)
        for j0 in range(0, i1, block):
            j1 = min(j0 + block, i1)
            open_rows = open_rows[found[i0 + open_rows] < 0]
            if not len(open_rows):
                break
            close = (emb[i0 + open_rows] @ emb[j0:j1].T) >= threshold
            close &= (np.arange(j0, j1)[None, :] < (i0 + open_rows)[:, None])
            hit = close.any(axis=1)
            found[i0 + open_rows[hit]] = j0 + np.argmax(close[hit], axis=1)
    return found


@dataclass
class SemanticModel:
    """Centroids (k, d) and, per cluster, ``bits[c]`` split directions with their median thresholds."""

    centroids: np.ndarray
    directions: np.ndarray  # (k, max_bits, d)
    medians: np.ndarray     # (k, max_bits)
    bits: np.ndarray        # (k,)
    cluster_margin: float   # also probe clusters nearly as close as the nearest
    split_margin: float     # rows this close to a split plane go to both sides
    expected_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def empty(self) -> bool:
        return self.centroids.shape[0] == 0


def semantic_margins(threshold: float, dim: int) -> tuple[float, float]:
    """(cluster margin, split margin) for a cosine threshold in ``dim`` dimensions.

    Two unit vectors with cosine >= t are at most r = sqrt(2 - 2t) apart; their projections on a unit
    direction differ by at most r and, for a difference in a random direction, by about r / sqrt(d).
    The margins cover 4 standard deviations of that (capped at the worst case): a pair is split only
    when its difference lies unusually along a centroid or split direction.
    """
    r = math.sqrt(max(0.0, 2 - 2 * threshold))
    stat = 4 * r / math.sqrt(max(dim, 1))
    return min(r, 2 * stat), min(r / 2, stat)


def auto_clusters(n_rows: int, sample_size: int) -> int:
    """k for ``--semantic-clusters 0``: about one cluster per 1000 rows, at least 40 sample points each."""
    return max(1, min(round(n_rows / 1000), sample_size // 40))


def fit_semantic_model(sample: Sequence[np.ndarray], n_rows: int, threshold: float, clusters: int,
                       max_group: int, seed: int = 0) -> SemanticModel:
    """Fit spherical k-means (faiss) on the sample; plan splits so groups stay within ``max_group``.

    A cluster expected (from the sample, scaled to ``n_rows``) to exceed the bound is cut along its top-b
    principal directions, each at the sample median (balanced halves). b starts at
    ceil(log2(expected / max_group)) and grows while the sample, keyed exactly as rows will be (with the
    overlaps), still predicts a sub-bucket above 80 % of ``max_group``.
    """
    if len(sample) == 0:
        return SemanticModel(np.zeros((0, 1), np.float32), np.zeros((0, 0, 1), np.float32),
                             np.zeros((0, 0), np.float32), np.zeros(0, np.int64), 0.0, 0.0)
    import faiss

    x = np.ascontiguousarray(np.stack(sample).astype(np.float32))
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n_rows = max(n_rows, len(x))
    k = clusters or auto_clusters(n_rows, len(x))
    k = max(1, min(k, len(x)))
    if k == 1:
        centroids = x.mean(axis=0, keepdims=True)
    else:
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=256, min_points_per_centroid=1)
        km.train(x)
        centroids = km.centroids
    centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    centroids = centroids.astype(np.float32)
    assign = np.argmax(x @ centroids.T, axis=1)
    scale = n_rows / len(x)
    expected = np.bincount(assign, minlength=k) * scale
    bits = np.array([min(12, math.ceil(math.log2(e / max_group))) if e > max_group else 0 for e in expected],
                    dtype=np.int64)
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    cluster_margin, split_margin = semantic_margins(threshold, d)
    pcs: dict[int, np.ndarray] = {}

    def directions_of(c: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        members = x[assign == c]
        if c not in pcs:
            resid = members - members.mean(axis=0) if len(members) else np.zeros((0, d), np.float32)
            vt = np.linalg.svd(resid, full_matrices=False)[2] if len(members) > 1 else np.zeros((0, d))
            pcs[c] = vt[:12]
        dirs = pcs[c][:b]
        if len(dirs) < b:
            dirs = np.concatenate([dirs, rng.standard_normal((b - len(dirs), d))])
        dirs = (dirs / np.linalg.norm(dirs, axis=1, keepdims=True)).astype(np.float32)
        meds = np.median(members @ dirs.T, axis=0) if len(members) else np.zeros(b)
        return dirs, meds.astype(np.float32)

    planned: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(8):
        for c in np.nonzero(bits)[0]:
            if c not in planned or len(planned[c][0]) != bits[c]:
                planned[int(c)] = directions_of(int(c), int(bits[c]))
        max_bits = int(bits.max())
        directions = np.zeros((k, max_bits, d), np.float32)
        medians = np.zeros((k, max_bits), np.float32)
        for c, (dirs, meds) in planned.items():
            directions[c, :len(dirs)], medians[c, :len(meds)] = dirs, meds
        model = SemanticModel(centroids, directions, medians, bits.copy(), cluster_margin, split_margin, expected)
        sizes: dict[tuple[int, int], int] = {}
        for keys in semantic_keys(x, model):
            for key in keys:
                sizes[key] = sizes.get(key, 0) + 1
        over = {c for (c, _), s in sizes.items() if s * scale > 0.8 * max_group and bits[c] < 12}
        if not over:
            break
        for c in over:
            bits[c] += 1
    return model


def semantic_keys(emb: np.ndarray, model: SemanticModel, max_clusters: int = 3,
                  max_probe_bits: int = 2) -> list[list[tuple[int, int]]]:
    """``(cluster, sub_bucket)`` keys of each row of ``emb`` (n, d).

    A row goes to its nearest centroid and to up to ``max_clusters - 1`` others within the cluster
    margin. Inside a split cluster the sub-bucket is the pattern of sides of the split planes; for the
    ``max_probe_bits`` bits whose projection is nearest the cut (when within the split margin) the row
    goes to both sides, so close pairs straddling a cut still meet.
    """
    emb = np.asarray(emb, dtype=np.float32)
    n = len(emb)
    out: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    if model.empty or not n:
        return out
    sims = emb @ model.centroids.T
    k = sims.shape[1]
    top = min(max_clusters, k)
    cand = np.argpartition(-sims, top - 1, axis=1)[:, :top] if top < k else np.tile(np.arange(k), (n, 1))
    cs = np.take_along_axis(sims, cand, 1)
    order = np.lexsort((cand, -cs))  # per row: most similar first, ties by cluster id
    cand, cs = np.take_along_axis(cand, order, 1), np.take_along_axis(cs, order, 1)
    ok = cs >= cs[:, :1] - model.cluster_margin
    ok[:, 0] = True
    rows, cols = np.nonzero(ok)
    clusters = cand[rows, cols]
    subs: dict[int, np.ndarray] = {}  # entry index -> sub-bucket codes
    split = np.nonzero(model.bits[clusters] > 0)[0]
    for c in np.unique(clusters[split]):
        entries = split[clusters[split] == c]
        b = int(model.bits[c])
        off = emb[rows[entries]] @ model.directions[c, :b].T - model.medians[c, :b]
        codes = ((off > 0).astype(np.int64) << np.arange(b)).sum(axis=1)
        variants = [codes]
        near = np.argsort(np.abs(off), axis=1)[:, :max_probe_bits]
        for j in range(near.shape[1]):
            bit = near[:, j]
            unsure = np.abs(off[np.arange(len(entries)), bit]) < model.split_margin
            flipped = [np.where(unsure, v ^ (1 << bit), -1) for v in variants]
            variants += [np.where(v >= 0, f, -1) for v, f in zip(variants, flipped)]
        stacked = np.stack(variants, axis=1)
        for e, codes_e in zip(entries.tolist(), stacked.tolist()):
            subs[e] = sorted({x for x in codes_e if x >= 0})
    for e, (r, c) in enumerate(zip(rows.tolist(), clusters.tolist())):
        if e in subs:
            out[r].extend((c, s) for s in subs[e])
        else:
            out[r].append((c, 0))
    return out


def _embedding_item(m: dict):
    if m["emb"] is not None:
        yield uid_hash(m["uid"]), m["uid"], m["emb"]
    else:
        beam.metrics.Metrics.counter(NS, "dedup_semantic_no_embedding").inc()


def _fit(sample: list, n_rows: int, cfg, seed: int) -> SemanticModel:
    sample = sorted(sample, key=lambda t: (t[0], t[1]))  # deterministic order for k-means
    return fit_semantic_model([t[2] for t in sample], n_rows, cfg.semantic_cosine, cfg.semantic_clusters,
                              cfg.semantic_max_group, seed)


class _SemanticKeys(beam.DoFn):
    """Batches of compact rows -> ((cluster, sub_bucket), member) for every probed bucket."""

    def __init__(self):
        self._copies = beam.metrics.Metrics.distribution(NS, "dedup_semantic_keys_per_row")

    def process(self, batch, model):
        batch = [m for m in batch if m["emb"] is not None]
        if not batch:
            return
        for m, keys in zip(batch, semantic_keys(np.stack([m["emb"] for m in batch]), model)):
            self._copies.update(len(keys))
            member = (m["uid"], m["rank"], m["emb"])
            for key in keys:
                yield key, member


def _decisions(inp: KindInputs):
    cfg = inp.config
    items = inp.compact | "SemItems" >> beam.FlatMap(_embedding_item)
    n_rows = items | "SemCount" >> beam.combiners.Count.Globally()
    sample = items | "SemSample" >> beam.combiners.Top.Of(cfg.semantic_sample, key=lambda t: (t[0], t[1]))
    model = sample | "SemFit" >> beam.Map(_fit, beam.pvalue.AsSingleton(n_rows), cfg, inp.seed)
    return (inp.members
            | "SemBatch" >> beam.BatchElements(min_batch_size=64, max_batch_size=2048)
            | "SemKeys" >> beam.ParDo(_SemanticKeys(), beam.pvalue.AsSingleton(model))
            | "SemGroup" >> beam.GroupByKey()
            | "SemDecide" >> beam.FlatMap(decide_bucket, "semantic", cfg.semantic_cosine, cfg.semantic_max_group))


register_kind(DedupKind(
    "semantic", "duplicate_semantic", priority=30, decisions=_decisions,
    active=lambda cfg: "semantic" in cfg.dedup,
    best_dropper=lambda payloads, t: semantic_best_dropper(np.stack(payloads), float(t))))
