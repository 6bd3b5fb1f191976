"""Dedup kind ``near``: perceptual-hash near duplicates (re-encodes, resizes, colour shifts).

Keys: the pHash split into bands (LSH): two hashes within Hamming distance h share at least one band
when the 64 bits are cut into h + 1 bands. Within a band bucket, :func:`near_best_dropper` finds each
member's best-ranked member within distance h.
"""
from __future__ import annotations

from typing import Sequence

import apache_beam as beam
import numpy as np

from clip_curate.records import METRICS_NAMESPACE as NS
from clip_curate.stages.dedup.core import DedupKind, KindInputs, register_kind
from clip_curate.stages.dedup.rule import decide_bucket


def band_masks(hamming: int, bits: Sequence[int] = tuple(range(64))) -> list[int]:
    """Split ``bits`` into ``hamming + 1`` contiguous bands (as 64-bit masks).

    Pigeonhole: two hashes that differ in at most ``hamming`` of these bits agree exactly on at least
    one band, so they meet under that band's key.
    """
    n = hamming + 1
    bits = list(bits)
    masks, start = [], 0
    for b in range(n):
        width = len(bits) // n + (1 if b < len(bits) % n else 0)
        m = 0
        for pos in bits[start:start + width]:
            m |= 1 << pos
        masks.append(m)
        start += width
    return masks


def band_keys(phash: int, hamming: int) -> list[tuple[int, int]]:
    """LSH keys ``(band, value)`` of one 64-bit hash for threshold ``hamming`` (``hamming + 1`` keys)."""
    return [(b, phash & m) for b, m in enumerate(band_masks(hamming))]


def popcount64(x: np.ndarray) -> np.ndarray:
    """Bit count of uint64 values."""
    return np.bitwise_count(np.asarray(x, dtype=np.uint64)).astype(np.int64)


_LEAF = 48     # near: groups this small are compared pair by pair in one vectorised pass
_BRUTE = 1024  # near: below this many distinct hashes a group is compared all-pairs (cheaper than splitting)


def near_best_dropper(hashes: np.ndarray, hamming: int) -> np.ndarray:
    """For hashes in rank order: index of the best-ranked earlier hash within ``hamming``, or -1.

    Exact (same answer as comparing all pairs) but fast: identical hashes collapse onto their best
    member, and large groups are split again by the pigeonhole principle on the bits not yet shared
    (recursively), so only pairs that can be within ``hamming`` are compared.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    best = np.full(n, n, dtype=np.int64)
    if n < 2:
        return np.full(n, -1, dtype=np.int64)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    reps = np.sort(first)
    if len(reps) > 1:
        _near_recurse(reps, hashes, hamming, tuple(range(64)), best)
    rep_of = first[inverse.reshape(-1)]
    others = np.nonzero(rep_of != np.arange(n))[0]
    rep_best = best[rep_of[others]]
    best[others] = np.where(rep_best < n, rep_best, rep_of[others])
    best[best == n] = -1
    return best


def _near_brute(idx: np.ndarray, hashes: np.ndarray, hamming: int, best: np.ndarray, block: int = 2048) -> None:
    h = hashes[idx]
    m = len(idx)
    for i0 in range(1, m, block):
        i1 = min(i0 + block, m)
        found = np.full(i1 - i0, -1, dtype=np.int64)
        for j0 in range(0, i1, block):
            j1 = min(j0 + block, i1)
            open_rows = np.nonzero(found < 0)[0]
            if not len(open_rows):
                break
            close = popcount64(h[i0 + open_rows, None] ^ h[None, j0:j1]) <= hamming
            close &= (np.arange(j0, j1)[None, :] < (i0 + open_rows)[:, None])
            hit = close.any(axis=1)
            found[open_rows[hit]] = j0 + np.argmax(close[hit], axis=1)
        rows = np.nonzero(found >= 0)[0]
        tgt = idx[i0 + rows]
        best[tgt] = np.minimum(best[tgt], idx[found[rows]])


def _near_pairs(idx: np.ndarray, hashes: np.ndarray, hamming: int, best: np.ndarray, order: np.ndarray,
                gid: np.ndarray, sizes: np.ndarray, small: np.ndarray) -> None:
    """Compare all pairs inside the groups flagged ``small`` at once (``order`` sorts members by ``gid``)."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    pos = np.nonzero(small[gid])[0]                    # sorted positions of members of small groups
    partners = starts[gid[pos] + 1] - 1 - pos           # later members of the same group
    keep = partners > 0
    pos, partners = pos[keep], partners[keep]
    if not len(pos):
        return
    a = np.repeat(pos, partners)
    offsets = np.arange(len(a)) - np.repeat(np.cumsum(partners) - partners, partners) + 1
    a, b = idx[order[a]], idx[order[a + offsets]]
    close = popcount64(hashes[a] ^ hashes[b]) <= hamming
    if close.any():
        np.minimum.at(best, np.maximum(a[close], b[close]), np.minimum(a[close], b[close]))


