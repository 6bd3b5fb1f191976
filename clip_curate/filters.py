"""Caption rules (before download) and CLIP score filters (after the embedding stage).

Caption rules, in this order, first failure wins (stage ``caption``):

=================  ===========================================================================
``missing_caption``  caption is null, empty or whitespace
``short_caption``    fewer than ``--min-caption-words`` whitespace-separated words
``long_caption``     more than ``--max-caption-chars`` characters
``language``         detected language not in ``--languages`` (undetermined counts as not in it)
=================  ===========================================================================

Every row leaving the caption stage, kept or rejected, carries ``language`` (ISO 639-1, lowercase,
or None), detected with lingua on the first 1000 characters.

CLIP score filters (stage ``clip``): ``--min-clip-score`` (absolute, LAION style) rejects
``low_clip_score``; ``--clip-top-fraction F`` (DataComp style) keeps rows whose score is at or above
the global (1 - F) quantile of all scored rows reaching the stage, computed with Beam's
``ApproximateQuantiles`` as a side input; others are ``below_top_fraction``. Ties at the cutoff are
kept (the rule depends only on the score, so equal scores always share a fate).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from clip_curate import records
from clip_curate.options import ConfigError, opt

log = logging.getLogger(__name__)

DETECT_CHARS = 1000
QUANTILE_RESOLUTION = 1000  # cutoff grid and approximation error: 1e-3 in rank


# ---------------------------------------------------------------------------------------------
# Caption rules

#: Default detector candidates: the most common languages of web alt text (load time grows per language).
WEB_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "nl", "ru", "pl", "ja", "zh", "ko")


@dataclass(frozen=True)
class CaptionConfig:
    """Caption rules, applied before download."""

    min_caption_words: int = opt(0, "reject captions with fewer words (whitespace-separated); 0 = off")
    max_caption_chars: int = opt(0, "reject captions longer than this many characters; 0 = off")
    languages: tuple[str, ...] = opt((), "keep only captions detected in these ISO 639-1 languages "
                                         "(e.g. en,de); empty = all")
    detect_language: bool = opt(True, "detect and record each caption's language (lingua)")
    language_candidates: tuple[str, ...] = opt(
        WEB_LANGUAGES, "languages the detector chooses among (ISO 639-1; --languages codes are added); 'all' = "
                       "all 75 lingua languages (~15 s load, ~0.9 GB per worker)")
    language_low_accuracy: bool = opt(False, "lingua low-accuracy mode: ~10x faster, ~80 MB, worse on short "
                                             "captions")

    def __post_init__(self):
        if self.min_caption_words < 0:
            raise ConfigError(f"--min-caption-words: must be >= 0, got {self.min_caption_words}")
        if self.max_caption_chars < 0:
            raise ConfigError(f"--max-caption-chars: must be >= 0 (0 = off), got {self.max_caption_chars}")
        object.__setattr__(self, "languages", tuple(c.strip().lower() for c in self.languages if c.strip()))
        candidates = tuple(c.strip().lower() for c in self.language_candidates if c.strip())
        if candidates == ("all",):
            candidates = ()
        elif candidates:
            candidates += tuple(c for c in self.languages if c not in candidates)
        object.__setattr__(self, "language_candidates", candidates)
        for flag, codes in (("--languages", self.languages), ("--language-candidates", self.language_candidates)):
            bad = [c for c in codes if c not in lingua_codes()]
            if bad:
                raise ConfigError(f"{flag}: unknown ISO 639-1 code(s) {', '.join(bad)}; use codes lingua knows "
                                  "such as en,de,fr,es,zh")
        if len(self.language_candidates) == 1:
            raise ConfigError("--language-candidates: list at least two languages (or leave it empty for all)")
        if self.languages and not self.detect_language:
            raise ConfigError("--languages needs language detection; drop --no-detect-language")
        if self.languages and self.language_candidates:
            missing = [c for c in self.languages if c not in self.language_candidates]
            if missing:
                raise ConfigError(f"--language-candidates: must include every --languages code (missing "
                                  f"{', '.join(missing)})")

    @property
    def active(self) -> bool:
        return bool(self.min_caption_words or self.max_caption_chars or self.languages or self.detect_language)


_LINGUA_CODES: frozenset[str] | None = None


def lingua_codes() -> frozenset[str]:
    """ISO 639-1 codes (lowercase) of the languages lingua detects."""
    global _LINGUA_CODES
    if _LINGUA_CODES is None:
        from lingua import Language

        _LINGUA_CODES = frozenset(lang.iso_code_639_1.name.lower() for lang in Language.all())
    return _LINGUA_CODES


def build_detector(cfg: CaptionConfig):
    """A lingua detector for ``cfg`` (models load lazily on first use)."""
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    if cfg.language_candidates:
        codes = [getattr(IsoCode639_1, c.upper()) for c in cfg.language_candidates]
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
    else:
        builder = LanguageDetectorBuilder.from_all_languages()
    if cfg.language_low_accuracy:
        builder = builder.with_low_accuracy_mode()
    return builder.build()


def detect_language(caption: str, detector) -> str | None:
    lang = detector.detect_language_of(caption[:DETECT_CHARS])
    return lang.iso_code_639_1.name.lower() if lang is not None else None


def caption_verdict(caption: Any, cfg: CaptionConfig, detector=None) -> tuple[str | None, str | None, str]:
    """``(language, reason or None, detail)`` for one caption under ``cfg``.

    ``detector`` is a lingua detector (None: no detection, language None)."""
    if caption is None or not str(caption).strip():
        return None, "missing_caption", "caption is empty" if caption is not None else "caption is null"
    text = str(caption)
    language = detect_language(text, detector) if detector is not None and cfg.detect_language else None
    if cfg.min_caption_words:
        words = len(text.split())
        if words < cfg.min_caption_words:
            return language, "short_caption", f"words={words} < {cfg.min_caption_words}"
    if cfg.max_caption_chars and len(text) > cfg.max_caption_chars:
        return language, "long_caption", f"chars={len(text)} > {cfg.max_caption_chars}"
    if cfg.languages and language not in cfg.languages:
        return language, "language", f"language={language or 'undetermined'} not in {','.join(cfg.languages)}"
    return language, None, ""


class _CaptionRules(beam.DoFn):
    def __init__(self, cfg: CaptionConfig):
        self._cfg = cfg

    def setup(self):
        self._detector = build_detector(self._cfg) if self._cfg.detect_language else None
        ns = records.METRICS_NAMESPACE
        self._in = beam.metrics.Metrics.counter(ns, "caption_in")
        self._out = beam.metrics.Metrics.counter(ns, "caption_out")
        self._reasons = {r: beam.metrics.Metrics.counter(ns, f"caption_{r}") for r in records.REASONS["caption"]}
        self._msecs = beam.metrics.Metrics.distribution(ns, "caption_msecs")

    def process(self, row):
        t0 = time.monotonic()
        self._in.inc()
        language, reason, detail = caption_verdict(row.get("caption"), self._cfg, self._detector)
        out = dict(row)
        out["language"] = language
        self._msecs.update(int((time.monotonic() - t0) * 1000))
        if reason is None:
            self._out.inc()
            yield out
        else:
            self._reasons[reason].inc()
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, records.reject(out, "caption", reason, detail))


class CaptionFilter(beam.PTransform):
    """rows -> (kept, rejected) under the caption rules; every row gains ``language``."""

    def __init__(self, config: CaptionConfig):
        super().__init__()
        self._cfg = config

    def expand(self, rows):
        res = rows | "CaptionRules" >> beam.ParDo(_CaptionRules(self._cfg)).with_outputs(
            records.REJECTED_TAG, main="kept")
        return res.kept, res[records.REJECTED_TAG]


# ---------------------------------------------------------------------------------------------
# CLIP score filters

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


class _ClipRules(beam.DoFn):
    def __init__(self, cfg: ClipFilterConfig):
        self._cfg = cfg

    def setup(self):
        ns = records.METRICS_NAMESPACE
        self._in = beam.metrics.Metrics.counter(ns, "clip_in")
        self._out = beam.metrics.Metrics.counter(ns, "clip_out")
        self._unscored = beam.metrics.Metrics.counter(ns, "clip_unscored")
        self._reasons = {r: beam.metrics.Metrics.counter(ns, f"clip_{r}") for r in records.REASONS["clip"]}

    def process(self, row, cutoff=None):
        self._in.inc()
        score = row.get("clip_score")
        if score is None:
            self._unscored.inc()
        reason, detail = clip_verdict(None if score is None else float(score), self._cfg, cutoff)
        if reason is None:
            self._out.inc()
            yield row
        else:
            self._reasons[reason].inc()
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, records.reject(row, "clip", reason, detail))


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
            res = rows | "ClipRules" >> beam.ParDo(_ClipRules(cfg), cutoff=beam.pvalue.AsSingleton(
                cutoff, default_value=None)).with_outputs(records.REJECTED_TAG, main="kept")
        else:
            res = rows | "ClipRules" >> beam.ParDo(_ClipRules(cfg)).with_outputs(records.REJECTED_TAG, main="kept")
        return res.kept, res[records.REJECTED_TAG]
