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

    def __post_init__(self):
        if self.min_clip_score is not None and not -1.0 <= self.min_clip_score <= 1.0:
            raise ConfigError(f"--min-clip-score: a cosine in [-1, 1], got {self.min_clip_score}")
        if self.clip_top_fraction is not None and not 0.0 < self.clip_top_fraction <= 1.0:
            raise ConfigError(f"--clip-top-fraction: must be in (0, 1], got {self.clip_top_fraction}")

    @property
    def active(self) -> bool:
        return self.min_clip_score is not None or (self.clip_top_fraction is not None
                                                   and self.clip_top_fraction < 1.0)


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


class _ClipRules(RowFilter):
    stage = "clip"

    def load(self):
        self._unscored = self.counter("unscored")

    def judge(self, row, cutoff=None):
        score = row.get("clip_score")
        if score is None:
            self._unscored.inc()
        reason, detail = clip_verdict(None if score is None else float(score), self.config, cutoff)
        return Verdict(row, reason, detail)


class ClipScoreFilter(beam.PTransform):
    """rows with ``clip_score`` -> (kept, rejected) under ``--min-clip-score`` and
    ``--clip-top-fraction`` (rows without a score pass, counted ``clip_unscored``)."""

    def __init__(self, config: ClipFilterConfig):
        super().__init__()
        self._cfg = config

    def expand(self, rows):
        cfg = self._cfg
        fraction = cfg.clip_top_fraction
        if fraction is not None and fraction < 1.0:
            cutoff = (rows
                      | "Scores" >> beam.FlatMap(lambda r: [float(r["clip_score"])]
                                                 if r.get("clip_score") is not None else [])
                      | "Quantiles" >> beam.transforms.stats.ApproximateQuantiles.Globally(
                          QUANTILE_RESOLUTION + 1)  # rank error <= 1/QUANTILE_RESOLUTION
                      | "Cutoff" >> beam.Map(cutoff_from_quantiles, fraction))
            side = (beam.pvalue.AsSingleton(cutoff, default_value=None),)
        else:
            side = ()
        return rows | RowStage(_ClipRules(cfg), *side, label="ClipRules")


def _check_passes(cfg: ClipFilterConfig, run_config) -> None:
    if cfg.clip_top_fraction is not None:
        raise ConfigError("--clip-top-fraction ranks every row of the input in one job, so it cannot run in "
                          "--chunk-rows passes: use --min-clip-score, or drop --chunk-rows (a distributed runner "
                          "keeps memory flat without it)")


register(Stage("clip", ClipFilterConfig, build=lambda cfg, ctx: ClipScoreFilter(cfg) if cfg.active else None,
               position=50, check_passes=_check_passes, title="CLIP score filters"))
