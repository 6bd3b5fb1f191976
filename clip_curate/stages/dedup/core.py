"""Pure core of dedup (no Beam): the rank, the shared per-bucket rule, and the registry of dedup kinds.

Everything here is deterministic: the same members give the same decisions whatever their order.
A bucket's members are sorted by :func:`rank_key` first; "drop x" means some member ranked before x is
within the threshold, and the dropper reported for x is the best-ranked such member.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np


Rank = tuple  # (-clip_score, -pixels, uid): smaller is better
Member = tuple  # (uid, rank, payload): payload None (exact), int pHash (near) or float32 vector (semantic)


# ---------------------------------------------------------------------------------------------
# The registry of dedup kinds (each kind is one module of this package)

@dataclass(frozen=True)
class DedupKind:
    """One way rows are found to be copies.

    ``name``: the ``--dedup`` value that turns it on (None: turned on by its own flag, e.g.
    ``--decontaminate``). ``reason``: its rejection reason. ``priority``: when a row is dropped for several
    reasons the smallest is reported. ``best_dropper(payloads_sorted_by_rank, threshold)``: for kinds decided
    per shared key, the index of the best-ranked member within the threshold of each member (-1: none).
    ``active(cfg)``: whether the DedupConfig turns it on. ``prepare(cfg)``: load what it needs when the
    stage is built (a bad path fails then, as a ConfigError). ``decisions(inputs)``: the Beam wiring, a
    :class:`KindInputs` -> PCollection of ``(uid, (reason, dropper_or_detail, dropper_rank))``."""

    name: Optional[str]
    reason: str
    priority: int
    decisions: Callable[["KindInputs"], Any]
    active: Callable[[Any], bool]
    best_dropper: Optional[Callable[[Sequence[Any], float], np.ndarray]] = None
    prepare: Callable[[Any], Any] = lambda cfg: None


@dataclass(frozen=True)
class KindInputs:
    """What a kind's Beam wiring gets: ``members`` (compact rows of this run plus earlier outputs' rows),
    ``compact`` (this run's only), the stage config, the seed and what ``prepare`` returned."""

    members: Any
    compact: Any
    config: Any
    seed: int
    state: Any
    label: str


_KINDS: dict[str, DedupKind] = {}


def register_kind(kind: DedupKind) -> DedupKind:
    _KINDS[kind.reason] = kind
    return kind


def kinds() -> tuple[DedupKind, ...]:
    """Registered kinds in report priority order (importing ``clip_curate.stages.dedup`` registers them)."""
    return tuple(sorted(_KINDS.values(), key=lambda k: k.priority))


def kind_names() -> tuple[str, ...]:
    """The ``--dedup`` values."""
    return tuple(k.name for k in kinds() if k.name)


def kind_named(name: str) -> DedupKind:
    for k in kinds():
        if k.name == name:
            return k
    raise ValueError(f"unknown dedup kind {name!r}")


def priority() -> tuple[str, ...]:
    """Reasons in report order: a row dropped for several reasons reports the first."""
    return tuple(k.reason for k in kinds())


# ---------------------------------------------------------------------------------------------
# Rank and keys

def rank_key(row: dict[str, Any]) -> Rank:
    """Smaller is better: higher ``clip_score`` (missing ranks last), then more pixels, then smaller uid.

    Pixels are ``original_width × original_height`` when known (the larger source image wins even when
    both were resized to the same size), else ``width × height``.
    """
    score = row.get("clip_score")
    try:
        score = -float(score) if score is not None and not math.isnan(float(score)) else math.inf
    except (TypeError, ValueError):
        score = math.inf
    w = row.get("original_width") or row.get("width") or 0
    h = row.get("original_height") or row.get("height") or 0
    return (score, -int(w) * int(h), str(row["uid"]))


def normalize_url(url: str | None) -> str | None:
    """Lower-case scheme and host, drop default ports and the fragment (paths and queries are kept)."""
    if not url:
        return None
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return url.strip()
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if port in (None, 80 if scheme == "http" else None, 443 if scheme == "https" else None):
        port = None
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def normalize_caption(caption: str | None) -> str:
    return re.sub(r"\s+", " ", (caption or "").strip().lower())


def phash_int(phash: Any) -> int | None:
    """16 hex chars -> int; None for a missing or malformed hash."""
    if phash is None or phash == "":
        return None
    try:
        value = int(str(phash), 16)
    except ValueError:
        return None
    return value if 0 <= value < 1 << 64 else None



# ---------------------------------------------------------------------------------------------
# Per-bucket decisions (the shared rule)

def bucket_decisions(members: Sequence[Member], kind: str, threshold: float) -> Iterator[tuple[str, tuple]]:
    """One shared key's members -> ``(uid, (reason, dropper_uid, dropper_rank))`` per dropped member.

    ``kind`` is a ``--dedup`` name; ``threshold``: Hamming distance for ``near``, cosine for ``semantic``,
    ignored for ``exact``.
    The same uid twice (the same url and caption) is compared once.
    """
    uniq: dict[str, Member] = {}
    for m in members:
        if m[0] not in uniq or m[1] < uniq[m[0]][1]:
            uniq[m[0]] = m
    if len(uniq) < 2:
        return
    ms = sorted(uniq.values(), key=lambda m: m[1])
    spec = kind_named(kind)
    reason = spec.reason
    found = spec.best_dropper([m[2] for m in ms], threshold)
    for i in np.nonzero(found >= 0)[0]:
        y = ms[int(found[i])]
        yield ms[i][0], (reason, y[0], y[1])
