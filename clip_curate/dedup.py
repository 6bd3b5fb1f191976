"""Deduplication as keyed Beam stages: exact, near-duplicate (pHash + LSH bands), semantic (SemDeDup)
and eval-set decontamination.

Decision rule (shared by every kind): rows meet only under a shared key (a hash, an LSH band, a k-means
cluster and sub-bucket). Within a key, row x is dropped when some **better-ranked** row y sharing the key
is within the kind's threshold — whether or not y is itself dropped by something else. Rank: higher
``clip_score`` first, then larger image (width × height), then smaller ``uid``. The rule needs no global
connected-components pass and gives the same decisions for any worker count, bundle split or input order.
A row seen in several buckets is decided once: decisions are joined back to rows by ``uid``.
``detail`` names the better-ranked uid that caused the drop (or the matched eval item).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit, urlunsplit

import apache_beam as beam
import numpy as np

from clip_curate import records
from clip_curate.options import ConfigError, opt

KINDS = ("exact", "near", "semantic")
REASON = {"exact": "duplicate_exact", "near": "duplicate_near", "semantic": "duplicate_semantic"}
PRIORITY = {"duplicate_exact": 0, "eval_leak": 1, "duplicate_near": 2, "duplicate_semantic": 3}


@dataclass(frozen=True)
class DedupConfig:
    """Which duplicates are dropped, and how close counts as a duplicate."""

    dedup: tuple[str, ...] = opt(("exact", "near"), "dedup kinds: exact (URL, image sha256), near (pHash + "
                                                    "LSH), semantic (CLIP embeddings, SemDeDup), or none")
    dedup_caption_pairs: bool = opt(False, "exact dedup by image + caption pair instead of image alone")
    near_dup_hamming: int = opt(6, "pHash Hamming distance (of 64 bits) at or below which images are near duplicates")
    semantic_threshold: float = opt(0.95, "cosine similarity of image embeddings at or above which rows are "
                                          "semantic duplicates")
    semantic_clusters: int = opt(0, "k-means clusters for semantic dedup (0 = about rows / 1000)")
    semantic_sample: int = opt(20_000, "embeddings sampled to fit the k-means centroids")
    semantic_max_group: int = opt(5_000, "memory bound: rows compared together at most (large clusters are "
                                         "split by random-hyperplane sub-buckets)")
    decontaminate: str | None = opt(None, "eval set to remove leaks of: a directory of images, or a Parquet "
                                          "file with an image (bytes) and/or image_embedding column")
    decontaminate_hamming: int = opt(6, "pHash distance at or below which a row matches an eval image")
    decontaminate_threshold: float = opt(0.95, "embedding cosine at or above which a row matches an eval item")

    def __post_init__(self):
        kinds = tuple(k.strip().lower() for k in self.dedup if k.strip())
        if kinds == ("none",):
            kinds = ()
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ConfigError(f"--dedup: unknown kind(s) {', '.join(bad)}; choose from exact,near,semantic or none")
        object.__setattr__(self, "dedup", kinds)
        if not 0 <= self.near_dup_hamming <= 32:
            raise ConfigError(f"--near-dup-hamming must be 0..32, got {self.near_dup_hamming}")
        if not 0 <= self.decontaminate_hamming <= 32:
            raise ConfigError(f"--decontaminate-hamming must be 0..32, got {self.decontaminate_hamming}")
        for flag, v in (("--semantic-threshold", self.semantic_threshold),
                        ("--decontaminate-threshold", self.decontaminate_threshold)):
            if not 0 < v <= 1:
                raise ConfigError(f"{flag} must be in (0, 1], got {v}")
        if self.semantic_sample < 10 or self.semantic_max_group < 10 or self.semantic_clusters < 0:
            raise ConfigError("--semantic-sample and --semantic-max-group must be >= 10, --semantic-clusters >= 0")

    def validate_environment(self) -> None:
        if self.decontaminate and not _exists(self.decontaminate):
            raise ConfigError(f"--decontaminate: not found: {self.decontaminate}")

    @property
    def active(self) -> bool:
        return bool(self.dedup or self.decontaminate)


def _exists(path: str) -> bool:
    import fsspec
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


# ---------------------------------------------------------------------------------------------
# Pure core

def rank_key(row: dict[str, Any]) -> tuple:
    """Smaller is better: higher clip_score, then larger image, then smaller uid."""
    score = row.get("clip_score")
    score = -float(score) if score is not None and not math.isnan(float(score)) else math.inf
    area = -int(row.get("width") or 0) * int(row.get("height") or 0)
    return (score, area, str(row["uid"]))


def normalize_url(url: str | None) -> str | None:
    """Lower-case scheme and host, drop default ports and the fragment."""
    if not url:
        return None
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url
    host = (parts.hostname or "").lower()
    port = parts.port if parts.port not in (None, 80, 443) else None
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, ""))


def phash_int(phash: str | None) -> int | None:
    return int(phash, 16) if phash else None


def band_keys(phash: int, hamming: int) -> list[tuple[int, int]]:
    """Pigeonhole LSH: split 64 bits into hamming+1 bands; two hashes within ``hamming`` share a band."""
    n = hamming + 1
    keys, start = [], 0
    for b in range(n):
        width = 64 // n + (1 if b < 64 % n else 0)
        keys.append((b, (phash >> start) & ((1 << width) - 1)))
        start += width
    return keys


def popcount64(x: np.ndarray) -> np.ndarray:
    """Bit count of uint64 values."""
    x = x.astype(np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1).astype(np.int64)


def bucket_decisions(members: list[dict], kind: str, cfg: DedupConfig) -> Iterator[tuple[str, tuple]]:
    """For one shared key: yield ``(uid, (reason, kept_uid))`` for each member dropped by the rule."""
    if len(members) < 2:
        return
    members = sorted(members, key=lambda m: m["rank"])
    uids = [m["uid"] for m in members]
    if kind == "exact":
        best = uids[0]
        for u in uids[1:]:
            if u != best:
                yield u, (REASON[kind], best)
        return
    if kind == "near":
        hashes = np.array([m["phash"] for m in members], dtype=np.uint64)
        for i in range(1, len(members)):
            close = popcount64(hashes[:i] ^ hashes[i]) <= cfg.near_dup_hamming
            if close.any():
                yield uids[i], (REASON[kind], uids[int(np.argmax(close))])
        return
    emb = np.stack([m["emb"] for m in members]).astype(np.float32)
    block = 2048
    for start in range(1, len(members), block):
        stop = min(start + block, len(members))
        sims = emb[start:stop] @ emb[:stop].T  # rows: candidates x; cols: all better-or-equal ranked
        for r in range(stop - start):
            i = start + r
            close = sims[r, :i] >= cfg.semantic_threshold
            if close.any():
                yield uids[i], (REASON[kind], uids[int(np.argmax(close))])


def fit_centroids(sample: list[np.ndarray], k: int, seed: int = 0) -> np.ndarray:
    """k-means (faiss, spherical) on sampled L2-normalised embeddings -> (k, d) centroids."""
    import faiss

    x = np.ascontiguousarray(np.stack(sample).astype(np.float32))
    k = max(1, min(k, len(x) // 4 or 1))
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=512)
    km.train(x)
    return km.centroids.astype(np.float32)


def semantic_keys(emb: np.ndarray, centroids: np.ndarray, planes: np.ndarray, split_bits: np.ndarray,
                  margin: float = 0.05) -> list[tuple[int, int]]:
    """(cluster, sub-bucket) keys of one embedding, with multi-probing near boundaries so near pairs meet.

    The row goes to its nearest centroid and to any other centroid nearly as close (within ``margin``).
    Inside a cluster with ``b`` split bits, the sub-bucket is the sign pattern of ``b`` random
    hyperplanes; bits whose projection is within ``margin`` of 0 are probed both ways (at most 2).
    """
    sims = centroids @ emb
    order = np.argsort(-sims)
    clusters = [int(order[0])] + [int(c) for c in order[1:3] if sims[c] >= sims[order[0]] - margin]
    keys = []
    for c in clusters:
        b = int(split_bits[c])
        if b == 0:
            keys.append((c, 0))
            continue
        proj = planes[c, :b] @ emb
        base = sum(1 << i for i in range(b) if proj[i] > 0)
        unsure = [i for i in np.argsort(np.abs(proj))[:2] if abs(proj[i]) < margin]
        subs = {base}
        for i in unsure:
            subs |= {s ^ (1 << int(i)) for s in list(subs)}
        keys.extend((c, s) for s in sorted(subs))
    return keys


# ---------------------------------------------------------------------------------------------
# Eval-set decontamination

@dataclass
class EvalSet:
    names: list[str]
    phashes: np.ndarray            # uint64, one per item with an image
    phash_names: list[str]
    embeddings: np.ndarray | None  # (n, d) float32 L2-normalised
    embedding_names: list[str]


def load_eval_set(path: str) -> EvalSet:
    """Eval items from a directory of images or a Parquet with image bytes and/or image_embedding."""
    import io

    import fsspec
    import imagehash
    from PIL import Image

    images: list[tuple[str, bytes]] = []
    embs: list[tuple[str, np.ndarray]] = []
    fs, p = fsspec.core.url_to_fs(path)
    if fs.isdir(p):
        for f in sorted(fs.find(p)):
            if f.lower().rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"):
                images.append((os.path.basename(f), fs.cat_file(f)))
    else:
        import pyarrow.parquet as pq
        with fs.open(p, "rb") as fh:
            table = pq.read_table(fh)
        cols = table.column_names
        name_col = next((c for c in ("uid", "key", "name", "id") if c in cols), None)
        img_col = next((c for c in ("image", "jpg", "png", "image_bytes") if c in cols), None)
        for i, row in enumerate(table.to_pylist()):
            name = str(row[name_col]) if name_col else f"eval-{i}"
            value = row.get(img_col) if img_col else None
            if isinstance(value, dict):
                value = value.get("bytes")
            if value:
                images.append((name, value))
            if row.get("image_embedding") is not None:
                v = np.asarray(row["image_embedding"], dtype=np.float32)
                embs.append((name, v / (np.linalg.norm(v) or 1.0)))
    hashes, hash_names = [], []
    for name, data in images:
        try:
            img = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as exc:
            raise ConfigError(f"--decontaminate: cannot decode eval image {name}: {exc}") from None
        hashes.append(int(str(imagehash.phash(img)), 16))
        hash_names.append(name)
    if not hashes and not embs:
        raise ConfigError(f"--decontaminate {path}: no eval images or embeddings found")
    return EvalSet(names=hash_names + [n for n, _ in embs], phashes=np.array(hashes, dtype=np.uint64),
                   phash_names=hash_names, embeddings=np.stack([e for _, e in embs]) if embs else None,
                   embedding_names=[n for n, _ in embs])


def eval_match(row: dict, ev: EvalSet, cfg: DedupConfig) -> str | None:
    """Name of the eval item ``row`` leaks (pHash or embedding match), else None."""
    h = phash_int(row.get("phash"))
    if h is not None and len(ev.phashes):
        d = popcount64(ev.phashes ^ np.uint64(h))
        i = int(np.argmin(d))
        if d[i] <= cfg.decontaminate_hamming:
            return f"eval item {ev.phash_names[i]} (phash distance {int(d[i])})"
    emb = row.get("image_embedding")
    if emb is not None and ev.embeddings is not None and len(emb) == ev.embeddings.shape[1]:
        sims = ev.embeddings @ np.asarray(emb, dtype=np.float32)
        i = int(np.argmax(sims))
        if sims[i] >= cfg.decontaminate_threshold:
            return f"eval item {ev.embedding_names[i]} (cosine {float(sims[i]):.4f})"
    return None


# ---------------------------------------------------------------------------------------------
# Beam wrappers

def _compact(row: dict) -> dict:
    emb = row.get("image_embedding")
    return {"uid": row["uid"], "rank": rank_key(row), "url": normalize_url(row.get("url")),
            "sha": row.get("sha256"), "caption": row.get("caption"), "phash": phash_int(row.get("phash")),
            "emb": None if emb is None else np.asarray(emb, dtype=np.float32)}


def _exact_keys(m: dict, cfg: DedupConfig) -> Iterator[tuple]:
    if m["url"]:
        yield ("url", m["url"])
    if m["sha"]:
        yield ("pair", m["sha"], m["caption"] or "") if cfg.dedup_caption_pairs else ("sha", m["sha"])


def _slim(m: dict, kind: str) -> dict:
    out = {"uid": m["uid"], "rank": m["rank"]}
    if kind == "near":
        out["phash"] = m["phash"]
    elif kind == "semantic":
        out["emb"] = m["emb"]
    return out


class _SemanticKeys(beam.DoFn):
    def __init__(self, cfg: DedupConfig, estimated_rows: int):
        self._cfg = cfg
        self._n = max(estimated_rows, 1)

    def process(self, m, model):
        if m["emb"] is None:
            return
        centroids, planes, bits = model
        for key in semantic_keys(m["emb"], centroids, planes, bits):
            yield key, _slim(m, "semantic")


def _semantic_model(sample: list, cfg: DedupConfig, estimated_rows: int, seed: int = 0):
    """(centroids, hyperplanes, split bits per cluster) fitted on the sample."""
    if not sample:
        return np.zeros((1, 1), np.float32), np.zeros((1, 0, 1), np.float32), np.zeros(1, np.int64)
    # auto k: ~1000 rows per cluster, but at least 40 sample points per centroid (faiss' own minimum)
    k = cfg.semantic_clusters or max(1, min(round(estimated_rows / 1000), len(sample) // 40))
    centroids = fit_centroids(sample, k, seed)
    x = np.stack(sample).astype(np.float32)
    assign = np.argmax(x @ centroids.T, axis=1)
    frac = np.bincount(assign, minlength=len(centroids)) / len(x)
    expected = frac * max(estimated_rows, len(x))
    bits = np.array([max(0, math.ceil(math.log2(e / cfg.semantic_max_group))) if e > cfg.semantic_max_group else 0
                     for e in expected], dtype=np.int64)
    bits = np.minimum(bits, 16)
    rng = np.random.default_rng(seed)
    planes = rng.standard_normal((len(centroids), max(int(bits.max()), 1), x.shape[1])).astype(np.float32)
    return centroids, planes, bits


class _Decide(beam.DoFn):
    """Join a row with its dedup decisions (by uid): keep it, or reject it once with the strongest reason."""

    def __init__(self):
        self._dropped = {r: beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, f"dedup_{r}")
                         for r in records.REASONS["dedup"]}
        self._out = beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, "dedup_out")

    def process(self, kv):
        uid, grouped = kv
        rows = sorted(grouped["row"], key=rank_key)
        decisions = sorted(set(grouped["decision"]), key=lambda d: (PRIORITY[d[0]], d[1]))
        for i, row in enumerate(rows):
            if i > 0:  # the same uid twice in the input (same url and caption)
                self._dropped["duplicate_exact"].inc()
                yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, records.reject(
                    row, "dedup", "duplicate_exact", f"same uid as kept row {uid}"))
            elif decisions:
                reason, detail = decisions[0]
                self._dropped[reason].inc()
                detail = detail if reason == "eval_leak" else f"duplicate of {detail}"
                yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, records.reject(row, "dedup", reason, detail))
            else:
                self._out.inc()
                yield row


class _EvalLeaks(beam.DoFn):
    def __init__(self, cfg: DedupConfig):
        self._cfg = cfg

    def setup(self):
        self._ev = load_eval_set(self._cfg.decontaminate)

    def process(self, row):
        match = eval_match(row, self._ev, self._cfg)
        if match:
            yield row["uid"], ("eval_leak", match)


class Dedup(beam.PTransform):
    """rows -> (kept, rejected) under the shared decision rule (see the module docstring)."""

    def __init__(self, config: DedupConfig, estimated_rows: int = 100_000, seed: int = 0):
        super().__init__()
        self._cfg = config
        self._n = estimated_rows
        self._seed = seed

    def expand(self, rows):
        cfg = self._cfg
        counted = rows | "CountIn" >> beam.Map(_count_in)
        compact = counted | "Compact" >> beam.Map(_compact)
        decisions = []
        if "exact" in cfg.dedup:
            decisions.append(
                compact
                | "ExactKeys" >> beam.FlatMap(lambda m, c: ((k, _slim(m, "exact")) for k in _exact_keys(m, c)), cfg)
                | "ExactGroup" >> beam.GroupByKey()
                | "ExactDecide" >> beam.FlatMap(lambda kv, c: bucket_decisions(list(kv[1]), "exact", c), cfg))
        if "near" in cfg.dedup:
            decisions.append(
                compact
                | "NearKeys" >> beam.FlatMap(
                    lambda m, c: ((k, _slim(m, "near")) for k in band_keys(m["phash"], c.near_dup_hamming))
                    if m["phash"] is not None else (), cfg)
                | "NearGroup" >> beam.GroupByKey()
                | "NearDecide" >> beam.FlatMap(lambda kv, c: bucket_decisions(list(kv[1]), "near", c), cfg))
        if "semantic" in cfg.dedup:
            model = (compact
                     | "SemEmb" >> beam.FlatMap(lambda m: [m["emb"]] if m["emb"] is not None else [])
                     | "SemSample" >> beam.combiners.Sample.FixedSizeGlobally(cfg.semantic_sample)
                     | "SemFit" >> beam.Map(_semantic_model, cfg, self._n, self._seed))
            decisions.append(
                compact
                | "SemKeys" >> beam.ParDo(_SemanticKeys(cfg, self._n), beam.pvalue.AsSingleton(model))
                | "SemGroup" >> beam.GroupByKey()
                | "SemDecide" >> beam.FlatMap(lambda kv, c: bucket_decisions(list(kv[1]), "semantic", c), cfg))
        if cfg.decontaminate:
            decisions.append(rows | "EvalLeaks" >> beam.ParDo(_EvalLeaks(cfg)))
        keyed_rows = counted | "KeyRows" >> beam.Map(lambda r: (r["uid"], r))
        all_decisions = (tuple(decisions) | "AllDecisions" >> beam.Flatten()) if decisions else (
            rows.pipeline | "NoDecisions" >> beam.Create([]))
        out = ({"row": keyed_rows, "decision": all_decisions}
               | "JoinDecisions" >> beam.CoGroupByKey()
               | "Decide" >> beam.ParDo(_Decide()).with_outputs(records.REJECTED_TAG, main="rows"))
        return out.rows, out[records.REJECTED_TAG]


def _count_in(row):
    beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, "dedup_in").inc()
    return row
