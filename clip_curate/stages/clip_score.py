"""Stage ``clip``: CLIP score filters, applied after the embedding stage.

``--min-clip-score`` (absolute, LAION style) rejects ``low_clip_score``; ``--clip-top-fraction F``
(DataComp style) keeps rows whose score is at or above the global (1 - F) quantile of all scored rows
reaching the stage, computed with Beam's ``ApproximateQuantiles`` as a side input; others are
``below_top_fraction``. Ties at the cutoff are kept (the rule depends only on the score, so equal scores
always share a fate). Rows without a score pass, counted ``clip_unscored``.

The filter runs only when asked; :func:`card_judgment` says whether the model's card is calibrated for
it (and with which threshold), and warns when it is not.
"""
from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from clip_curate.fields import ConfigError, opt
from clip_curate.models.cards import Judgment, ModelCard
from clip_curate.stages.base import RowFilter, RowStage, Stage, Verdict, register

QUANTILE_RESOLUTION = 1000  # cutoff grid and approximation error: 1e-3 in rank


@dataclass(frozen=True)
class ClipFilterConfig:
    """CLIP score filters, applied after the embedding stage."""

    min_clip_score: float | None = opt(None, "reject pairs whose CLIP score (cosine) is below this (LAION: 0.28 "
                                             "with ViT-B-32); unset = off")
    clip_top_fraction: float | None = opt(None, "keep only this fraction of pairs with the highest CLIP scores "
                                                "over the whole dataset (DataComp style, 0 < F <= 1); unset = off")
    target_set: str | None = opt(None, "image-based filter (DataComp): a directory of target images, or a Parquet "
                                       "file/folder with an image_embedding column; keeps rows whose image embedding's "
                                       "nearest pool cluster is nearest to some target item (others clip/off_target)")
    target_clusters: int = opt(0, "k-means clusters over the pool's image embeddings for --target-set "
                                  "(0 = about one per 200 rows, 2..100000)")

    def __post_init__(self):
        if self.min_clip_score is not None and not -1.0 <= self.min_clip_score <= 1.0:
            raise ConfigError(f"--min-clip-score: a cosine in [-1, 1], got {self.min_clip_score}")
        if self.clip_top_fraction is not None and not 0.0 < self.clip_top_fraction <= 1.0:
            raise ConfigError(f"--clip-top-fraction: must be in (0, 1], got {self.clip_top_fraction}")
        if not isinstance(self.target_clusters, int) or not (self.target_clusters == 0
                                                             or 2 <= self.target_clusters <= 100_000):
            raise ConfigError(f"--target-clusters: 0 (automatic) or 2..100000, got {self.target_clusters!r}")

    @property
    def active(self) -> bool:
        return (self.min_clip_score is not None or bool(self.target_set)
                or (self.clip_top_fraction is not None and self.clip_top_fraction < 1.0))


def _asked(cfg: ClipFilterConfig) -> str:
    parts = []
    if cfg.min_clip_score is not None:
        parts.append(f"--min-clip-score {cfg.min_clip_score:g}")
    if cfg.clip_top_fraction is not None and cfg.clip_top_fraction < 1.0:
        parts.append(f"--clip-top-fraction {cfg.clip_top_fraction:g}")
    return ", ".join(parts)


def card_judgment(cfg: ClipFilterConfig, card: ModelCard | None) -> tuple[ClipFilterConfig, Judgment]:
    """The line for the CLIP-score filter under the model's ``card`` (None: no CLIP model in the run).
    The filter runs only when asked; asked with a model whose card does not cover it, it runs with a
    warning. The config is returned unchanged."""
    if card is None:
        if not cfg.active:
            return cfg, Judgment("clip-score filter: off (no CLIP model)")
        return cfg, Judgment(f"clip-score filter: on ({_asked(cfg)}); no CLIP model in this run, so only rows "
                             "that carry a stored clip_score are judged")
    t, f = card.threshold("clip_score"), card.top_fraction("clip_score")
    advice = "; ".join(x for x in (t is not None and f"--min-clip-score {t:g}",
                                   f is not None and f"--clip-top-fraction {f:g}") if x)
    if not cfg.active:
        if card.covers("clip_score"):
            why = f"not asked; {card.model}'s card: {advice}" if advice else f"not asked; {card.model}'s card covers it"
        else:
            why = f"not asked; {card.not_calibrated()}"
        return cfg, Judgment(f"clip-score filter: off ({why})")
    if card.covers("clip_score"):
        ref = f"{card.model}'s card: {advice}" if advice else f"{card.model}'s card covers it"
        return cfg, Judgment(f"clip-score filter: on ({_asked(cfg)}; {ref})")
    line = f"clip-score filter: on as asked ({_asked(cfg)}), but {card.not_calibrated()}"
    return cfg, Judgment(line, line + ": the threshold may not mean what it assumes")


