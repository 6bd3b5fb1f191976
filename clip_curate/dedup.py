"""Deduplication as keyed Beam stages: exact, near-duplicate (pHash + LSH bands), semantic (SemDeDup)
and eval-set decontamination.

Decision rule (shared by every kind): rows meet only under a shared key — a URL or image hash
(exact), a pHash band (near), a k-means cluster sub-bucket (semantic). Within a key, row x is dropped
when some **better-ranked** row y sharing the key is within the kind's threshold, whether or not y is
itself dropped by something else. Rank: higher ``clip_score`` first (rows without a score rank last),
then more pixels, then the smaller ``uid``. Each kind decides on all rows independently; a row dropped
for several reasons reports the first of ``eval_leak``, ``duplicate_exact``, ``duplicate_near``,
``duplicate_semantic``. There is no global connected-components pass, so decisions do not depend on
worker count, bundle split or input order. ``detail`` is ``"duplicate of <uid>"``, naming the
best-ranked dropper that was kept (``"duplicate of dropped row <uid>"`` when every dropper was itself
dropped: a chain a > b > c), or the eval item matched.

Rows of earlier runs into the same output (``--resume``, ``--chunk-rows`` passes: ``prior_shards``) join
the keys with a rank better than every row of this run; they drop rows of this run but are never
dropped themselves (their decisions are discarded), so earlier output stays as written.

Data flow (only small records are shuffled until the last step):
compact (uid, rank, hashes, embedding) ─► per kind: key ─► GroupByKey ─► per-bucket decisions
─► GroupByKey by uid ─► "is the dropper kept?" join ─► CoGroupByKey with the full rows by uid ─► kept /
rejected, each input row exactly once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np

from clip_curate import records
from clip_curate.dedup_core import (KINDS, PRIORITY, REASON, EvalSet, SemanticModel, auto_clusters,  # noqa: F401
                                    band_keys, band_masks, bucket_decisions, fit_semantic_model, image_phash,
                                    load_eval_set, near_best_dropper, normalize_caption, normalize_url,
                                    phash_int, popcount64, rank_key, semantic_best_dropper, semantic_keys,
                                    semantic_margins, uid_hash)
from clip_curate.options import ConfigError, opt

NS = records.METRICS_NAMESPACE


@dataclass(frozen=True)
class DedupConfig:
    """Which duplicates are dropped, and how close counts as a duplicate."""

    dedup: tuple[str, ...] = opt(("exact", "near"), "dedup kinds: exact (normalised URL, image sha256), near "
                                                    "(pHash + LSH bands), semantic (CLIP image embeddings, "
                                                    "SemDeDup; needs the embed stage), or none")
    dedup_caption_pairs: bool = opt(False, "exact dedup by (image, caption) and (URL, caption) pairs instead "
                                           "of image and URL alone")
    near_dup_hamming: int = opt(6, "pHash Hamming distance (of 64 bits) at or below which images are near "
                                   "duplicates (6 catches re-encodes, resizes, colour shifts; ~12 also most "
                                   "crops of <= 10 %, at more false matches)")
    semantic_threshold: float = opt(0.95, "cosine similarity of image embeddings at or above which rows are "
                                          "semantic duplicates")
    semantic_clusters: int = opt(0, "k-means clusters for semantic dedup (0 = about one per 1000 rows)")
    semantic_sample: int = opt(50_000, "embeddings sampled (deterministically, by uid hash) to fit the "
                                       "k-means centroids")
    semantic_max_group: int = opt(5_000, "memory bound: rows compared together at most; larger clusters "
                                         "are split along principal directions into overlapping sub-buckets")
    decontaminate: str | None = opt(None, "eval set whose copies are removed: a directory of images, or a "
                                          "Parquet file with an image (bytes) and/or image_embedding column")
    decontaminate_hamming: int = opt(8, "pHash distance at or below which a row matches an eval image")
    decontaminate_threshold: float = opt(0.95, "embedding cosine at or above which a row matches an eval "
                                               "item (Parquet eval sets with image_embedding)")

    def __post_init__(self):
        kinds = tuple(dict.fromkeys(k.strip().lower() for k in self.dedup if k.strip()))
        if kinds == ("none",):
            kinds = ()
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ConfigError(f"--dedup: unknown kind(s) {', '.join(bad)}; choose from exact,near,semantic "
                              "(comma-separated) or none")
        object.__setattr__(self, "dedup", kinds)
        for flag, v in (("--near-dup-hamming", self.near_dup_hamming),
                        ("--decontaminate-hamming", self.decontaminate_hamming)):
            if not isinstance(v, int) or not 0 <= v <= 31:
                raise ConfigError(f"{flag} must be an integer in 0..31, got {v!r}")
        for flag, v in (("--semantic-threshold", self.semantic_threshold),
                        ("--decontaminate-threshold", self.decontaminate_threshold)):
            if not 0 < v <= 1:
                raise ConfigError(f"{flag} must be in (0, 1], got {v}")
        if self.semantic_sample < 10:
            raise ConfigError(f"--semantic-sample must be >= 10, got {self.semantic_sample}")
        if self.semantic_max_group < 10:
            raise ConfigError(f"--semantic-max-group must be >= 10, got {self.semantic_max_group}")
        if self.semantic_clusters < 0:
            raise ConfigError(f"--semantic-clusters must be >= 0 (0 = automatic), got {self.semantic_clusters}")
        if self.semantic_clusters and self.semantic_sample < 10 * self.semantic_clusters:
            raise ConfigError(f"--semantic-sample {self.semantic_sample} is too small for --semantic-clusters "
                              f"{self.semantic_clusters}; use at least 10 sampled rows per cluster")

    def validate_environment(self) -> None:
        """Check ``--decontaminate`` is readable (raises ConfigError)."""
        if self.decontaminate:
            load_eval_set(self.decontaminate)

    @property
    def active(self) -> bool:
        return bool(self.dedup or self.decontaminate)


# ---------------------------------------------------------------------------------------------
# Beam wrappers (thin: the decisions are in dedup_core)

def _compact(row: dict) -> dict:
    emb = row.get("image_embedding")
    return {"uid": str(row["uid"]), "rank": rank_key(row), "url": normalize_url(row.get("url")),
            "sha": row.get("sha256"), "caption": normalize_caption(row.get("caption")),
            "phash": phash_int(row.get("phash")),
            "emb": None if emb is None else np.asarray(emb, dtype=np.float32)}


def _exact_keyed(m: dict, pairs: bool) -> Iterator[tuple]:
    member = (m["uid"], m["rank"], None)
    if m["url"]:
        yield (("url", m["url"], m["caption"]) if pairs else ("url", m["url"])), member
    if m["sha"]:
        yield (("sha", m["sha"], m["caption"]) if pairs else ("sha", m["sha"])), member


class _NearKeys(beam.DoFn):
    def __init__(self, hamming: int):
        self._h = hamming
        self._missing = beam.metrics.Metrics.counter(NS, "dedup_near_no_phash")

    def setup(self):
        self._masks = band_masks(self._h)

    def process(self, m):
        if m["phash"] is None:
            self._missing.inc()
            return
        member = (m["uid"], m["rank"], m["phash"])
        for b, mask in enumerate(self._masks):
            yield (b, m["phash"] & mask), member


def _decide_bucket(kv, kind: str, threshold: float, max_group: int = 0):
    key, members = kv
    members = list(members)
    if max_group and len(members) > max_group:
        beam.metrics.Metrics.counter(NS, f"dedup_{kind}_groups_over_max").inc()
    beam.metrics.Metrics.distribution(NS, f"dedup_{kind}_group_size").update(len(members))
    prior = {m[0] for m in members if _is_prior(m[1])}
    for uid, decision in bucket_decisions(members, kind, threshold):
        if uid not in prior:  # rows of earlier runs are final: they only drop, never get dropped
            yield uid, decision


# ---------------------------------------------------------------------------------------------
# Rows of earlier runs (--resume, --chunk-rows): they take part in the keys as already-decided rows

PRIOR_SCORE = -math.inf  # rank of an earlier run's row: better than any row of this run
PRIOR_COLUMNS = ("uid", "url", "caption", "stage", "sha256", "phash", "image_embedding", "embed_model",
                 "clip_score", "width", "height", "original_width", "original_height")


def _is_prior(rank) -> bool:
    return rank[0] == PRIOR_SCORE


def prior_records(item: tuple[str, str], stages: Sequence[str], embed_model: str | None = None) -> Iterator[dict]:
    """Compact records of one earlier output shard ``(sub, path)``: every curated row, and the rejected
    rows whose ``stage`` is in ``stages`` (the rows that reached the dedup stage). They rank before
    every row of this run; ``dropped`` marks the ones an earlier dedup rejected. With ``embed_model``,
    embeddings another model made are left out of semantic dedup (they are not comparable)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    sub, path = item
    with FileSystems.open(path) as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in PRIOR_COLUMNS if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=2048, columns=cols):
            for row in batch.to_pylist():
                stage = row.get("stage")
                if sub == "rejected" and stage not in stages:
                    continue
                m = _compact(row)
                if embed_model and row.get("embed_model") not in (None, embed_model):
                    m["emb"] = None
                m["rank"] = (PRIOR_SCORE, *m["rank"][1:])
                m["dropped"] = sub == "rejected" and stage == "dedup"
                yield m


