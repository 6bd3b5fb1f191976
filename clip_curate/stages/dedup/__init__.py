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

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np

from clip_curate import records
from clip_curate.stages.dedup import eval_leak, exact, near, semantic  # noqa: F401 - registers the kinds
from clip_curate.stages.dedup.core import (KindInputs, bucket_decisions, kind_names, kinds, normalize_caption,
                                          normalize_url, phash_int, priority, rank_key)
from clip_curate.stages.dedup.eval_leak import EvalSet, load_eval_set
from clip_curate.stages.dedup.near import band_keys, near_best_dropper, popcount64
from clip_curate.stages.dedup.rule import PRIOR_SCORE
from clip_curate.stages.dedup.semantic import SemanticModel, fit_semantic_model, semantic_best_dropper, semantic_keys
from clip_curate.fields import ConfigError, opt
from clip_curate.models.cards import Judgment, ModelCard
from clip_curate.stages.base import IMAGE, Stage, StageContext, names_from, register
from clip_curate.stages.image import ORB_KEYPOINTS, stored_hashes

NS = records.METRICS_NAMESPACE
DEFAULT_SEMANTIC_THRESHOLD = 0.95


@dataclass(frozen=True)
class DedupConfig:
    """Which duplicates are dropped, and how close counts as a duplicate."""

    dedup: tuple[str, ...] = opt(("exact", "near"), "dedup kinds: exact (normalised URL, image sha256), near "
                                                    "(pHash + LSH bands), semantic (CLIP image embeddings, "
                                                    "SemDeDup; needs the embed stage), or none")
    dedup_caption_pairs: bool = opt(False, "exact dedup by (image, caption) and (URL, caption) pairs instead "
                                           "of image and URL alone")
    near_dup_hamming: int = opt(6, "pHash Hamming distance (of 64 bits) at or below which images are near "
                                   "duplicates (6 catches re-encodes, resizes, colour shifts; crops are "
                                   "caught by the ORB keypoints, --orb-keypoints)")
    semantic_threshold: float | None = opt(None, "cosine similarity of image embeddings at or above which rows "
                                                 "are semantic duplicates; unset = the model card's threshold, "
                                                 "else 0.95")
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
        bad = [k for k in kinds if k not in kind_names()]
        if bad:
            raise ConfigError(f"--dedup: unknown kind(s) {', '.join(bad)}; choose from exact,near,semantic "
                              "(comma-separated) or none")
        object.__setattr__(self, "dedup", kinds)
        for flag, v in (("--near-dup-hamming", self.near_dup_hamming),
                        ("--decontaminate-hamming", self.decontaminate_hamming)):
            if not isinstance(v, int) or not 0 <= v <= 31:
                raise ConfigError(f"{flag} must be an integer in 0..31, got {v!r}")
        for flag, v in (("--semantic-threshold", self.semantic_cosine),
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

    @property
    def image_hashes(self) -> frozenset[str]:
        """The stored image's hashes this config reads (the image stage computes only what some enabled
        stage reads): near dedup reads ``phash`` and ``orb_keypoints``, decontamination ``phash``; exact
        dedup reads ``sha256``, which is always computed."""
        out: set[str] = set()
        if "near" in self.dedup:
            out |= {"phash", "orb_keypoints"}
        if self.decontaminate:
            out.add("phash")
        return frozenset(out)

    @property
    def semantic_cosine(self) -> float:
        """``--semantic-threshold`` in effect (0.95 when neither the flag nor a model card set it)."""
        return DEFAULT_SEMANTIC_THRESHOLD if self.semantic_threshold is None else self.semantic_threshold

    def card_judgment(self, card: ModelCard | None) -> tuple["DedupConfig", Judgment | None]:
        """Semantic dedup under the model's ``card`` (None: no CLIP model): it runs only when asked
        (``--dedup semantic``), with the card's threshold unless ``--semantic-threshold`` is given, and
        with a warning when the card does not cover it. No line when semantic dedup is not asked for."""
        threshold = self.semantic_threshold
        if threshold is None:
            threshold = (card.threshold("semantic_dedup") if card is not None else None) or DEFAULT_SEMANTIC_THRESHOLD
        cfg = dataclasses.replace(self, semantic_threshold=threshold)
        if "semantic" not in self.dedup:
            return cfg, None
        if card is None:
            return cfg, Judgment(f"semantic dedup: on (cosine >= {threshold:g}); no CLIP model in this run, so "
                                 "only rows with stored embeddings take part")
        if card.covers("semantic_dedup"):
            return cfg, Judgment(f"semantic dedup: on (cosine >= {threshold:g}; {card.model}'s card)")
        line = f"semantic dedup: on as asked (--dedup semantic, cosine >= {threshold:g}), but {card.not_calibrated()}"
        return cfg, Judgment(line, line + ": which images count as duplicates may be wrong")


# ---------------------------------------------------------------------------------------------
# Beam wrappers (thin: the decisions are in dedup_core)

def fill_hashes(row: dict, hashes: frozenset, orb_n: int = ORB_KEYPOINTS) -> dict:
    """``row`` with the image hashes dedup reads (``hashes``: ``phash``, ``orb_keypoints``) computed from its
    stored ``image`` when the row has none: rows of an output written by a run that did not compute them
    (no dedup then, so ``phash`` is null), re-filtered or taking part as an earlier output's rows. A row
    with a ``phash`` is left as it is (its ``orb_keypoints`` may be null on purpose: no distinctive
    keypoints, or ``--orb-keypoints 0``). Returns a new dict when it computes anything."""
    if not hashes or row.get("phash") is not None or not row.get("image"):
        return row
    image = row["image"]
    if isinstance(image, dict):  # the {bytes, path} struct as stored
        image = image.get("bytes")
    if not image:
        return row
    try:
        found = stored_hashes(bytes(image), hashes, orb_n)
    except Exception:  # noqa: BLE001 - an undecodable stored image: it keeps its exact keys only
        return row
    beam.metrics.Metrics.counter(NS, "dedup_hashes_computed").inc()
    return {**row, **found}


def _compact(row: dict) -> dict:
    emb = row.get("image_embedding")
    return {"uid": str(row["uid"]), "rank": rank_key(row), "url": normalize_url(row.get("url")),
            "sha": row.get("sha256"), "caption": normalize_caption(row.get("caption")),
            "phash": phash_int(row.get("phash")), "orb": row.get("orb_keypoints"),
            "emb": None if emb is None else np.asarray(emb, dtype=np.float32)}


# ---------------------------------------------------------------------------------------------
# Rows of earlier runs (--resume, --chunk-rows): they take part in the keys as already-decided rows

PRIOR_COLUMNS = ("uid", "url", "caption", "stage", "sha256", "phash", "orb_keypoints", "image_embedding",
                 "embed_model", "clip_score", "width", "height", "original_width", "original_height")


def prior_records(item: tuple[str, str], stages: Sequence[str], embed_model: str | None = None,
                  hashes: frozenset = frozenset(), orb_n: int = ORB_KEYPOINTS) -> Iterator[dict]:
    """Compact records of one earlier output shard ``(sub, path)``: every curated row, and the rejected
    rows whose ``stage`` is in ``stages`` (the rows that reached the dedup stage). They rank before
    every row of this run; ``dropped`` marks the ones an earlier dedup rejected. With ``embed_model``,
    embeddings another model made are left out of semantic dedup (they are not comparable). ``hashes``:
    the image hashes this run's dedup reads; a shard written without them (a run without dedup) has them
    computed from its stored images (:func:`fill_hashes`)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    sub, path = item
    with FileSystems.open(path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        cols = [c for c in PRIOR_COLUMNS if c in names]
        if hashes and "image" in names and ("phash" not in names or pf.read(columns=["phash"]).column(0).null_count):
            cols.append("image")  # some rows lack the hashes: read their stored images to compute them
        for batch in pf.iter_batches(batch_size=256 if "image" in cols else 2048, columns=cols):
            for row in batch.to_pylist():
                stage = row.get("stage")
                if sub == "rejected" and stage not in stages:
                    continue
                m = _compact(fill_hashes(row, hashes, orb_n))
                if embed_model and row.get("embed_model") not in (None, embed_model):
                    m["emb"] = None
                m["rank"] = (PRIOR_SCORE, *m["rank"][1:])
                m["dropped"] = sub == "rejected" and stage == "dedup"
                yield m


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
                rejected = records.reject(row, "dedup", reason, detail)
                if detail.startswith("duplicate of "):  # the dropper's uid, for joins (rejected_row.json)
                    rejected["duplicate_of"] = detail.rsplit(" ", 1)[-1]
                yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, rejected)
            else:
                self._out.inc()
                yield row


def explain(decisions: Iterable[tuple], kept_droppers: set[str]) -> tuple[str, str]:
    """(reason, detail) for a dropped row from its ``(reason, dropper_or_detail, dropper_rank)`` decisions."""
    decisions = list(decisions)
    order = priority()
    reason = min((d[0] for d in decisions), key=order.index)
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
                 embed_model: str | None = None, orb_keypoints: int = ORB_KEYPOINTS):
        super().__init__()
        self._cfg = config
        self._hashes = config.image_hashes  # computed here for rows that come without them
        self._orb_n = orb_keypoints
        self._seed = seed
        # each active kind loads what it needs now, so a bad --decontaminate fails at construction
        self._state = {kind.reason: kind.prepare(config) for kind in kinds() if kind.active(config)}
        self._prior = tuple(prior_shards)
        self._prior_stages = tuple(prior_stages)
        self._embed_model = embed_model

    def expand(self, rows):
        cfg = self._cfg
        keyed_rows = rows | "CountIn" >> beam.Map(_count_in)
        hashes, orb_n = self._hashes, self._orb_n
        compact = keyed_rows | "Compact" >> beam.Map(lambda kv: _compact(fill_hashes(kv[1], hashes, orb_n)))
        prior_dropped = None
        members = compact  # rows that take part in the keys: this run's, and the earlier runs' outputs
        if self._prior:
            prior = (rows.pipeline | "PriorShards" >> beam.Create(list(self._prior))
                     | "PriorRows" >> beam.FlatMap(prior_records, self._prior_stages, self._embed_model,
                                                   hashes, orb_n))
            members = (compact, prior) | "WithPrior" >> beam.Flatten()
            prior_dropped = (prior | "PriorDropped" >> beam.Filter(lambda m: m["dropped"])
                             | "PriorDroppedMarks" >> beam.Map(lambda m: (m["uid"], True)))
        decisions = [kind.decisions(KindInputs(members, compact, cfg, self._seed, self._state[kind.reason],
                                               kind.reason))
                     for kind in kinds() if kind.reason in self._state]
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



def _check_passes(cfg: DedupConfig, run_config) -> None:
    if "semantic" in cfg.dedup and not run_config.output.store_embeddings:
        raise ConfigError("--dedup semantic across --chunk-rows passes compares rows with the earlier passes' "
                          "stored image_embedding: drop --no-store-embeddings (or --chunk-rows)")


def _check_direct(cfg: DedupConfig, run_config, mode: str, workers: int) -> None:
    """Beam's FnApiRunner in ``multi_threading`` mode with several workers handed the dedup join 590 of the
    600 rows that went in when near dedup's keypoint half ran (a pool of overlapping photo crops; caught by
    the row accounting only after the whole run); ``in_memory`` and ``multi_processing`` gave all 600."""
    if mode != "multi_threading" or workers <= 1 or "near" not in cfg.dedup:
        return
    if getattr(run_config.stage("image"), "orb_keypoints", 0):
        raise ConfigError("--direct_running_mode multi_threading with several workers loses rows in near dedup's "
                          "keypoint half (Beam's FnApiRunner); use --direct_running_mode multi_processing, or "
                          "--orb-keypoints 0")


def _build(cfg: DedupConfig, ctx: StageContext):
    if not cfg.active:
        return None
    image_cfg = getattr(ctx.configs, "image", None)  # the ORB keypoint count of rows computed here
    return Dedup(cfg, estimated_rows=ctx.estimated_rows, prior_shards=ctx.prior_shards,
                 prior_stages=names_from("dedup"), embed_model=ctx.embed_model,
                 orb_keypoints=getattr(image_cfg, "orb_keypoints", ORB_KEYPOINTS))


register(Stage("dedup", DedupConfig, build=_build, position=60, needs=frozenset({IMAGE}),
               check=DedupConfig.validate_environment, check_passes=_check_passes, check_direct=_check_direct,
               title="dedup"))


__all__ = ["Dedup", "DedupConfig", "EvalSet", "PRIOR_SCORE", "SemanticModel", "prior_records", "band_keys", "bucket_decisions", "explain",
           "fit_semantic_model", "load_eval_set", "near_best_dropper", "normalize_url", "popcount64",
           "rank_key", "semantic_best_dropper", "semantic_keys"]