def clip_verdict(score: float | None, cfg: ClipFilterConfig, cutoff: float | None = None) -> tuple[str | None, str]:
    """``(reason or None, detail)`` for one score; ``cutoff`` is the top-fraction score cutoff."""
    if score is None:
        return None, ""
    if cfg.min_clip_score is not None and score < cfg.min_clip_score:
        return "low_clip_score", f"clip_score={score:.4f} < {cfg.min_clip_score:g}"
    if cutoff is not None and score < cutoff:
        return "below_top_fraction", (f"clip_score={score:.4f} < top-{cfg.clip_top_fraction:g} cutoff "
                                      f"{cutoff:.4f}")
    return None, ""


def cutoff_from_quantiles(quantiles: list[float] | None, fraction: float) -> float | None:
    """The (1 - fraction) quantile from ``ApproximateQuantiles`` output (``n+1`` evenly spaced
    values, min..max); None when there were no scores."""
    if not quantiles:
        return None
    n = len(quantiles) - 1
    if n == 0:
        return quantiles[0]
    idx = min(max(int(round((1.0 - fraction) * n)), 0), n)
    return float(quantiles[idx])


# ---------------------------------------------------------------------------------------------
# Image-based filter (DataComp's "image-based"): keep rows in pool clusters nearest to a target set

@dataclass(frozen=True)
class TargetModel:
    """Pool centroids (k, d), L2-normalised, and the clusters some target item is nearest to."""

    centroids: np.ndarray
    allowed: frozenset

    def nearest(self, emb) -> int:
        return int(np.argmax(self.centroids @ np.asarray(emb, dtype=np.float32)))


def auto_target_clusters(n_rows: int) -> int:
    return int(min(100_000, max(2, round(n_rows / 200))))


def fit_target_model(sample: np.ndarray, targets: np.ndarray, k: int, seed: int = 0) -> TargetModel:
    """Spherical k-means (faiss) on the pool's embeddings; the allowed clusters are each target item's nearest."""
    import faiss

    x = np.ascontiguousarray(_l2(sample))
    t = _l2(targets)
    if t.shape[1] != x.shape[1]:
        raise ValueError(f"--target-set embeddings have {t.shape[1]} dimensions but the pool's have {x.shape[1]}: "
                         "make them with the run's model")
    k = max(1, min(k, len(x)))
    if k == 1:
        centroids = _l2(x.mean(axis=0, keepdims=True))
    else:
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1)
        km.train(x)
        centroids = _l2(km.centroids)
    allowed = frozenset(int(i) for i in np.argmax(t @ centroids.T, axis=1))
    return TargetModel(centroids.astype(np.float32), allowed)


def target_verdict(emb, target: TargetModel) -> tuple[str | None, str]:
    c = target.nearest(emb)
    if c in target.allowed:
        return None, ""
    return "off_target", f"nearest pool cluster {c} is not one of the {len(target.allowed)} nearest to the target set"


