"""Dedup kind ``exact``: the same normalised URL or the same image bytes (sha256); with
``--dedup-caption-pairs`` the same (image, caption) or (URL, caption) pair."""
from __future__ import annotations

from typing import Iterator

import apache_beam as beam
import numpy as np

from clip_curate.stages.dedup.core import DedupKind, KindInputs, register_kind
from clip_curate.stages.dedup.rule import decide_bucket


def _exact_keyed(m: dict, pairs: bool) -> Iterator[tuple]:
    member = (m["uid"], m["rank"], None)
    if m["url"]:
        yield (("url", m["url"], m["caption"]) if pairs else ("url", m["url"])), member
    if m["sha"]:
        yield (("sha", m["sha"], m["caption"]) if pairs else ("sha", m["sha"])), member


def _every_later_member(payloads, threshold) -> np.ndarray:
    """Members of one exact key are all copies: each is dropped by the best-ranked one."""
    found = np.zeros(len(payloads), dtype=np.int64)
    found[0] = -1
    return found


def _decisions(inp: KindInputs):
    return (inp.members
            | "ExactKeys" >> beam.FlatMap(_exact_keyed, inp.config.dedup_caption_pairs)
            | "ExactGroup" >> beam.GroupByKey()
            | "ExactDecide" >> beam.FlatMap(decide_bucket, "exact", 0))


register_kind(DedupKind("exact", "duplicate_exact", priority=10, decisions=_decisions,
                        active=lambda cfg: "exact" in cfg.dedup, best_dropper=_every_later_member))
