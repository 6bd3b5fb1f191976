"""Stage ``caption``: caption rules, applied before download.

Caption rules, in this order, first failure wins (stage ``caption``):

=================  ===========================================================================
``missing_caption``  caption is null, empty or whitespace
``invalid_text``     caption holds NUL or a lone UTF-16 surrogate (the reader already rejects these,
                     with this reason, before the row leaves the Read step; see docs/bad-input.md)
``short_caption``    fewer than ``--min-caption-words`` whitespace-separated words
``long_caption``     more than ``--max-caption-chars`` characters
``language``         detected language not in ``--languages`` (undetermined counts as not in it)
=================  ===========================================================================

Every row leaving the caption stage, kept or rejected, carries ``language`` (ISO 639-1, lowercase,
or None), detected with lingua on the first 1000 characters.

The detector knows only the ``--language-candidates`` (plus the ``--languages`` codes) and is built once
per worker process, shared by every caption DoFn instance there. ``--language-accuracy auto`` (the
default) loads lingua's full models only when ``--languages`` filters rows; a language that is only
recorded uses lingua's low-accuracy mode (trigrams: a fraction of the load time and memory, less
accurate on captions under ~120 characters). With ``--no-detect-language`` lingua is never imported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from clip_curate import records
from clip_curate.fields import ConfigError, opt
from clip_curate.process_cache import ProcessCache
from clip_curate.stages.base import RowFilter, RowStage, Stage, Verdict, register

log = logging.getLogger(__name__)

DETECT_CHARS = 1000


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
    language_accuracy: str = opt(
        "auto", "lingua's models: high (all n-gram sizes: best on short captions; ~5 s and ~150-250 MB per worker "
                "for 12 languages), low (trigrams only: ~0.3 s, ~30 MB; less accurate under ~120 characters), "
                "auto = high when --languages filters rows, low when the language is only recorded",
        choices=("auto", "high", "low"))

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
        if self.language_accuracy not in ("auto", "high", "low"):
            raise ConfigError(f"--language-accuracy: {self.language_accuracy!r} is not one of auto, high, low")
        # without detection the candidates are never used: lingua is not even imported
        checked = (("--languages", self.languages),) + ((("--language-candidates", self.language_candidates),)
                                                         if self.detect_language else ())
        for flag, codes in checked:
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

    @property
    def low_accuracy(self) -> bool:
        """Whether the detector uses lingua's low-accuracy mode (``auto``: when no ``--languages`` filter)."""
        if self.language_accuracy == "auto":
            return not self.languages
        return self.language_accuracy == "low"


_LINGUA_CODES: frozenset[str] | None = None


def lingua_codes() -> frozenset[str]:
    """ISO 639-1 codes (lowercase) of the languages lingua detects."""
    global _LINGUA_CODES
    if _LINGUA_CODES is None:
        from lingua import Language

        _LINGUA_CODES = frozenset(lang.iso_code_639_1.name.lower() for lang in Language.all())
    return _LINGUA_CODES


def detector_key(cfg: CaptionConfig) -> tuple[tuple[str, ...], bool]:
    """What a detector for ``cfg`` is built from: (candidate codes, sorted; () = all), low-accuracy mode."""
    return tuple(sorted(cfg.language_candidates)), cfg.low_accuracy


def build_detector(cfg: CaptionConfig):
    """A lingua detector for ``cfg``: only the candidate languages, in the mode ``cfg`` asks for (lingua
    loads each language's models on first use)."""
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    codes, low = detector_key(cfg)
    if codes:
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*[getattr(IsoCode639_1, c.upper()) for c in codes])
    else:
        builder = LanguageDetectorBuilder.from_all_languages()
    if low:
        builder = builder.with_low_accuracy_mode()
    return builder.build()


#: One detector per worker process and key, shared by every caption DoFn instance (threads, bundles):
#: lingua's models are large, and loading them once per instance multiplied both time and memory.
_DETECTORS = ProcessCache()


def shared_detector(cfg: CaptionConfig):
    """The process's detector for ``cfg`` (built on first call; later calls with the same key share it)."""
    return _DETECTORS.get(detector_key(cfg), lambda: build_detector(cfg))


def detect_language(caption: str, detector) -> str | None:
    lang = detector.detect_language_of(caption[:DETECT_CHARS])
    return lang.iso_code_639_1.name.lower() if lang is not None else None


def caption_verdict(caption: Any, cfg: CaptionConfig, detector=None) -> tuple[str | None, str | None, str]:
    """``(language, reason or None, detail)`` for one caption under ``cfg``.

    ``detector`` is a lingua detector (None: no detection, language None)."""
    if caption is None or not str(caption).strip():
        return None, "missing_caption", "caption is empty" if caption is not None else "caption is null"
    text = str(caption)
    problem = records.text_problem(text)
    if problem:
        return None, "invalid_text", f"caption: {problem}"
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


class _CaptionRules(RowFilter):
    stage = "caption"

    def load(self):
        self._detector = shared_detector(self.config) if self.config.detect_language else None

    def judge(self, row):
        language, reason, detail = caption_verdict(row.get("caption"), self.config, self._detector)
        if reason == "invalid_text":  # stored repaired: Beam's coders and Parquet cannot hold it
            return Verdict({**row, "language": None, "caption": records.repair_text(row["caption"])}, reason,
                           detail + " (stored with U+FFFD)")
        return Verdict({**row, "language": language}, reason, detail)


class CaptionFilter(RowStage):
    """rows -> (kept, rejected) under the caption rules; every row gains ``language``."""

    def __init__(self, config: CaptionConfig):
        super().__init__(_CaptionRules(config), label="CaptionRules")


register(Stage("caption", CaptionConfig, build=lambda cfg, ctx: CaptionFilter(cfg), position=10,
               title="caption rules"))


