"""Model cards: which of the run's model judgments a CLIP model is calibrated for.

Four judgments use the CLIP model's scores as if they meant something; a card says, per model, which of
them the model has been calibrated for (and with what threshold):

==================  ==========================================  ===================================
judgment            stage / flag                                threshold field in the card
==================  ==========================================  ===================================
``clip_score``      clip: ``--min-clip-score``                  ``threshold`` (cosine), ``top_fraction``
``nsfw_concept``    safety: ``--nsfw-concept``                  ``threshold`` (``--nsfw-concept-threshold``)
``audit_zero_shot`` audit: ``--audit-clip``                     ``threshold`` (``--zero-shot-min-prob``)
``semantic_dedup``  dedup: ``--dedup semantic``                 ``threshold`` (``--semantic-threshold``)
==================  ==========================================  ===================================

Where cards come from:

* ``synthetic-tiny``: ``clip_curate/data/synthetic-tiny/clip_curate_card.json`` (bundled);
* open_clip pretrained tags: the built-in table :data:`BUILTIN_CARDS` (only calibrations published
  practice supports);
* a ``local-dir:`` checkpoint (or a weights file): an optional ``clip_curate_card.json`` beside the weights;
* anything else (other tags, ``hf-hub:`` repos, random weights): an empty card, calibrated for nothing.

A judgment the card does not cover is off unless the user turns it on (then it runs with a warning);
each stage decides its own judgment from the card with a pure ``card_judgment`` function, and
``config.resolve_judgments`` collects them before the pipeline is built.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from clip_curate.fields import ConfigError

CARD_FILE = "clip_curate_card.json"

#: judgment -> how lines and warnings name it
JUDGMENTS: dict[str, str] = {
    "clip_score": "clip-score filter",
    "nsfw_concept": "nsfw concept check",
    "audit_zero_shot": "audit zero-shot attributes",
    "semantic_dedup": "semantic dedup",
}


@dataclass(frozen=True)
class Calibration:
    """One judgment of a card: calibrated or not, its threshold (the flag's value) and where it comes from."""

    calibrated: bool = False
    threshold: float | None = None
    top_fraction: float | None = None
    source: str = ""


@dataclass(frozen=True)
class ModelCard:
    """What a model is calibrated for. ``model`` names it in lines and warnings
    (``synthetic-tiny``, ``ViT-B-32 laion2b_s34b_b79k``); ``origin`` says where the card came from."""

    model: str
    judgments: Mapping[str, Calibration] = field(default_factory=dict)
    origin: str = "none"
    notes: str = ""

    def covers(self, judgment: str) -> bool:
        return self.judgments.get(judgment, Calibration()).calibrated

    def threshold(self, judgment: str) -> float | None:
        cal = self.judgments.get(judgment)
        return cal.threshold if cal is not None and cal.calibrated else None

    def top_fraction(self, judgment: str) -> float | None:
        cal = self.judgments.get(judgment)
        return cal.top_fraction if cal is not None and cal.calibrated else None

    def not_calibrated(self, what: str = "it") -> str:
        """``synthetic-tiny is not calibrated for it`` (``... has no model card`` when there is none)."""
        if self.origin == "none":
            return f"{self.model} has no model card, so it is not calibrated for {what}"
        return f"{self.model} is not calibrated for {what}"

    def as_dict(self) -> dict[str, Any]:
        """The card as recorded in stats.json."""
        return {"model": self.model, "origin": self.origin,
                "calibrated": {k: _cal_dict(v) for k, v in sorted(self.judgments.items()) if v.calibrated}}


def _cal_dict(cal: Calibration) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cal.threshold is not None:
        out["threshold"] = cal.threshold
    if cal.top_fraction is not None:
        out["top_fraction"] = cal.top_fraction
    if cal.source:
        out["source"] = cal.source
    return out


@dataclass(frozen=True)
class Judgment:
    """What a stage decided from the card: one line for the summary and stats.json, and a warning to log
    when the user turned on a judgment the card does not cover."""

    line: str
    warning: str | None = None


# ---------------------------------------------------------------------------------------------
# The built-in table (open_clip pretrained tags)

_LAION_028 = Calibration(True, 0.28, source="LAION-5B's English subset kept pairs with OpenAI ViT-B/32 "
                                            "CLIP score >= 0.28 (LAION-400M used 0.3)")
_DATACOMP_L14 = Calibration(True, None, 0.3, source="DataComp's CLIP-score baseline keeps the top 30 % of "
                                                    "pairs by OpenAI ViT-L/14 score")
_OTHER_SCALE = ("not calibrated: published CLIP-score thresholds were measured with OpenAI weights; other "
                "weights put scores on another scale")


def _card(arch: str, tag: str, clip_score: Calibration | None = None) -> ModelCard:
    clip = clip_score or Calibration(False, source=_OTHER_SCALE)
    return ModelCard(f"{arch} {tag}", {"clip_score": clip, "nsfw_concept": Calibration(),
                                       "audit_zero_shot": Calibration(), "semantic_dedup": Calibration()},
                     origin="built-in")


#: (architecture, pretrained tag) -> card. Only ``clip_score`` has published calibrations: concept
#: prompts, zero-shot attribute prompts and semantic-dedup thresholds are not calibrated for any of them.
BUILTIN_CARDS: dict[tuple[str, str], ModelCard] = {
    ("ViT-B-32", "openai"): _card("ViT-B-32", "openai", _LAION_028),
    ("ViT-B-32", "laion2b_s34b_b79k"): _card("ViT-B-32", "laion2b_s34b_b79k"),
    ("ViT-B-32", "laion400m_e32"): _card("ViT-B-32", "laion400m_e32"),
    ("ViT-B-32", "datacomp_xl_s13b_b90k"): _card("ViT-B-32", "datacomp_xl_s13b_b90k"),
    ("ViT-B-16", "openai"): _card("ViT-B-16", "openai"),
    ("ViT-B-16", "laion2b_s34b_b88k"): _card("ViT-B-16", "laion2b_s34b_b88k"),
    ("ViT-B-16", "laion400m_e32"): _card("ViT-B-16", "laion400m_e32"),
    ("ViT-B-16", "datacomp_xl_s13b_b90k"): _card("ViT-B-16", "datacomp_xl_s13b_b90k"),
    ("ViT-L-14", "openai"): _card("ViT-L-14", "openai", _DATACOMP_L14),
    ("ViT-L-14", "laion2b_s32b_b82k"): _card("ViT-L-14", "laion2b_s32b_b82k"),
    ("ViT-L-14", "datacomp_xl_s13b_b90k"): _card("ViT-L-14", "datacomp_xl_s13b_b90k"),
}


# ---------------------------------------------------------------------------------------------
# Card files (synthetic-tiny's, and optional ones beside local-dir: weights)

def _number(value: Any, where: str, lo: float, hi: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise ConfigError(f"{where}: expected a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def parse_card(data: Any, source: str, default_model: str) -> ModelCard:
    """Validate a loaded ``clip_curate_card.json``: ``{"model": ..., "notes": ..., "judgments":
    {judgment: {"calibrated": bool, "threshold": x, "top_fraction": f, "source": "..."}}}``."""
    if not isinstance(data, dict) or not isinstance(data.get("judgments", {}), dict):
        raise ConfigError(f"model card {source}: expected an object with a 'judgments' object "
                          f"({', '.join(JUDGMENTS)})")
    extra = set(data) - {"model", "notes", "judgments"}
    if extra:
        raise ConfigError(f"model card {source}: unknown key(s) {', '.join(sorted(map(str, extra)))}; "
                          "allowed: model, notes, judgments")
    judgments: dict[str, Calibration] = {}
    for name, body in data.get("judgments", {}).items():
        where = f"model card {source}: judgments.{name}"
        if name not in JUDGMENTS:
            raise ConfigError(f"model card {source}: unknown judgment {name!r}; choose from {', '.join(JUDGMENTS)}")
        if not isinstance(body, dict) or set(body) - {"calibrated", "threshold", "top_fraction", "source"}:
            raise ConfigError(f"{where}: expected an object with calibrated (true/false) and optional "
                              "threshold, top_fraction, source")
        if not isinstance(body.get("calibrated"), bool):
            raise ConfigError(f"{where}.calibrated: expected true or false")
        lo = -1.0 if name == "clip_score" else 0.0
        judgments[name] = Calibration(
            body["calibrated"], _number(body.get("threshold"), f"{where}.threshold", lo, 1.0),
            _number(body.get("top_fraction"), f"{where}.top_fraction", 0.0, 1.0) if name == "clip_score" else None,
            str(body.get("source") or ""))
    return ModelCard(str(data.get("model") or default_model), judgments, origin=source,
                     notes=str(data.get("notes") or ""))


def load_card_file(path: str | os.PathLike, default_model: str) -> ModelCard:
    """The card in ``path`` (a ``clip_curate_card.json``); ConfigError naming the file when it is bad."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model card {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ConfigError(f"model card {path}: cannot read it ({exc.strerror})") from None
    return parse_card(data, str(path), default_model)


def empty_card(model: str, origin: str = "none") -> ModelCard:
    """A card calibrated for nothing."""
    return ModelCard(model, {}, origin=origin)


def card_for(model_config: Any) -> ModelCard:
    """The card of the run's model (see the module docstring). Raises ConfigError for an unknown model
    or a bad card file."""
    from clip_curate.models.clip import SYNTHETIC_TINY, describe_model, resolve_model

    spec = resolve_model(model_config)
    name = describe_model(model_config)
    if spec.kind == "synthetic":
        return dataclasses.replace(load_card_file(Path(spec.name) / CARD_FILE, SYNTHETIC_TINY), origin="bundled")
    if spec.kind == "dir":
        for d in dict.fromkeys((Path(spec.name), Path(spec.weights).parent)):
            if (d / CARD_FILE).is_file():
                return load_card_file(d / CARD_FILE, name)
        return empty_card(name)
    if spec.kind == "arch" and spec.weights:
        beside = Path(spec.weights).parent / CARD_FILE
        return load_card_file(beside, name) if beside.is_file() else empty_card(name)
    if spec.kind == "arch" and spec.pretrained:
        return BUILTIN_CARDS.get((spec.name, spec.pretrained)) or empty_card(name)
    if spec.kind in ("arch", "test"):
        return empty_card(name, origin="random weights")
    return empty_card(name)