def _near_recurse(idx: np.ndarray, hashes: np.ndarray, hamming: int, bits: tuple[int, ...],
                  best: np.ndarray) -> None:
    """``idx`` (ascending = rank order) agree on every bit outside ``bits``; mark close pairs."""
    m = len(idx)
    if m < 2:
        return
    if m <= _BRUTE or len(bits) <= hamming + 1:
        _near_brute(idx, hashes, hamming, best)
        return
    n_bands = hamming + 1
    plans, cost = [], 0
    h = hashes[idx]
    for b, mask in enumerate(band_masks(hamming, bits)):
        values = h & np.uint64(mask)
        order = np.argsort(values, kind="stable")
        sv = values[order]
        gid = np.concatenate([[0], np.cumsum(sv[1:] != sv[:-1])])
        sizes = np.bincount(gid)
        cost += int((sizes.astype(np.int64) ** 2).sum())
        width = len(bits) // n_bands + (1 if b < len(bits) % n_bands else 0)
        start = b * (len(bits) // n_bands) + min(b, len(bits) % n_bands)
        plans.append((order, gid, sizes, bits[:start] + bits[start + width:]))
    if cost * 1.5 >= m * m:  # splitting does not pay: compare directly
        _near_brute(idx, hashes, hamming, best)
        return
    for order, gid, sizes, rest in plans:
        small = (sizes > 1) & (sizes <= _LEAF)
        if small.any():
            _near_pairs(idx, hashes, hamming, best, order, gid, sizes, small)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for g in np.nonzero(sizes > _LEAF)[0]:  # members of group g are contiguous in ``order``
            members = order[starts[g]:starts[g + 1]]
            _near_recurse(idx[np.sort(members)], hashes, hamming, rest, best)


class _NearKeys(beam.DoFn):
    def __init__(self, hamming: int):
        self._h = hamming
        self._missing = beam.metrics.Metrics.counter(NS, "dedup_near_no_phash")

    def setup(self):
        self._masks = band_masks(self._h)

    def process(self, m):
        if m["phash"] is None:
            self._missing.inc()
            return
        member = (m["uid"], m["rank"], m["phash"])
        for b, mask in enumerate(self._masks):
            yield (b, m["phash"] & mask), member


def _decisions(inp: KindInputs):
    h = inp.config.near_dup_hamming
    return (inp.members
            | "NearKeys" >> beam.ParDo(_NearKeys(h))
            | "NearGroup" >> beam.GroupByKey()
            | "NearDecide" >> beam.FlatMap(decide_bucket, "near", h))


register_kind(DedupKind(
    "near", "duplicate_near", priority=20, decisions=_decisions, active=lambda cfg: "near" in cfg.dedup,
    best_dropper=lambda payloads, h: near_best_dropper(np.array(payloads, dtype=np.uint64), int(h))))