def _embedding_item(m: dict):
    if m["emb"] is not None:
        yield uid_hash(m["uid"]), m["uid"], m["emb"]
    else:
        beam.metrics.Metrics.counter(NS, "dedup_semantic_no_embedding").inc()


def _fit(sample: list, n_rows: int, cfg: DedupConfig, seed: int) -> SemanticModel:
    sample = sorted(sample, key=lambda t: (t[0], t[1]))  # deterministic order for k-means
    return fit_semantic_model([t[2] for t in sample], n_rows, cfg.semantic_threshold, cfg.semantic_clusters,
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


class _EvalLeaks(beam.DoFn):
    """Batches of compact rows -> (uid, ("eval_leak", detail, None)) for rows matching an eval item."""

    def __init__(self, cfg: DedupConfig):
        self._cfg = cfg
        self._unchecked = beam.metrics.Metrics.counter(NS, "dedup_eval_unchecked")

    def process(self, batch, ev: EvalSet):
        cfg = self._cfg
        found: dict[str, str] = {}
        with_emb = []
        for m in batch:
            checked = False
            if m["phash"] is not None and len(ev.phashes):
                checked = True
                hit = ev.match_phash(m["phash"], cfg.decontaminate_hamming)
                if hit:
                    found[m["uid"]] = f"eval item {hit[0]} (phash distance {hit[1]})"
                    continue
            if m["emb"] is not None and ev.embeddings is not None:
                checked = True
                with_emb.append(m)
            if not checked:
                self._unchecked.inc()
        if with_emb:
            hits = ev.match_embeddings(np.stack([m["emb"] for m in with_emb]), cfg.decontaminate_threshold)
            for m, hit in zip(with_emb, hits):
                if hit:
                    found[m["uid"]] = f"eval item {hit[0]} (cosine {hit[1]:.4f})"
        for uid, detail in found.items():
            yield uid, ("eval_leak", detail, None)


def _asks(kv):
    """(x, decisions) -> (y, x) for each duplicate dropper y of x: "is y kept?"."""
    x, decisions = kv
    for reason, y, _ in set((d[0], d[1], d[2]) for d in decisions):
        if reason != "eval_leak":
            yield y, x


def _kept_droppers(kv):
    y, grouped = kv
    if not list(grouped["dropped"]):
        for x in sorted(set(grouped["asked_by"])):
            yield x, y


def _row_order(row: dict) -> tuple:
    return rank_key(row), str(row.get("sha256") or ""), str(row.get("url") or "")


class _Decide(beam.DoFn):
    """Join a row with its decisions (by uid): keep it, or reject it once with the first-priority reason."""

    def __init__(self):
        self._dropped = {r: beam.metrics.Metrics.counter(NS, f"dedup_{r}") for r in records.REASONS["dedup"]}
        self._out = beam.metrics.Metrics.counter(NS, "dedup_out")

    def process(self, kv):
        uid, grouped = kv
        rows = sorted(grouped["row"], key=_row_order)
        decisions = [d for ds in grouped["decisions"] for d in ds]
        kept_droppers = set(grouped["kept"])
        for i, row in enumerate(rows):
            if i > 0:  # the same uid twice in the input: the same url and caption
                self._dropped["duplicate_exact"].inc()
                yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, records.reject(
                    row, "dedup", "duplicate_exact", f"same url and caption as kept row {uid}"))
            elif decisions:
                reason, detail = explain(decisions, kept_droppers)
                self._dropped[reason].inc()
                yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, records.reject(row, "dedup", reason, detail))
            else:
                self._out.inc()
                yield row


