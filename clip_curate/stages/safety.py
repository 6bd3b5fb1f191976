"""Safety stage: NSFW image classifier, CLIP concept check and caption word lists.

Three independent heuristics, each raising one flag:

==================  ===============================================================  ================
flag / reason       heuristic                                                        score field
==================  ===============================================================  ================
``nsfw_image``      opennsfw (Yahoo open_nsfw, ONNX) probability >= ``--nsfw-threshold`` ``nsfw_score``
``nsfw_concept``    CLIP zero-shot: image embedding vs unsafe / neutral prompts      ``nsfw_clip_score``
                    >= ``--nsfw-concept-threshold``
``unsafe_caption``  caption contains a term of the word list (whole word)            ``unsafe_caption``
==================  ===============================================================  ================

The concept check trusts the CLIP model's scores, so it runs by default only when the model's card is
calibrated for it (:func:`card_judgment`; ``--nsfw-concept`` forces it on, with a warning). The opennsfw
classifier and the word list do not depend on the CLIP model and stay on.

``--nsfw-policy drop`` rejects a flagged row (stage ``safety``, the first raised flag as reason, all
scores/terms in ``detail``); ``--nsfw-policy tag`` keeps it with ``safety_flags`` set. The pure cores
(:func:`caption_unsafe_term`, :func:`concept_scores`) are usable without Beam; :func:`caption_unsafe_term`
can also run before download to save bandwidth.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
import unicodedata
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable

import apache_beam as beam
import numpy as np

from clip_curate import records
from clip_curate.fields import ConfigError, opt, read_user_text
from clip_curate.models.cards import Judgment, ModelCard, card_for
from clip_curate.models.clip import EmbedPromptSets, has_clip_model, resolve_device
from clip_curate.stages.base import IMAGE, Addon, RowFilter, RowStage, Stage, StageContext, Verdict, register

log = logging.getLogger(__name__)

STAGE = "safety"
POLICIES = ("drop", "tag")
FLAGS = ("nsfw_image", "nsfw_concept", "unsafe_caption")  # also the rejection reasons, in priority order
DEFAULT_CONCEPT_THRESHOLD = 0.5


# ---------------------------------------------------------------------------------------------
# Config

@dataclass(frozen=True)
class SafetyConfig:
    """NSFW / unsafe-content checks and what to do with flagged rows."""

    nsfw_policy: str = opt("drop", "what to do with flagged rows: drop (reject with reason nsfw_image, "
                                   "nsfw_concept or unsafe_caption) or tag (keep, set safety_flags)",
                           choices=POLICIES)
    nsfw_classifier: bool = opt(True, "run the opennsfw image classifier (nsfw_score on every row)")
    nsfw_threshold: float = opt(0.8, "flag nsfw_image when the opennsfw probability is >= this (0..1)")
    nsfw_batch_size: int = opt(32, "images per opennsfw ONNX batch")
    nsfw_concept: bool | None = opt(None, "run the CLIP concept check on image embeddings (needs the embed "
                                          "stage); unset = on only when the model's card is calibrated for it, "
                                          "--nsfw-concept forces it on (with a warning)")
    nsfw_concept_threshold: float | None = opt(None, "flag nsfw_concept when nsfw_clip_score is >= this (0..1); "
                                                     "unset = the model card's threshold, else 0.5")
    nsfw_concept_temperature: float = opt(100.0, "softmax temperature of the concept check (CLIP's logit scale)")
    concepts: str | None = opt(None, "YAML file with 'unsafe:' and 'neutral:' prompt lists for the concept "
                                     "check (default: the shipped clip_curate/data/concepts.yaml)")
    unsafe_concepts: tuple[str, ...] = opt((), "unsafe concept prompt; replaces the unsafe list",
                                           parse="append", flag="--unsafe-concept")
    neutral_concepts: tuple[str, ...] = opt((), "neutral concept prompt; replaces the neutral list",
                                            parse="append", flag="--neutral-concept")
    caption_safety: bool = opt(True, "check captions against the unsafe word list")
    unsafe_words: str | None = opt(None, "unsafe caption word list, one term per line, '#' comments "
                                         "(default: the shipped clip_curate/data/unsafe_words.txt)")

    def __post_init__(self):
        if self.nsfw_policy not in POLICIES:
            raise ConfigError(f"--nsfw-policy: unknown policy {self.nsfw_policy!r}; choose drop or tag")
        for flag, value in (("--nsfw-threshold", self.nsfw_threshold),
                            ("--nsfw-concept-threshold", self.concept_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{flag} must be between 0 and 1, got {value}")
        if self.nsfw_batch_size < 1:
            raise ConfigError(f"--nsfw-batch-size must be >= 1, got {self.nsfw_batch_size}")
        if self.nsfw_concept_temperature <= 0:
            raise ConfigError(f"--nsfw-concept-temperature must be > 0, got {self.nsfw_concept_temperature}")
        for flag, prompts in (("--unsafe-concept", self.unsafe_concepts),
                              ("--neutral-concept", self.neutral_concepts)):
            if any(not str(p).strip() for p in prompts):
                raise ConfigError(f"{flag}: empty prompt; give a short description such as 'a photo of ...'")

    def validate_environment(self) -> None:
        """Read the word list and the concepts file now, so a bad path fails before any work."""
        if self.caption_safety:
            load_wordlist(self.unsafe_words)
        if self.nsfw_concept is not False:
            concept_prompts(self)

    @property
    def concept_threshold(self) -> float:
        """``--nsfw-concept-threshold`` in effect (0.5 when neither the flag nor a card set it)."""
        return DEFAULT_CONCEPT_THRESHOLD if self.nsfw_concept_threshold is None else self.nsfw_concept_threshold

    def prompts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(unsafe prompts, neutral prompts) in effect."""
        return concept_prompts(self)


