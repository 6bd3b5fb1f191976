"""Bias audit: who is in the input, who survives curation, and what the filters removed.

Computed with Beam combiners over three populations, **input** (curated ∪ rejected), **curated** and
**rejected**, so it works at any size (no step collects rows in one process): attribute groups from a
YAML file (caption terms + CLIP prompts), language, registered domain, image size / aspect, clip_score
histograms and rejection reasons per group, and the **representation ratio** of each group,
``share in curated / share in input``, flagged outside ``[--ratio-low, --ratio-high]`` (default
[0.8, 1.25], the four-fifths rule). Outputs ``audit.json`` (``schemas/audit.json``) and a
self-contained ``report.html``.

Group membership of a row (per attribute): caption term match (whole word) OR, when the row has an
image embedding and the audit has a CLIP model, CLIP zero-shot over the attribute's group prompts plus
its background prompts (the group must win with probability > ``--zero-shot-min-prob``). Ratios are
computed on two bases so that like is compared with like: ``caption`` (caption terms, all rows) and
``caption_or_clip`` (rows that carry an image embedding only, since rows rejected before the CLIP
stage have none).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Sequence

import apache_beam as beam
import numpy as np

from clip_curate import records
from clip_curate.fields import (ConfigError, OneLineParser, add_config_arguments, config_from_namespace, opt,
                                 read_user_text, validate_beam_args)
from clip_curate.models.cards import Judgment, ModelCard, card_for
from clip_curate.models.clip import EmbedPromptSets, ModelConfig, has_clip_model
from clip_curate.stages.base import CounterSumFn
from clip_curate.stages.safety import WordList

log = logging.getLogger(__name__)

POPULATIONS = ("input", "curated", "rejected")
BASES = ("caption", "caption_or_clip")
SIZE_EDGES = (0, 64, 128, 256, 384, 512, 768, 1024, 2048, 4096)          # shorter side, px; last bin open
ASPECT_EDGES = (0.0, 0.5, 0.67, 0.8, 0.95, 1.05, 1.25, 1.5, 2.0, 3.0)      # width / height; last bin open
#: clip_score is counted in fine bins of CLIP_FINE_STEP over [-1, 1]; the audit's histogram bins are then
#: drawn from the data's range (:func:`clip_bins`), at most CLIP_MAX_BINS of a round width.
CLIP_FINE_STEP = 0.005
CLIP_FINE_BINS = 400
CLIP_STEPS = (0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.2, 0.25)
CLIP_MAX_BINS = 24
UNKNOWN = "(unknown)"
DEFAULT_ZERO_SHOT_MIN_PROB = 0.5


# ---------------------------------------------------------------------------------------------
# Config and attribute spec

@dataclass(frozen=True)
class AuditConfig:
    """How the bias audit assigns groups and flags skew."""

    attributes: str | None = opt(None, "attribute groups YAML (default: the shipped "
                                        "clip_curate/data/attributes.yaml)")
    ratio_low: float = opt(0.8, "flag a group whose representation ratio is below this")
    ratio_high: float = opt(1.25, "flag a group whose representation ratio is above this")
    min_group_rows: int = opt(10, "only flag groups with at least this many input rows on the ratio's basis")
    audit_clip: bool | None = opt(None, "also assign groups by CLIP zero-shot on stored image embeddings; unset = "
                                        "only when the model's card is calibrated for it, --audit-clip forces "
                                        "it on (with a warning)")
    zero_shot_min_prob: float | None = opt(None, "CLIP zero-shot: the winning group needs a probability above "
                                                 "this; unset = the model card's threshold, else 0.5")
    zero_shot_temperature: float = opt(100.0, "CLIP zero-shot softmax temperature (CLIP's logit scale)")
    top_domains: int = opt(25, "domains listed per population")

    def __post_init__(self):
        if not 0 < self.ratio_low < 1 < self.ratio_high:
            raise ConfigError(f"--ratio-low/--ratio-high must satisfy 0 < low < 1 < high, got "
                              f"{self.ratio_low}, {self.ratio_high}")
        if self.min_group_rows < 1:
            raise ConfigError(f"--min-group-rows must be >= 1, got {self.min_group_rows}")
        if not 0.0 <= self.zero_shot_prob <= 1.0:
            raise ConfigError(f"--zero-shot-min-prob must be between 0 and 1, got {self.zero_shot_min_prob}")
        if self.zero_shot_temperature <= 0:
            raise ConfigError(f"--zero-shot-temperature must be > 0, got {self.zero_shot_temperature}")
        if self.top_domains < 1:
            raise ConfigError(f"--top-domains must be >= 1, got {self.top_domains}")

    @property
    def zero_shot_prob(self) -> float:
        """``--zero-shot-min-prob`` in effect (0.5 when neither the flag nor a model card set it)."""
        return DEFAULT_ZERO_SHOT_MIN_PROB if self.zero_shot_min_prob is None else self.zero_shot_min_prob

    def card_judgment(self, card: ModelCard | None) -> tuple["AuditConfig", Judgment]:
        """Zero-shot attribute membership under the model's ``card`` (None: no CLIP model): unset
        ``--audit-clip`` follows the card; ``--audit-clip`` runs it anyway, with a warning; the card's
        probability threshold applies unless ``--zero-shot-min-prob`` is given."""
        prob = self.zero_shot_min_prob
        if prob is None:
            prob = (card.threshold("audit_zero_shot") if card is not None else None) or DEFAULT_ZERO_SHOT_MIN_PROB
        warning = None
        if card is None:
            on, why = False, "no CLIP model"
            if self.audit_clip:
                warning = "--audit-clip: the run has no CLIP model, so audit groups come from caption terms only"
        elif self.audit_clip is False:
            on, why = False, "--no-audit-clip"
        elif card.covers("audit_zero_shot"):
            on, why = True, f"{card.model}'s card"
        elif self.audit_clip:
            on, why = True, f"as asked by --audit-clip, but {card.not_calibrated('them')}"
            warning = (f"audit zero-shot attributes: on as asked by --audit-clip, but {card.not_calibrated('them')}: "
                       "group membership by CLIP may be wrong")
        else:
            on, why = False, card.not_calibrated("them")
        line = f"audit zero-shot attributes: {'on' if on else 'off'} ({why}); caption terms: on"
        return dataclasses.replace(self, audit_clip=on, zero_shot_min_prob=prob), Judgment(line, warning)


@dataclass(frozen=True)
class Group:
    name: str
    terms: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Attribute:
    name: str
    groups: tuple[Group, ...]
    label: str = ""
    description: str = ""
    background_prompts: tuple[str, ...] = ()
    cooccur_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class AttributeSpec:
    """Parsed attributes YAML."""

    attributes: tuple[Attribute, ...]
    source: str = ""

    def prompts(self) -> tuple[str, ...]:
        """Every CLIP prompt of the spec (groups and backgrounds), deduplicated, in order."""
        seen: dict[str, None] = {}
        for a in self.attributes:
            for g in a.groups:
                seen.update(dict.fromkeys(g.prompts))
            seen.update(dict.fromkeys(a.background_prompts))
        return tuple(seen)


def _str_list(value: Any, where: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and str(v).strip() for v in value):
        raise ConfigError(f"--attributes {source}: {where} must be a list of non-empty strings")
    return tuple(str(v).strip() for v in value)


def parse_attributes(data: Any, source: str = "<yaml>") -> AttributeSpec:
    """Validate a loaded attributes YAML document (see clip_curate/data/attributes.yaml)."""
    if not isinstance(data, dict) or not isinstance(data.get("attributes"), dict) or not data["attributes"]:
        raise ConfigError(f"--attributes {source}: expected a mapping with an 'attributes:' mapping "
                          "of attribute name -> {groups: {...}}")
    unknown = set(data) - {"attributes", "background_prompts"}
    if unknown:
        raise ConfigError(f"--attributes {source}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; "
                          "allowed: attributes, background_prompts")
    shared_bg = _str_list(data.get("background_prompts"), "background_prompts", source)
    attrs = []
    for name, body in data["attributes"].items():
        if not isinstance(body, dict) or not isinstance(body.get("groups"), dict) or not body["groups"]:
            raise ConfigError(f"--attributes {source}: attribute '{name}' needs a non-empty 'groups:' mapping")
        extra = set(body) - {"groups", "label", "description", "background_prompts", "cooccur_with"}
        if extra:
            raise ConfigError(f"--attributes {source}: attribute '{name}': unknown key(s) {', '.join(sorted(map(str, extra)))}")
        groups = []
        for gname, g in body["groups"].items():
            if not isinstance(g, dict) or set(g) - {"terms", "prompts"}:
                raise ConfigError(f"--attributes {source}: group '{name}/{gname}' must be a mapping with "
                                  "'terms' and/or 'prompts' lists")
            terms = _str_list(g.get("terms"), f"'{name}/{gname}' terms", source)
            prompts = _str_list(g.get("prompts"), f"'{name}/{gname}' prompts", source)
            if not terms and not prompts:
                raise ConfigError(f"--attributes {source}: group '{name}/{gname}' has neither terms nor prompts")
            groups.append(Group(str(gname), terms, prompts))
        bg = (_str_list(body["background_prompts"], f"'{name}' background_prompts", source)
              if "background_prompts" in body else shared_bg)
        co = _str_list(body.get("cooccur_with"), f"'{name}' cooccur_with", source)
        attrs.append(Attribute(str(name), tuple(groups), str(body.get("label") or name),
                               str(body.get("description") or ""), bg, co))
    names = {a.name for a in attrs}
    for a in attrs:
        for other in a.cooccur_with:
            if other not in names or other == a.name:
                raise ConfigError(f"--attributes {source}: '{a.name}' cooccur_with names unknown attribute "
                                  f"'{other}'; choose from {', '.join(sorted(names - {a.name}))}")
    return AttributeSpec(tuple(attrs), source)


def load_attributes(path: str | None = None) -> AttributeSpec:
    """The attribute spec at ``path`` (any Beam filesystem), or the shipped default when None."""
    import yaml

    if path is None:
        text = resources.files("clip_curate.data").joinpath("attributes.yaml").read_text("utf-8")
        source = "clip_curate/data/attributes.yaml"
    else:

        text, source = read_user_text(path, "--attributes"), path
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--attributes {source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_attributes(data, source)


# ---------------------------------------------------------------------------------------------
# Per-row features (pure)

def bin_index(value: float, edges: Sequence[float]) -> int:
    """Index of the bin of ``value``: values below edges[1] -> 0, at/after edges[-1] -> len(edges)-1."""
    i = int(np.searchsorted(np.asarray(edges), value, side="right")) - 1
    return min(max(i, 0), len(edges) - 1)


def clip_fine_bin(score: float) -> int:
    """Fine bin of a clip_score: ``floor((score + 1) / CLIP_FINE_STEP)`` within [0, CLIP_FINE_BINS - 1].
    A score within 5e-7 below an edge counts as on it, so a float32 copy (Parquet) bins like the float64."""
    return min(max(int(math.floor((score + 1.0) / CLIP_FINE_STEP + 1e-4)), 0), CLIP_FINE_BINS - 1)


def clip_bins(fine_bins: Sequence[int]) -> tuple[list[float], float, Any]:
    """Histogram bins that span the data: ``(lower edges, width, fine bin -> bin index)``.

    The width is the smallest of CLIP_STEPS giving at most CLIP_MAX_BINS bins over the occupied fine
    bins; edges are multiples of the width, so each bin is a union of whole fine bins. Without any
    score: 0 .. 1 in steps of 0.05."""
    if not fine_bins:
        lo, hi = clip_fine_bin(0.0), clip_fine_bin(0.999)
    else:
        lo, hi = min(fine_bins), max(fine_bins)
    for step in CLIP_STEPS:
        k = int(round(step / CLIP_FINE_STEP))
        start = (lo // k) * k
        n = (hi - start) // k + 1
        if n <= CLIP_MAX_BINS or step == CLIP_STEPS[-1]:
            break
    edges = [round(-1.0 + (start + i * k) * CLIP_FINE_STEP, 4) for i in range(n)]
    return edges, step, lambda j: min(max((j - start) // k, 0), n - 1)


def image_dims(row: dict) -> tuple[int | None, int | None]:
    w = row.get("original_width") or row.get("width")
    h = row.get("original_height") or row.get("height")
    return (int(w), int(h)) if w and h else (None, None)


def zero_shot_group(image_embedding: np.ndarray, group_embs: list[np.ndarray], background: np.ndarray | None,
                    temperature: float, min_prob: float) -> int | None:
    """Index of the group CLIP assigns, or None (background wins, or the winner's probability is not
    above ``min_prob``: a tie between two groups assigns neither).

    Each class's logit is ``temperature * max cosine(image, its prompts)``; background prompts are
    classes of their own. Groups without prompts take no part.
    """
    logits, owners = [], []
    for gi, embs in enumerate(group_embs):
        if embs is not None and len(embs):
            logits.append(float((embs @ image_embedding).max()))
            owners.append(gi)
    if not logits:
        return None
    if background is not None and len(background):
        sims = background @ image_embedding
        logits.extend(float(s) for s in sims)
        owners.extend([None] * len(sims))
    z = temperature * np.asarray(logits)
    p = np.exp(z - z.max())
    p /= p.sum()
    best = int(p.argmax())
    if owners[best] is None or p[best] <= min_prob:
        return None
    return owners[best]


class _Matcher:
    """Group membership of one row, per attribute: caption terms and (optionally) CLIP zero-shot."""

    def __init__(self, spec: AttributeSpec, cfg: AuditConfig, prompt_embs: dict[str, np.ndarray] | None):
        self.spec = spec
        self.cfg = cfg
        self.words = {a.name: [WordList(g.terms) for g in a.groups] for a in spec.attributes}
        self.dim = None
        self.clip: dict[str, tuple[list, np.ndarray | None]] = {}
        if prompt_embs:
            for a in spec.attributes:
                gembs = [np.stack([prompt_embs[p] for p in g.prompts]) if g.prompts else None for g in a.groups]
                bg = np.stack([prompt_embs[p] for p in a.background_prompts]) if a.background_prompts else None
                if any(e is not None for e in gembs):
                    self.clip[a.name] = (gembs, bg)
                    self.dim = next(e for e in gembs if e is not None).shape[1]

    def embedding(self, row: dict) -> np.ndarray | None:
        emb = row.get("image_embedding")
        if emb is None or self.dim is None:
            return None
        emb = np.asarray(emb, dtype=np.float32)
        return emb if emb.shape == (self.dim,) else None

    def groups(self, row: dict, emb: np.ndarray | None) -> dict[str, dict[str, str]]:
        """{attribute: {group: 'caption' | 'clip' | 'both'}} for groups the row belongs to."""
        caption = row.get("caption")
        out: dict[str, dict[str, str]] = {}
        for a in self.spec.attributes:
            hits = {g.name: "caption" for g, wl in zip(a.groups, self.words[a.name]) if wl.find(caption)}
            if emb is not None and a.name in self.clip:
                gembs, bg = self.clip[a.name]
                gi = zero_shot_group(emb, gembs, bg, self.cfg.zero_shot_temperature, self.cfg.zero_shot_prob)
                if gi is not None:
                    name = a.groups[gi].name
                    hits[name] = "both" if name in hits else "clip"
            out[a.name] = hits
        return out


def registered_domain(url: str | None, extractor) -> str:
    """Registered domain (``example.co.uk``) of ``url``; the host itself for IPs and bare names."""
    if not url:
        return UNKNOWN
    try:
        r = extractor(url)
    except Exception:  # noqa: BLE001 - malformed URL text
        return UNKNOWN
    top = getattr(r, "top_domain_under_public_suffix", None)
    if top is None:
        top = r.registered_domain
    return (top or r.domain or UNKNOWN).lower()


def row_keys(pop: str, row: dict, groups: dict[str, dict[str, str]], has_emb: bool,
             cooccur: Sequence[tuple[str, str]] = ()) -> Counter:
    """The counter increments one row contributes (for its own population and for 'input')."""
    c: Counter = Counter()
    lang = row.get("language") or UNKNOWN
    w, h = image_dims(row)
    score = row.get("clip_score")
    score = None if score is None or (isinstance(score, float) and math.isnan(score)) else float(score)
    reason = f"{row.get('stage')}/{row.get('reason')}" if pop == "rejected" else None
    for p in (pop, "input"):
        c[("rows", "caption", p)] += 1
        if has_emb:
            c[("rows", "caption_or_clip", p)] += 1
        c[("lang", p, lang)] += 1
        if w:
            c[("size", p, bin_index(min(w, h), SIZE_EDGES))] += 1
            c[("aspect", p, bin_index(w / h, ASPECT_EDGES))] += 1
        if score is not None:
            c[("clip", p, clip_fine_bin(score))] += 1
        for attr, hits in groups.items():
            cap_hits = [g for g, via in hits.items() if via != "clip"]
            for g in cap_hits:
                c[("g", "caption", p, attr, g)] += 1
            if not cap_hits:
                c[("none", "caption", p, attr)] += 1
            if has_emb:
                for g in hits:
                    c[("g", "caption_or_clip", p, attr, g)] += 1
                if not hits:
                    c[("none", "caption_or_clip", p, attr)] += 1
            for g in hits:
                c[("member", p, attr, g)] += 1
                if score is not None:
                    c[("gclip", p, attr, g, clip_fine_bin(score))] += 1
                    c[("gclip_sum", p, attr, g)] += score
                    c[("gclip_n", p, attr, g)] += 1
        for a, b in cooccur:
            for ga in groups.get(a, {}):
                for gb in groups.get(b, {}):
                    c[("co", p, a, ga, b, gb)] += 1
    for attr, hits in groups.items():
        for g, via in hits.items():
            c[("via", attr, g, via)] += 1
            if reason:
                c[("greason", attr, g, reason)] += 1
    if reason:
        c[("reason", reason)] += 1
    return c


# ---------------------------------------------------------------------------------------------
# Beam

class _Features(beam.DoFn):
    """(population, row) -> (counter increments, (population, domain)); matchers built in setup."""

    def __init__(self, spec: AttributeSpec, cfg: AuditConfig):
        self._spec = spec
        self._cfg = cfg
        self._rows = beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, "audit_rows")

    def setup(self):
        import tldextract

        self._tld = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
        self._matcher = None
        self._cooccur = [(a.name, b) for a in self._spec.attributes for b in a.cooccur_with]

    def process(self, element, prompt_embs=None):
        pop, row = element
        if self._matcher is None:
            self._matcher = _Matcher(self._spec, self._cfg, prompt_embs)
        self._rows.inc()
        emb = self._matcher.embedding(row)
        groups = self._matcher.groups(row, emb)
        keys = row_keys(pop, row, groups, emb is not None, self._cooccur)
        if self._matcher.dim is not None and row.get("image_embedding") is not None and emb is None:
            keys[("dim_mismatch",)] += 1
        yield keys, registered_domain(row.get("url"), self._tld), pop


def _domain_pairs(element):
    _, domain, pop = element
    yield (pop, domain), 1
    yield ("input", domain), 1


class BiasAudit(beam.PTransform):
    """(curated, rejected) PCollections (or a dict with those keys) -> audit.json + report.html.

    Writes into ``output_dir`` (any Beam filesystem) and returns a one-element PCollection with the
    audit dict. ``model_config`` (the run's CLIP ModelConfig) enables CLIP zero-shot membership on
    rows that carry ``image_embedding``; ``prompt_embeddings`` ({prompt: vector}) may be given
    instead of a model.
    """

    def __init__(self, output_dir: str, config: AuditConfig | None = None, model_config: Any = None,
                 spec: AttributeSpec | None = None, prompt_embeddings: dict[str, Any] | None = None,
                 title: str = "clip-curate bias audit", sources: dict[str, Any] | None = None):
        super().__init__()
        self._out = output_dir
        self._cfg = config or AuditConfig()
        if self._cfg.audit_clip is None and not prompt_embeddings:  # built without a run: ask the card
            card = card_for(model_config) if has_clip_model(model_config) else None
            self._cfg = self._cfg.card_judgment(card)[0]
        self._spec = spec or load_attributes(self._cfg.attributes)
        self._model_config = model_config
        self._prompt_embs = ({k: np.asarray(v, dtype=np.float32) for k, v in prompt_embeddings.items()}
                             if prompt_embeddings else None)
        self._title = title
        self._sources = sources or {}
        if self._prompt_embs is not None:
            missing = [p for p in self._spec.prompts() if p not in self._prompt_embs]
            if missing:
                raise ValueError(f"prompt_embeddings lacks {len(missing)} prompt(s), e.g. {missing[0]!r}")

    def _clip_mode(self) -> str:
        if self._cfg.audit_clip is False or not self._spec.prompts():
            return "off"
        if self._prompt_embs is not None:
            return "given"
        return "model" if has_clip_model(self._model_config) else "off"

    def expand(self, pcolls):
        if isinstance(pcolls, dict):
            curated, rejected = pcolls["curated"], pcolls["rejected"]
        else:
            curated, rejected = pcolls
        p = curated.pipeline
        rows = ((curated | "TagCurated" >> beam.Map(lambda r: ("curated", r)),
                 rejected | "TagRejected" >> beam.Map(lambda r: ("rejected", r)))
                | "AllRows" >> beam.Flatten())
        mode = self._clip_mode()
        side = []
        if mode == "given":
            side = [beam.pvalue.AsSingleton(p | "GivenPrompts" >> beam.Create([self._prompt_embs]))]
        elif mode == "model":
            prompts = self._spec.prompts()
            embs = (p | "GroupPrompts" >> EmbedPromptSets(self._model_config, {"all": prompts})
                    | "ByPrompt" >> beam.Map(lambda d, ps: dict(zip(ps, d["all"])), prompts))
            side = [beam.pvalue.AsSingleton(embs)]
        feats = rows | "Features" >> beam.ParDo(_Features(self._spec, self._cfg), *side)
        counts = (feats | "Keys" >> beam.Map(lambda e: e[0])
                  | "SumCounts" >> beam.CombineGlobally(CounterSumFn()))
        per_domain = (feats | "DomainPairs" >> beam.FlatMap(_domain_pairs)
                      | "CountDomains" >> beam.CombinePerKey(sum))
        top = (per_domain
               | "ByPopulation" >> beam.Map(lambda kv: (kv[0][0], (kv[1], kv[0][1])))
               | "TopDomains" >> beam.combiners.Top.LargestPerKey(self._cfg.top_domains))
        distinct = (per_domain | "DomainPop" >> beam.Map(lambda kv: (kv[0][0], 1))
                    | "DistinctDomains" >> beam.CombinePerKey(sum))
        meta = {"title": self._title, "clip_mode": mode, "sources": self._sources,
                "clip_model": getattr(self._model_config, "clip_model", None) if mode == "model" else
                ("given embeddings" if mode == "given" else None)}
        return (p
                | "Once" >> beam.Create([None])
                | "Write" >> beam.Map(_finish, self._out, self._cfg, self._spec, meta,
                                      beam.pvalue.AsSingleton(counts), beam.pvalue.AsList(top),
                                      beam.pvalue.AsList(distinct)))


def _finish(_, out_dir, cfg, spec, meta, counts, top, distinct) -> dict:
    audit = build_audit(counts, dict(top), dict(distinct), cfg, spec, meta)
    write_outputs(audit, out_dir)
    return audit


# ---------------------------------------------------------------------------------------------
# Assembling audit.json (pure)

def _ratio(n_cur: int, n_cur_total: int, n_in: int, n_in_total: int) -> float | None:
    if not n_in or not n_in_total or not n_cur_total:
        return None
    return (n_cur / n_cur_total) / (n_in / n_in_total)


def _hist(counts: dict, key_prefix: tuple, nbins: int) -> list[int]:
    return [int(counts.get(key_prefix + (i,), 0)) for i in range(nbins)]


def _rebin(counts: dict, key_prefix: tuple, nbins: int, index) -> list[int]:
    """Fine-bin counts under ``key_prefix`` summed into ``nbins`` bins (``index``: fine bin -> bin)."""
    out = [0] * nbins
    n = len(key_prefix)
    for key, v in counts.items():
        if len(key) == n + 1 and key[:n] == key_prefix:
            out[index(key[n])] += int(v)
    return out


def build_audit(counts: dict, top_domains: dict, distinct_domains: dict, cfg: AuditConfig,
                spec: AttributeSpec, meta: dict | None = None) -> dict:
    """audit.json content from the combined counters (see schemas/audit.json)."""
    meta = meta or {}
    c = lambda *k: counts.get(tuple(k), 0)  # noqa: E731
    clip_edges, clip_step, clip_index = clip_bins([k[2] for k in counts if k[0] == "clip" and k[1] == "input"])
    totals = {p: int(c("rows", "caption", p)) for p in POPULATIONS}
    totals_emb = {p: int(c("rows", "caption_or_clip", p)) for p in POPULATIONS}
    bases = ["caption"] + (["caption_or_clip"] if meta.get("clip_mode", "off") != "off" else [])
    langs: dict[str, dict[str, int]] = {p: {} for p in POPULATIONS}
    reasons: dict[str, int] = {}
    for key, n in counts.items():
        if key[0] == "lang":
            langs[key[1]][key[2]] = int(n)
        elif key[0] == "reason":
            reasons[key[1]] = int(n)
    populations = {}
    for p in POPULATIONS:
        populations[p] = {
            "rows": totals[p],
            "rows_with_embedding": totals_emb[p],
            "language": dict(sorted(langs[p].items(), key=lambda kv: (-kv[1], kv[0]))),
            "domains": {"distinct": int(distinct_domains.get(p, 0)),
                        "top": [{"domain": d, "rows": int(n)} for n, d in top_domains.get(p, [])]},
            "size_hist": _hist(counts, ("size", p), len(SIZE_EDGES)),
            "aspect_hist": _hist(counts, ("aspect", p), len(ASPECT_EDGES)),
            "clip_score_hist": _rebin(counts, ("clip", p), len(clip_edges), clip_index),
        }
    attributes, flagged = {}, []
    for a in spec.attributes:
        groups = {}
        for g in a.groups:
            entry: dict[str, Any] = {p: int(c("member", p, a.name, g.name)) for p in POPULATIONS}
            entry["matched_by"] = {v: int(c("via", a.name, g.name, v)) for v in ("caption", "clip", "both")}
            entry["by_basis"] = {}
            flag = None
            for b in bases:
                tot = totals if b == "caption" else totals_emb
                n = {p: int(c("g", b, p, a.name, g.name)) for p in POPULATIONS}
                r = _ratio(n["curated"], tot["curated"], n["input"], tot["input"])
                share_in = n["input"] / tot["input"] if tot["input"] else None
                share_cur = n["curated"] / tot["curated"] if tot["curated"] else None
                eligible = n["input"] >= cfg.min_group_rows
                out_of_band = r is not None and (r < cfg.ratio_low or r > cfg.ratio_high)
                entry["by_basis"][b] = {**n, "share_input": share_in, "share_curated": share_cur,
                                        "representation_ratio": r, "eligible": eligible,
                                        "flagged": bool(eligible and out_of_band)}
                if eligible and out_of_band and flag is None:
                    flag = (b, r, share_in, share_cur, n)
            primary = entry["by_basis"][bases[-1]]
            entry["representation_ratio"] = primary["representation_ratio"]
            entry["flagged"] = flag is not None
            entry["direction"] = None if flag is None else ("under" if flag[1] < 1 else "over")
            entry["clip_score"] = {}
            for p in POPULATIONS:
                n = c("gclip_n", p, a.name, g.name)
                entry["clip_score"][p] = {"rows": int(n), "mean": (c("gclip_sum", p, a.name, g.name) / n) if n else None,
                                          "hist": _rebin(counts, ("gclip", p, a.name, g.name), len(clip_edges),
                                                         clip_index)}
            rr = {k[3]: int(v) for k, v in counts.items() if k[0] == "greason" and k[1] == a.name and k[2] == g.name}
            entry["rejection_reasons"] = dict(sorted(rr.items(), key=lambda kv: (-kv[1], kv[0])))
            groups[g.name] = entry
            if flag is not None:
                b, r, si, sc, n = flag
                flagged.append({"attribute": a.name, "attribute_label": a.label, "group": g.name, "basis": b,
                                "representation_ratio": r, "direction": entry["direction"],
                                "share_input": si, "share_curated": sc, "input_rows": n["input"],
                                "curated_rows": n["curated"], "rejected_rows": n["rejected"],
                                "top_rejection_reasons": list(entry["rejection_reasons"].items())[:3]})
        unassigned = {b: {p: int(c("none", b, p, a.name)) for p in POPULATIONS} for b in bases}
        attributes[a.name] = {"label": a.label, "description": a.description, "groups": groups,
                              "unassigned": unassigned, "cooccur_with": list(a.cooccur_with)}
    cooc: dict[str, dict] = {}
    for key, n in counts.items():
        if key[0] == "co":
            _, p, aa, ga, ab, gb = key
            cell = cooc.setdefault(f"{aa} x {ab}", {}).setdefault(ga, {}).setdefault(gb, {q: 0 for q in POPULATIONS})
            cell[p] = int(n)
    flagged.sort(key=lambda f: abs(math.log(f["representation_ratio"])) if f["representation_ratio"] else 0,
                 reverse=True)
    return {
        "schema_version": 1,
        "title": meta.get("title", "clip-curate bias audit"),
        "sources": meta.get("sources", {}),
        "config": {**asdict(cfg), "attributes_source": spec.source, "clip_mode": meta.get("clip_mode", "off"),
                   "clip_model": meta.get("clip_model"), "bases": bases},
        "bins": {"size": list(SIZE_EDGES), "aspect": list(ASPECT_EDGES), "clip_score": clip_edges,
                 "clip_score_step": clip_step},
        "totals": totals,
        "populations": populations,
        "rejected_by": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "attributes": attributes,
        "cooccurrence": cooc,
        "flagged": flagged,
        "embedding_dim_mismatch_rows": int(c("dim_mismatch")),
    }


def write_outputs(audit: dict, out_dir: str) -> None:
    """Write ``audit.json`` and ``report.html`` into ``out_dir`` (any Beam filesystem)."""
    from apache_beam.io.filesystems import FileSystems

    from clip_curate.audit.report import render_report

    base = out_dir.rstrip("/")
    if "://" not in base:
        import os

        os.makedirs(base, exist_ok=True)
    with FileSystems.create(FileSystems.join(base, "audit.json")) as f:
        f.write(json.dumps(audit, indent=2, sort_keys=False, default=float).encode("utf-8"))
    with FileSystems.create(FileSystems.join(base, "report.html")) as f:
        f.write(render_report(audit).encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# `clip-curate audit`

READ_COLUMNS = ("uid", "url", "caption", "language", "width", "height", "original_width", "original_height",
                "clip_score", "image_embedding", "stage", "reason")


def _parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        names = pq.read_schema(f).names
    return [c for c in READ_COLUMNS if c in names]


def _find_shards(input_dir: str) -> dict[str, str | None]:
    from apache_beam.io.filesystems import FileSystems

    out = {}
    for sub in ("curated", "rejected"):
        pattern = FileSystems.join(input_dir.rstrip("/"), sub, "*.parquet")
        try:
            files = FileSystems.match([pattern])[0].metadata_list
        except Exception:  # noqa: BLE001 - unreadable location
            files = []
        out[sub] = pattern if files else None
        if files:
            out[sub + "_first"] = files[0].path
    return out


def _model_config_from_stats(input_dir: str, clip_model: str | None):
    """The run's ModelConfig (from OUT/stats.json) or one for ``clip_model``; None when unavailable."""
    from apache_beam.io.filesystems import FileSystems

    recorded: dict = {}
    try:
        with FileSystems.open(FileSystems.join(input_dir.rstrip("/"), "stats.json")) as f:
            recorded = json.loads(f.read().decode()).get("config", {}).get("stages", {}).get("embed") or {}
    except Exception:  # noqa: BLE001 - no stats.json: caption terms only unless --clip-model
        recorded = {}
    if clip_model:
        recorded = {**recorded, "clip_model": clip_model}
    if not recorded.get("clip_model"):
        return None
    model = config_from_namespace(ModelConfig, recorded)
    return model if has_clip_model(model) else None


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``clip-curate audit`` (besides Beam options)."""
    parser.add_argument("--input", required=True, help="output directory of a clip-curate run "
                        "(reads OUT/curated/*.parquet and OUT/rejected/*.parquet)")
    parser.add_argument("--output", default=None, help="where to write audit.json and report.html "
                        "(default: INPUT/audit)")
    parser.add_argument("--clip-model", default=None, help="CLIP model for zero-shot group prompts "
                        "(default: the one recorded in INPUT/stats.json; 'none' = caption terms only)")
    add_config_arguments(parser, AuditConfig, "audit")


def run_audit(input_dir: str, output_dir: str | None = None, attributes_path: str | None = None,
              beam_args: Sequence[str] = (), config: AuditConfig | None = None,
              clip_model: str | None = None) -> int:
    """Recompute the audit of an existing output directory; returns 0 on success."""
    from apache_beam.options.pipeline_options import PipelineOptions, TypeOptions

    if not input_dir:
        raise ConfigError("--input: pass the output directory of a clip-curate run")
    cfg = config or AuditConfig()
    if attributes_path is not None:
        cfg = AuditConfig(**{**asdict(cfg), "attributes": attributes_path})
    spec = load_attributes(cfg.attributes)
    shards = _find_shards(input_dir)
    if not shards["curated"] and not shards["rejected"]:
        raise ConfigError(f"--input {input_dir}: no curated/*.parquet or rejected/*.parquet found; "
                          "pass the --output directory of a clip-curate run")
    output_dir = output_dir or _join(input_dir, "audit")
    model_config = _model_config_from_stats(input_dir, clip_model) if cfg.audit_clip is not False else None
    cfg, judgment = cfg.card_judgment(card_for(model_config) if model_config is not None else None)
    log.info("%s", judgment.line)
    if judgment.warning:
        log.warning("%s", judgment.warning)
    if not cfg.audit_clip:
        model_config = None
    options = PipelineOptions(list(beam_args))
    options.view_as(TypeOptions).allow_unsafe_triggers = True  # DirectRunner: FnApiRunner, not Prism
    with beam.Pipeline(options=options) as p:
        pcolls = {}
        for sub in ("curated", "rejected"):
            if shards[sub]:
                cols = _parquet_columns(shards[sub + "_first"])
                pcolls[sub] = p | f"Read{sub.title()}" >> beam.io.ReadFromParquet(shards[sub], columns=cols)
            else:
                pcolls[sub] = p | f"No{sub.title()}" >> beam.Create([])
        pcolls | "Audit" >> BiasAudit(output_dir, cfg, model_config, spec,
                                      sources={"input": input_dir})
    log.info("audit written to %s", output_dir)
    return 0


def _join(base: str, *parts: str) -> str:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.join(base.rstrip("/"), *parts)


#: What the audit writes into its output directory (what ``clip-curate audit --overwrite`` replaces).
AUDIT_FILES = ("audit.json", "report.html")


def build_arg_parser() -> argparse.ArgumentParser:
    """The parser of ``clip-curate audit`` (its own flags; other --flags go to Beam)."""
    parser = OneLineParser(prog="clip-curate audit", allow_abbrev=False,
                           description="(Re)compute the bias audit (audit.json + report.html) of a clip-curate "
                                       "output directory. Other --flags are passed to Apache Beam.")
    add_audit_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace audit.json and report.html already in the audit output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``clip-curate audit --input OUT [--output DIR] [--attributes FILE] [Beam options]``."""

    parser = build_arg_parser()
    ns, beam_args = parser.parse_known_args(list(argv or []))
    validate_beam_args(beam_args)
    cfg = config_from_namespace(AuditConfig, ns)
    out = ns.output or _join(ns.input, "audit")
    from clip_curate.preflight import probe_output
    from clip_curate.writers import claim_output

    probe_output(out, "--output")  # a file, an unwritable directory or parent: one line, exit 2
    claim_output(out, overwrite=ns.overwrite, parts=AUDIT_FILES, command="audit")
    code = run_audit(ns.input, out, None, beam_args, config=cfg, clip_model=ns.clip_model)
    print(f"audit report: {_join(out, 'report.html')}")
    return code