def explain(decisions: Iterable[tuple], kept_droppers: set[str]) -> tuple[str, str]:
    """(reason, detail) for a dropped row from its ``(reason, dropper_or_detail, dropper_rank)`` decisions."""
    decisions = list(decisions)
    reason = min((d[0] for d in decisions), key=PRIORITY.index)
    if reason == "eval_leak":
        return reason, min(d[1] for d in decisions if d[0] == reason)
    cands = sorted({(d[2], d[1]) for d in decisions if d[0] == reason})
    kept = [c for c in cands if c[1] in kept_droppers]
    return reason, f"duplicate of {kept[0][1]}" if kept else f"duplicate of dropped row {cands[0][1]}"


def _count_in(row):
    beam.metrics.Metrics.counter(NS, "dedup_in").inc()
    return row["uid"], row


class Dedup(beam.PTransform):
    """rows -> (kept, rejected) under the shared decision rule (see the module docstring).

    ``estimated_rows`` is not needed for correctness (the semantic stage counts its rows); ``seed`` seeds
    k-means and the split directions. The eval set is loaded here, so a bad ``--decontaminate`` fails at
    construction with ConfigError.
    """

    def __init__(self, config: DedupConfig, estimated_rows: int | None = None, seed: int = 0,
                 prior_shards: Sequence[tuple[str, str]] = (), prior_stages: Sequence[str] = ("dedup",),
                 embed_model: str | None = None):
        super().__init__()
        self._cfg = config
        self._seed = seed
        self._eval = load_eval_set(config.decontaminate) if config.decontaminate else None
        self._prior = tuple(prior_shards)
        self._prior_stages = tuple(prior_stages)
        self._embed_model = embed_model

    def expand(self, rows):
        cfg = self._cfg
        keyed_rows = rows | "CountIn" >> beam.Map(_count_in)
        compact = keyed_rows | "Compact" >> beam.Map(lambda kv: _compact(kv[1]))
        prior_dropped = None
        members = compact  # rows that take part in the keys: this run's, and the earlier runs' outputs
        if self._prior:
            prior = (rows.pipeline | "PriorShards" >> beam.Create(list(self._prior))
                     | "PriorRows" >> beam.FlatMap(prior_records, self._prior_stages, self._embed_model))
            members = (compact, prior) | "WithPrior" >> beam.Flatten()
            prior_dropped = (prior | "PriorDropped" >> beam.Filter(lambda m: m["dropped"])
                             | "PriorDroppedMarks" >> beam.Map(lambda m: (m["uid"], True)))
        decisions = []
        if "exact" in cfg.dedup:
            decisions.append(
                members
                | "ExactKeys" >> beam.FlatMap(_exact_keyed, cfg.dedup_caption_pairs)
                | "ExactGroup" >> beam.GroupByKey()
                | "ExactDecide" >> beam.FlatMap(_decide_bucket, "exact", 0))
        if "near" in cfg.dedup:
            decisions.append(
                members
                | "NearKeys" >> beam.ParDo(_NearKeys(cfg.near_dup_hamming))
                | "NearGroup" >> beam.GroupByKey()
                | "NearDecide" >> beam.FlatMap(_decide_bucket, "near", cfg.near_dup_hamming))
        if "semantic" in cfg.dedup:
            items = compact | "SemItems" >> beam.FlatMap(_embedding_item)
            n_rows = items | "SemCount" >> beam.combiners.Count.Globally()
            sample = items | "SemSample" >> beam.combiners.Top.Of(cfg.semantic_sample, key=lambda t: (t[0], t[1]))
            model = sample | "SemFit" >> beam.Map(_fit, beam.pvalue.AsSingleton(n_rows), cfg, self._seed)
            decisions.append(
                members
                | "SemBatch" >> beam.BatchElements(min_batch_size=64, max_batch_size=2048)
                | "SemKeys" >> beam.ParDo(_SemanticKeys(), beam.pvalue.AsSingleton(model))
                | "SemGroup" >> beam.GroupByKey()
                | "SemDecide" >> beam.FlatMap(_decide_bucket, "semantic", cfg.semantic_threshold,
                                              cfg.semantic_max_group))
        if self._eval is not None:
            ev = rows.pipeline | "EvalSet" >> beam.Create([self._eval])
            decisions.append(
                compact
                | "EvalBatch" >> beam.BatchElements(min_batch_size=64, max_batch_size=2048)
                | "EvalLeaks" >> beam.ParDo(_EvalLeaks(cfg), beam.pvalue.AsSingleton(ev)))
        if decisions:
            by_uid = (tuple(decisions) | "AllDecisions" >> beam.Flatten()
                      | "DecisionsByUid" >> beam.GroupByKey()
                      | "DecisionLists" >> beam.MapTuple(lambda x, ds: (x, sorted(set(ds), key=repr))))
            marks = by_uid | "DroppedMarks" >> beam.MapTuple(lambda x, _: (x, True))
            if prior_dropped is not None:
                marks = (marks, prior_dropped) | "AllDroppedMarks" >> beam.Flatten()
            asks = by_uid | "AskKept" >> beam.FlatMap(_asks)
            kept = ({"dropped": marks, "asked_by": asks}
                    | "JoinDroppers" >> beam.CoGroupByKey()
                    | "KeptDroppers" >> beam.FlatMap(_kept_droppers))
        else:
            by_uid = rows.pipeline | "NoDecisions" >> beam.Create([])
            kept = rows.pipeline | "NoKept" >> beam.Create([])
        out = ({"row": keyed_rows, "decisions": by_uid, "kept": kept}
               | "JoinDecisions" >> beam.CoGroupByKey()
               | "Decide" >> beam.ParDo(_Decide()).with_outputs(records.REJECTED_TAG, main="rows"))
        return out.rows, out[records.REJECTED_TAG]


__all__ = ["Dedup", "DedupConfig", "EvalSet", "SemanticModel", "band_keys", "bucket_decisions", "explain",
           "fit_semantic_model", "load_eval_set", "near_best_dropper", "normalize_url", "popcount64",
           "rank_key", "semantic_best_dropper", "semantic_keys"]