# ---------------------------------------------------------------------------------------------
# Caption word lists (pure)

_SEPARATORS = r"[\s\-_]+"
_SEPARATORS_FULL = re.compile(_SEPARATORS)
_TOKEN = re.compile(r"[^\W_]+")  # a word: letters/digits (underscore and hyphen separate words)
# Scripts written without spaces between words: their terms match as substrings.
_NO_SPACE_SCRIPT = re.compile(r"[\u0e00-\u0e7f\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def normalize_text(text: str) -> str:
    """NFKC + casefold: the form both captions and terms are matched in."""
    return unicodedata.normalize("NFKC", text).casefold()


def _term_key(text: str) -> str:
    return re.sub(_SEPARATORS, " ", normalize_text(text)).strip()


class WordList:
    """A compiled unsafe-term list: whole-word, case-insensitive, Unicode-aware matching.

    A term matches only between non-letter/digit characters (start, end, space, punctuation,
    underscore); words of a multi-word term may be separated by any run of spaces, hyphens or
    underscores. Terms written entirely in Han / kana / Thai script match as substrings.
    """

    def __init__(self, terms: Iterable[str], source: str = "<list>"):
        keys: dict[str, str] = {}
        for term in terms:
            key = _term_key(term)
            if key:
                keys.setdefault(key, term.strip())
        self.terms: tuple[str, ...] = tuple(keys.values())
        self.source = source
        self._by_key = keys
        # Fast path: terms made of plain word tokens, indexed by their first token (longest first).
        self._by_first: dict[str, list[tuple[str, ...]]] = {}
        self._substrings: list[str] = []
        special = []
        for key in sorted(keys, key=len, reverse=True):
            words = tuple(key.split(" "))
            if all(_NO_SPACE_SCRIPT.match(ch) for ch in key.replace(" ", "")):
                self._substrings.append(key)
            elif all(_TOKEN.fullmatch(w) for w in words):
                self._by_first.setdefault(words[0], []).append(words)
            else:
                special.append(key)
        self._special = self._compile(special)

    @staticmethod
    def _compile(keys: list[str]) -> re.Pattern | None:
        """Regex for terms with inner punctuation ("f*ck", "a.s.s"): same boundary rules."""
        if not keys:
            return None
        parts = [rf"(?<![^\W_]){_SEPARATORS.join(re.escape(w) for w in key.split(' '))}(?![^\W_])" for key in keys]
        return re.compile("|".join(parts))

    def __len__(self) -> int:
        return len(self.terms)

    def __reduce__(self):
        return (WordList, (self.terms, self.source))

    def find(self, caption: str | None) -> str | None:
        """A list term found in ``caption`` (as written in the list; leftmost, longest), or None."""
        if not caption or not self._by_key:
            return None
        text = normalize_text(caption)
        if self._by_first:
            tokens = list(_TOKEN.finditer(text))
            for i, tok in enumerate(tokens):
                for words in self._by_first.get(tok.group(0), ()):
                    if self._matches_at(text, tokens, i, words):
                        return self._by_key[" ".join(words)]
        for key in self._substrings:
            if key.replace(" ", "") in text:
                return self._by_key[key]
        if self._special is not None:
            m = self._special.search(text)
            if m is not None:
                return self._by_key.get(_term_key(m.group(0)), m.group(0))
        return None

    @staticmethod
    def _matches_at(text: str, tokens: list, i: int, words: tuple[str, ...]) -> bool:
        if i + len(words) > len(tokens):
            return False
        for j in range(1, len(words)):
            prev, cur = tokens[i + j - 1], tokens[i + j]
            if cur.group(0) != words[j] or not _SEPARATORS_FULL.fullmatch(text, prev.end(), cur.start()):
                return False
        return True


def parse_wordlist(text: str) -> tuple[str, ...]:
    """Terms of a word-list file: one per line, blank lines and ``#`` comments ignored."""
    out = []
    for line in text.splitlines():
        term = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if term:
            out.append(term)
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _cached_wordlist(terms: tuple[str, ...]) -> WordList:
    return WordList(terms)


def caption_unsafe_term(caption: str | None, wordlist: WordList | Iterable[str]) -> str | None:
    """The unsafe term ``caption`` contains (whole word, case-insensitive), or None.

    ``wordlist`` is a :class:`WordList` (see :func:`load_wordlist`) or any iterable of terms.
    Pure and cheap: the caption stage may call it before download.
    """
    if not isinstance(wordlist, WordList):
        wordlist = _cached_wordlist(tuple(wordlist))
    return wordlist.find(caption)


@functools.lru_cache(maxsize=8)
def load_wordlist(path: str | None = None) -> WordList:
    """The word list at ``path`` (any Beam filesystem), or the shipped default when None."""
    if path is None:
        text = resources.files("clip_curate.data").joinpath("unsafe_words.txt").read_text("utf-8")
        return WordList(parse_wordlist(text), "clip_curate/data/unsafe_words.txt")
    terms = parse_wordlist(read_user_text(path, "--unsafe-words"))
    if not terms:
        raise ConfigError(f"--unsafe-words: {path} has no terms; one term per line ('#' starts a comment)")
    return WordList(terms, path)


# ---------------------------------------------------------------------------------------------
# CLIP concept check (pure)

def _parse_concepts(text: str, source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--concepts {source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or set(data) - {"unsafe", "neutral"}:
        raise ConfigError(f"--concepts {source}: expected a mapping with keys 'unsafe' and 'neutral' "
                          "(lists of prompts)")
    out = []
    for key in ("unsafe", "neutral"):
        items = data.get(key)
        if not isinstance(items, list) or not items or not all(isinstance(s, str) and s.strip() for s in items):
            raise ConfigError(f"--concepts {source}: '{key}' must be a non-empty list of prompt strings")
        out.append(tuple(s.strip() for s in items))
    return out[0], out[1]


def concept_prompts(config: SafetyConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(unsafe, neutral) prompts: --unsafe-concept/--neutral-concept > --concepts file > shipped defaults."""
    if config.concepts:
        unsafe, neutral = _parse_concepts(read_user_text(config.concepts, "--concepts"), config.concepts)
    else:
        text = resources.files("clip_curate.data").joinpath("concepts.yaml").read_text("utf-8")
        unsafe, neutral = _parse_concepts(text, "clip_curate/data/concepts.yaml")
    return (tuple(config.unsafe_concepts) or unsafe, tuple(config.neutral_concepts) or neutral)


def concept_scores(image_embeddings: np.ndarray, unsafe_embeddings: np.ndarray,
                   neutral_embeddings: np.ndarray, temperature: float = 100.0) -> np.ndarray:
    """LAION-style zero-shot unsafe probability for each L2-normalised image embedding.

    Softmax over two logits, ``temperature * max cos(image, unsafe prompts)`` and
    ``temperature * max cos(image, neutral prompts)``; independent of the number of prompts per list.
    """
    x = np.atleast_2d(np.asarray(image_embeddings, dtype=np.float32))
    su = (x @ np.asarray(unsafe_embeddings, dtype=np.float32).T).max(axis=1)
    sn = (x @ np.asarray(neutral_embeddings, dtype=np.float32).T).max(axis=1)
    z = np.clip(temperature * (su - sn), -60.0, 60.0)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Model card (pure): is the concept check on?

def card_judgment(config: SafetyConfig, card: ModelCard | None) -> tuple[SafetyConfig, Judgment]:
    """The concept check's setting for a model with ``card`` (None: the run has no CLIP model), and the
    line saying so. Unset ``--nsfw-concept`` follows the card; ``--nsfw-concept`` runs it anyway, with a
    warning; the card's threshold applies unless ``--nsfw-concept-threshold`` is given."""
    classifier = f"image classifier: {'on' if config.nsfw_classifier else 'off'}"
    if card is None:
        warning = ("--nsfw-concept: the run has no CLIP model (--clip-model none, or no embed stage), so the "
                   "concept check cannot run") if config.nsfw_concept else None
        return (dataclasses.replace(config, nsfw_concept=False, nsfw_concept_threshold=config.concept_threshold),
                Judgment(f"nsfw concept check: off (no CLIP model); {classifier}", warning))
    threshold = config.nsfw_concept_threshold
    if threshold is None:
        threshold = card.threshold("nsfw_concept") or DEFAULT_CONCEPT_THRESHOLD
    covered = card.covers("nsfw_concept")
    warning = None
    if config.nsfw_concept is False:
        on, why = False, "--no-nsfw-concept"
    elif covered:
        on, why = True, f"{card.model}'s card, threshold {threshold:g}"
    elif config.nsfw_concept:
        on, why = True, f"as asked by --nsfw-concept, but {card.not_calibrated()}"
        warning = f"nsfw concept check: on as asked by --nsfw-concept, but {card.not_calibrated()}: its flags may be wrong"
    else:
        on, why = False, card.not_calibrated()
    state = "on" if on else "off"
    return (dataclasses.replace(config, nsfw_concept=on, nsfw_concept_threshold=threshold),
            Judgment(f"nsfw concept check: {state} ({why}); {classifier}", warning))


# ---------------------------------------------------------------------------------------------
# Decision (pure)

def decide(scores: dict[str, Any], config: SafetyConfig) -> tuple[list[str], list[str]]:
    """Raised flags (in FLAGS order) and their detail strings, from a row's scores."""
    flags, details = [], []
    s = scores.get("nsfw_score")
    if s is not None and s >= config.nsfw_threshold:
        flags.append("nsfw_image")
        details.append(f"nsfw_score={s:.3f} >= {config.nsfw_threshold}")
    c = scores.get("nsfw_clip_score")
    if c is not None and c >= config.concept_threshold:
        flags.append("nsfw_concept")
        details.append(f"nsfw_clip_score={c:.3f} >= {config.concept_threshold}")
    term = scores.get("unsafe_term")
    if term:
        flags.append("unsafe_caption")
        details.append(f"term={term!r}")
    return flags, details


# ---------------------------------------------------------------------------------------------
# Beam

class _SafetyDoFn(RowFilter):
    """Checks a batch of rows (from BatchElements): one classifier forward pass per batch, on ``device``."""

    stage = STAGE

    def __init__(self, config: SafetyConfig, wordlist: WordList | None, device: str = "auto",
                 precision: str = "fp32"):
        super().__init__(config)
        self._cfg = config
        self._wordlist = wordlist
        self._device = device
        self._precision = precision

    def load(self):
        self._flags = {r: self.counter(f"flag_{r}") for r in FLAGS}
        self._undecodable = self.counter("nsfw_undecodable")
        self._dim_mismatch = self.counter("concept_dim_mismatch")
        # busy ms per batch, summed into stats.json timings: host preprocessing vs the forward pass
        self._prepare_msecs = beam.metrics.Metrics.distribution(records.METRICS_NAMESPACE, f"{STAGE}_nsfw_prepare_msecs")
        self._forward_msecs = beam.metrics.Metrics.distribution(records.METRICS_NAMESPACE, f"{STAGE}_nsfw_forward_msecs")
        self._classifier = None
        if self._cfg.nsfw_classifier:
            from clip_curate.models.nsfw import shared_model

            self._classifier = shared_model(self._device, self._precision)  # one per process
            log.info("safety: opennsfw classifier on %s (%s)", self._classifier.device, self._classifier.backend)

    def _nsfw_scores(self, batch: list[dict]) -> list[float | None]:
        """P(nsfw) per row (None: no image, or undecodable): host preprocessing, then one forward pass."""
        from clip_curate.models.nsfw import stack_pixels

        scores: list[float | None] = [None] * len(batch)
        if self._classifier is None:
            return scores
        present = [i for i, row in enumerate(batch) if row.get("image")]
        t0 = time.perf_counter()
        pixels, index, errors = stack_pixels([batch[i].get("image") for i in present])
        t1 = time.perf_counter()
        if errors:
            self._undecodable.inc(len(errors))
        if index:
            for j, v in zip(index, self._classifier.scores(pixels)):
                scores[present[j]] = float(v)
        self._prepare_msecs.update(int(round(1000.0 * (t1 - t0))))
        self._forward_msecs.update(int(round(1000.0 * (time.perf_counter() - t1))))
        return scores

    def _clip_scores(self, batch: list[dict], prompts: dict | None) -> list[float | None]:
        scores: list[float | None] = [None] * len(batch)
        if not prompts:
            return scores
        unsafe, neutral = prompts["unsafe"], prompts["neutral"]
        index, embs = [], []
        for i, row in enumerate(batch):
            emb = row.get("image_embedding")
            if emb is None:
                continue
            emb = np.asarray(emb, dtype=np.float32)
            if emb.shape != (unsafe.shape[1],):
                self._dim_mismatch.inc()
                continue
            index.append(i)
            embs.append(emb)
        if embs:
            values = concept_scores(np.stack(embs), unsafe, neutral, self._cfg.nsfw_concept_temperature)
            for i, v in zip(index, values):
                scores[i] = float(v)
        return scores

    def process(self, batch, prompts=None):
        t0 = time.perf_counter()
        batch = list(batch)
        self._in.inc(len(batch))
        nsfw = self._nsfw_scores(batch)
        clip = self._clip_scores(batch, prompts)
        per_row_ms = 1000.0 * (time.perf_counter() - t0) / max(len(batch), 1)
        for row, s, c in zip(batch, nsfw, clip):
            t1 = time.perf_counter()
            term = self._wordlist.find(row.get("caption")) if self._wordlist is not None else None
            flags, details = decide({"nsfw_score": s, "nsfw_clip_score": c, "unsafe_term": term}, self._cfg)
            for f in flags:
                self._flags[f].inc()
            out = dict(row)
            out["nsfw_score"] = s
            out["nsfw_clip_score"] = c
            out["unsafe_caption"] = term is not None
            out["safety_flags"] = ",".join(flags)
            self._msecs.update(int(per_row_ms + 1000.0 * (time.perf_counter() - t1)))
            if flags and self._cfg.nsfw_policy == "drop":
                yield from self.emit(Verdict(out, flags[0], "; ".join(details)))
            else:
                yield from self.emit(Verdict(out))


class SafetyCheck(beam.PTransform):
    """rows -> (kept, rejected): opennsfw score, CLIP concept score, caption word list, policy.

    ``model_config`` is the run's CLIP ``ModelConfig``; without one (or with ``--clip-model none``)
    the concept check is skipped and ``nsfw_clip_score`` stays null. An unset ``nsfw_concept`` follows
    the model's card (:func:`card_judgment`). The concept check reuses each
    row's ``image_embedding``; only the prompts are embedded, once per run. ``prompt_embeddings``
    (``{"unsafe": (u, d) array, "neutral": (n, d) array}``, L2-normalised) may be given instead of a model.
    """

    def __init__(self, config: SafetyConfig, model_config: Any = None,
                 prompt_embeddings: dict[str, np.ndarray] | None = None):
        super().__init__()
        self._cfg = config
        self._model_config = model_config
        self._given = None
        if prompt_embeddings is not None:
            self._given = {k: np.asarray(prompt_embeddings[k], dtype=np.float32) for k in ("unsafe", "neutral")}
        if config.nsfw_concept is None and prompt_embeddings is None:  # built without a run: ask the card
            config = card_judgment(config, card_for(model_config) if has_clip_model(model_config) else None)[0]
            self._cfg = config
        # the classifier runs where the CLIP model does (--device, --precision)
        self._device = getattr(model_config, "device", None) or "auto"
        self._precision = getattr(model_config, "precision", None) or "fp32"
        if config.nsfw_classifier and self._device.startswith("cuda") and not getattr(model_config, "accelerator", None):
            resolve_device(self._device)  # ConfigError now, not on a worker (with --accelerator workers check)
        self._wordlist = load_wordlist(config.unsafe_words) if config.caption_safety else None
        self._prompts = concept_prompts(config) if config.nsfw_concept is not False else None

    def expand(self, rows):
        side = []
        if self._prompts is not None and self._given is not None:
            side = [beam.pvalue.AsSingleton(rows.pipeline | "GivenPrompts" >> beam.Create([self._given]))]
        elif self._prompts is not None and has_clip_model(self._model_config):
            unsafe, neutral = self._prompts
            prompts = rows.pipeline | "ConceptPrompts" >> EmbedPromptSets(
                self._model_config, {"unsafe": unsafe, "neutral": neutral})
            side = [beam.pvalue.AsSingleton(prompts)]
        results = (
            rows
            # full batches (one forward pass each), as RunInference makes them for the CLIP model
            | "Batch" >> beam.BatchElements(min_batch_size=self._cfg.nsfw_batch_size,
                                            max_batch_size=self._cfg.nsfw_batch_size)
            | "Check" >> beam.ParDo(_SafetyDoFn(self._cfg, self._wordlist, self._device, self._precision),
                                    *side).with_outputs(
                records.REJECTED_TAG, main="kept")
        )
        return results.kept, results[records.REJECTED_TAG]


class CaptionSafety(RowFilter):
    """Reject captions matching the unsafe word list (``caption/unsafe_caption``), before download."""

    stage = "caption"

    def setup(self):
        # counted apart from the caption stage's own in/out (those rows were counted there)
        self._dropped = self.counter("unsafe_caption")
        self._words = load_wordlist(self.config.unsafe_words)

    def process(self, row):
        term = caption_unsafe_term(row.get("caption"), self._words)
        if term:
            self._dropped.inc()
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG,
                                           records.reject(row, "caption", "unsafe_caption", f"term={term!r}"))
        else:
            yield row


def _early_caption_check(cfg: SafetyConfig, ctx: StageContext):
    """Under the drop policy, unsafe captions are rejected right after the caption rules: no download."""
    if cfg.nsfw_policy == "drop" and cfg.caption_safety:
        return RowStage(CaptionSafety(cfg), label="CaptionSafety")
    return None


register(Stage("safety", SafetyConfig, position=70, needs=frozenset({IMAGE}),
               build=lambda cfg, ctx: SafetyCheck(cfg, model_config=getattr(ctx.configs, "embed", None)),
               check=SafetyConfig.validate_environment,
               addons=(Addon(after="caption", label="CaptionSafety", build=_early_caption_check),),
               title="safety"))
