"""Beam side of the shared dedup rule: deciding one key's bucket, and earlier outputs' rows as members.

Rows of earlier runs into the same output (``--resume``, ``--chunk-rows`` passes) join the keys with a
rank better than every row of this run; they drop rows of this run but are never dropped themselves
(their decisions are discarded), so earlier output stays as written.
"""
from __future__ import annotations

import math

import apache_beam as beam

from clip_curate.records import METRICS_NAMESPACE as NS
from clip_curate.stages.dedup.core import bucket_decisions

PRIOR_SCORE = -math.inf  # rank of an earlier run's row: better than any row of this run


def is_prior(rank) -> bool:
    return rank[0] == PRIOR_SCORE


def decide_bucket(kv, kind: str, threshold: float, max_group: int = 0):
    """``(key, members)`` -> ``(uid, decision)`` for each member of this run the rule drops."""
    key, members = kv
    members = list(members)
    if max_group and len(members) > max_group:
        beam.metrics.Metrics.counter(NS, f"dedup_{kind}_groups_over_max").inc()
    beam.metrics.Metrics.distribution(NS, f"dedup_{kind}_group_size").update(len(members))
    prior = {m[0] for m in members if is_prior(m[1])}
    for uid, decision in bucket_decisions(members, kind, threshold):
        if uid not in prior:  # rows of earlier runs are final: they only drop, never get dropped
            yield uid, decision