def _l2(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def load_target_embeddings(_, path: str, model_config=None) -> np.ndarray:
    """The target set's embeddings: a Parquet file/folder's ``image_embedding`` column, or a directory of
    images embedded with the run's CLIP model."""
    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(path)
    files = [root] if fs.isfile(root) else sorted(fs.find(root))
    parquets = [f for f in files if f.endswith((".parquet", ".pq"))]
    if parquets:
        rows = []
        for f in parquets:
            with fs.open(f, "rb") as fh:
                rows.extend(v for v in pq.read_table(fh, columns=["image_embedding"]).column(0).to_pylist() if v)
        return np.asarray(rows, dtype=np.float32)
    from PIL import Image

    from clip_curate.models.clip import encode_images, has_clip_model, load_clip

    if not has_clip_model(model_config):
        raise ValueError("--target-set with images needs a CLIP model to embed them (or pass an embeddings Parquet)")
    images = []
    for f in files:
        try:
            with fs.open(f, "rb") as fh:
                images.append(Image.open(fh).convert("RGB"))
        except Exception:  # noqa: BLE001 - not an image (a README beside them): skipped
            continue
    return encode_images(load_clip(model_config), images)


def _embedding_item(row):
    from clip_curate.records import uid_hash

    if row.get("image_embedding") is not None:
        yield uid_hash(str(row["uid"])), np.asarray(row["image_embedding"], dtype=np.float32)


class TargetClusters(beam.PTransform):
    """rows -> one :class:`TargetModel`: k-means over (a deterministic sample of) the pool's image embeddings,
    and the clusters nearest to the target set (a side input of the CLIP stage)."""

    SAMPLE = 100_000

    def __init__(self, config: ClipFilterConfig, model_config=None):
        super().__init__()
        self._cfg = config
        self._model_config = model_config

    def expand(self, rows):
        cfg = self._cfg
        items = rows | "PoolEmbeddings" >> beam.FlatMap(_embedding_item)
        n = items | "CountPool" >> beam.combiners.Count.Globally()
        sample = items | "SamplePool" >> beam.combiners.Top.Of(self.SAMPLE, key=lambda t: t[0])
        targets = (rows.pipeline | "OnceTargets" >> beam.Create([None])
                   | "TargetEmbeddings" >> beam.Map(load_target_embeddings, cfg.target_set, self._model_config))
        return sample | "FitTarget" >> beam.Map(_fit, beam.pvalue.AsSingleton(n), beam.pvalue.AsSingleton(targets),
                                                cfg.target_clusters)


def _fit(sample, n_rows: int, targets: np.ndarray, k: int) -> TargetModel | None:
    """None when no row has an embedding (nothing to cluster: the filter keeps every row)."""
    if not sample:
        return None
    if len(targets) == 0:
        raise ValueError("--target-set holds no embeddings or images")
    pool = np.stack([e for _, e in sorted(sample, key=lambda x: x[0])])
    return fit_target_model(pool, targets, k or auto_target_clusters(n_rows))


class _ClipRules(RowFilter):
    stage = "clip"

    def load(self):
        self._unscored = self.counter("unscored")

    def judge(self, row, cutoff=None, target=None):
        score = row.get("clip_score")
        if score is None:
            self._unscored.inc()
        reason, detail = clip_verdict(None if score is None else float(score), self.config, cutoff)
        if reason is None and target is not None and row.get("image_embedding") is not None:
            reason, detail = target_verdict(row["image_embedding"], target)
        return Verdict(row, reason, detail)


class ClipScoreFilter(beam.PTransform):
    """rows with ``clip_score`` -> (kept, rejected) under ``--min-clip-score`` and
    ``--clip-top-fraction`` (rows without a score pass, counted ``clip_unscored``)."""

    def __init__(self, config: ClipFilterConfig, model_config=None):
        super().__init__()
        self._cfg = config
        self._model_config = model_config  # embeds a directory of --target-set images

    def expand(self, rows):
        cfg = self._cfg
        fraction = cfg.clip_top_fraction
        side = []
        if fraction is not None and fraction < 1.0:
            cutoff = (rows
                      | "Scores" >> beam.FlatMap(lambda r: [float(r["clip_score"])]
                                                 if r.get("clip_score") is not None else [])
                      | "Quantiles" >> beam.transforms.stats.ApproximateQuantiles.Globally(
                          QUANTILE_RESOLUTION + 1)  # rank error <= 1/QUANTILE_RESOLUTION
                      | "Cutoff" >> beam.Map(cutoff_from_quantiles, fraction))
            side.append(beam.pvalue.AsSingleton(cutoff, default_value=None))
        if cfg.target_set:
            if not side:
                side.append(beam.pvalue.AsSingleton(rows.pipeline | "NoCutoff" >> beam.Create([None])))
            side.append(beam.pvalue.AsSingleton(rows | "TargetSet" >> TargetClusters(cfg, self._model_config)))
        return rows | RowStage(_ClipRules(cfg), *side, label="ClipRules")


def _check_passes(cfg: ClipFilterConfig, run_config) -> None:
    if cfg.target_set:
        raise ConfigError("--target-set clusters every row's embedding in one job, so it cannot run in --chunk-rows "
                          "passes: re-filter the output afterwards (--input OUT --input-format curated "
                          "--stages clip --target-set ...)")
    if cfg.clip_top_fraction is not None:
        raise ConfigError("--clip-top-fraction ranks every row of the input in one job, so it cannot run in "
                          "--chunk-rows passes: use --min-clip-score, or drop --chunk-rows (a distributed runner "
                          "keeps memory flat without it)")


register(Stage("clip", ClipFilterConfig,
               build=lambda cfg, ctx: ClipScoreFilter(cfg, getattr(ctx.configs, "embed", None)) if cfg.active else None,
               position=50, check_passes=_check_passes, title="CLIP score filters"))
