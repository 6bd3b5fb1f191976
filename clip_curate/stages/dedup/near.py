"""Dedup kind ``near``: copies of one picture — re-encodes, resizes, brightness and colour shifts (pHash),
and crops of up to ~10 % per side and small rotations (ORB keypoints). Two paths, one reason
(``duplicate_near``), the same rule: a row is dropped when a better-ranked row sharing one of its keys is
within the threshold.

pHash path. Keys: the pHash split into bands (LSH): two hashes within Hamming distance h share at least one
band when the 64 bits are cut into h + 1 bands. Within a band bucket, :func:`near_best_dropper` finds each
member's best-ranked member within distance h.

Keypoint path (rows with ``orb_keypoints``, computed by the image stage). Keys: each keypoint's 64-bit code
cut into :data:`LOCAL_BANDS` 16-bit bands; a keypoint is keyed under each ``(band, value)``. Within a bucket,
keypoints whose whole codes are within :data:`LOCAL_CODE_HAMMING` bits become correspondences between the
worse-ranked row and (at most :data:`LOCAL_CANDIDATES` of) the better-ranked rows
(:func:`bucket_correspondences`); each bucket sends one element per worse row, all of a row's elements meet
under its uid, and each of its row pairs is checked on its correspondences from every bucket
(:func:`verify_row`, :func:`match_keypoints`): "within the threshold" means at least :data:`LOCAL_MIN_INLIERS` keypoints on
each side agree with one similarity transform (scale 1/1.6..1.6, rotation <= 6 degrees, to 1.5 % of the
shorter side), and the two frames, aligned by it, overlap by at least :data:`LOCAL_MIN_IOU` of their union
(a crop keeping >= 64 % of the picture is a copy; another region of the same photo, or two halves of a
panorama, are different pictures).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np

from clip_curate.records import METRICS_NAMESPACE as NS
from clip_curate.stages.dedup.core import DedupKind, KindInputs, register_kind
from clip_curate.stages.dedup.rule import decide_bucket, is_prior
from clip_curate.stages.image import unpack_orb_keypoints


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


# ---------------------------------------------------------------------------------------------
# Keypoint path: crops and small rotations

LOCAL_BANDS = 4            # 16-bit bands of a keypoint's 64-bit code; a keypoint is keyed under each
LOCAL_CODE_HAMMING = 16    # codes within this many bits (of 64) make a correspondence
LOCAL_CANDIDATES = 8       # per keypoint and bucket: correspondences to the closest better-ranked rows only
LOCAL_MAX_BUCKET = 4096    # a bigger bucket is split by the next band (bounded work; counted)
LOCAL_MAX_CORRESPONDENCES = 256  # per row pair (the closest codes are kept)
LOCAL_HYPOTHESES_FROM = 48  # transforms are proposed by pairs among the closest correspondences
LOCAL_MIN_INLIERS = 7      # keypoints on each side that one similarity transform maps onto each other
LOCAL_TOLERANCE = 0.015    # of the shorter side (3.8 px at the 256 px working size)
LOCAL_MAX_SCALE = 1.6      # relative scale of the two frames (both are normalised to their shorter side)
LOCAL_MAX_ROTATION = 6.0   # degrees
LOCAL_MIN_IOU = 0.4        # overlap / union of the two aligned frames
_BAND_MASK = np.uint64(0xFFFF)


def local_keys(codes: np.ndarray) -> Iterator[tuple[tuple[int, int], int]]:
    """``((band, value), keypoint index)`` for every keypoint and band."""
    codes = np.asarray(codes, dtype=np.uint64)
    for b in range(LOCAL_BANDS):
        values = ((codes >> np.uint64(16 * b)) & _BAND_MASK).tolist()
        for i, v in enumerate(values):
            yield (b, v), i


def bucket_correspondences(band: int, members: Sequence[tuple], split_counter=None, depth: int = 0
                           ) -> Iterator[tuple]:
    """One keypoint bucket -> ``((worse_uid, better_uid), (worse_rank, better_rank, worse_frame,
    better_frame, (code_distance, i, xi, yi, j, xj, yj)))`` for each keypoint i of a row and its closest
    better-ranked keypoints j of other rows (codes within :data:`LOCAL_CODE_HAMMING`, at most
    :data:`LOCAL_CANDIDATES`). Members are ``(rank, i, x, y, code, frame)``; rows of earlier runs are never
    the worse row (they are final). A bucket over :data:`LOCAL_MAX_BUCKET` members is split by the next
    band's value (its rows must then share two bands)."""
    ms = sorted(members, key=lambda m: (m[0], m[1]))
    if len(ms) < 2:
        return
    if len(ms) > LOCAL_MAX_BUCKET and depth < LOCAL_BANDS - 1:
        if split_counter is not None:
            split_counter.inc()
        shift = np.uint64(16 * ((band + depth + 1) % LOCAL_BANDS))
        subs: dict[int, list] = {}
        for m in ms:
            subs.setdefault(int((np.uint64(m[4]) >> shift) & _BAND_MASK), []).append(m)
        for sub in subs.values():
            yield from bucket_correspondences(band, sub, split_counter, depth + 1)
        return
    uids = [m[0][2] for m in ms]
    if len(ms) <= 32:  # most buckets: plain Python beats numpy's per-call overhead
        for i in range(1, len(ms)):
            x = ms[i]
            if is_prior(x[0]):
                continue
            found = sorted((d, j) for j in range(i) if uids[j] != uids[i]
                           for d in ((x[4] ^ ms[j][4]).bit_count(),) if d <= LOCAL_CODE_HAMMING)
            for d, j in found[:LOCAL_CANDIDATES]:
                y = ms[j]
                yield (uids[i], uids[j]), (x[0], y[0], x[5], y[5], (d, x[1], x[2], x[3], y[1], y[2], y[3]))
        return
    codes = np.array([m[4] for m in ms], dtype=np.uint64)
    index: dict[str, int] = {}
    uid_ids = np.array([index.setdefault(u, len(index)) for u in uids])
    n = len(ms)
    block = 512
    for i0 in range(1, n, block):
        i1 = min(i0 + block, n)
        dist = np.bitwise_count(codes[i0:i1, None] ^ codes[None, :i1]).astype(np.int16)
        rows = np.arange(i0, i1)
        ok = (np.arange(i1)[None, :] < rows[:, None]) & (dist <= LOCAL_CODE_HAMMING)
        ok &= uid_ids[None, :i1] != uid_ids[rows, None]
        for r in np.nonzero(ok.any(axis=1))[0]:
            i = i0 + int(r)
            x = ms[i]
            if is_prior(x[0]):
                continue
            cand = np.nonzero(ok[r])[0]
            cand = cand[np.lexsort((cand, dist[r, cand]))][:LOCAL_CANDIDATES]
            for j in cand.tolist():
                y = ms[j]
                yield (uids[i], uids[j]), (x[0], y[0], x[5], y[5],
                                           (int(dist[r, j]), x[1], x[2], x[3], y[1], y[2], y[3]))


def _similarities(p: np.ndarray, q: np.ndarray, ki: np.ndarray, kj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Similarity transforms ``z -> a z + b`` (complex) through every two of the first
    :data:`LOCAL_HYPOTHESES_FROM` correspondences with distinct, not too close keypoints, within the scale and
    rotation bounds."""
    idx_i, idx_j = np.triu_indices(min(len(p), LOCAL_HYPOTHESES_FROM), 1)
    dp = p[idx_j] - p[idx_i]
    ok = (np.abs(dp) >= 0.05) & (ki[idx_i] != ki[idx_j]) & (kj[idx_i] != kj[idx_j])
    idx_i, idx_j, dp = idx_i[ok], idx_j[ok], dp[ok]
    a = (q[idx_j] - q[idx_i]) / dp
    scale = np.abs(a)
    ok = (scale >= 1 / LOCAL_MAX_SCALE) & (scale <= LOCAL_MAX_SCALE) & \
        (np.abs(np.angle(a, deg=True)) <= LOCAL_MAX_ROTATION)
    a = a[ok]
    return a, q[idx_i[ok]] - a * p[idx_i[ok]]


def _clip_area(poly: list[complex], width: float, height: float) -> float:
    """Area of a convex polygon (complex vertices) clipped to the rectangle [0, width] x [0, height]."""
    def clip(pts, inside, cross):
        out = []
        for k in range(len(pts)):
            cur, prev = pts[k], pts[k - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(cross(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(cross(prev, cur))
        return out

    def at_x(x0):
        return lambda s, e: complex(x0, s.imag + (e.imag - s.imag) * (x0 - s.real) / (e.real - s.real))

    def at_y(y0):
        return lambda s, e: complex(s.real + (e.real - s.real) * (y0 - s.imag) / (e.imag - s.imag), y0)

    pts = list(poly)
    for inside, cross in ((lambda z: z.real >= 0, at_x(0.0)), (lambda z: z.real <= width, at_x(width)),
                          (lambda z: z.imag >= 0, at_y(0.0)), (lambda z: z.imag <= height, at_y(height))):
        pts = clip(pts, inside, cross)
        if not pts:
            return 0.0
    return 0.5 * abs(sum((pts[k - 1].real * pts[k].imag - pts[k].real * pts[k - 1].imag) for k in range(len(pts))))


def match_keypoints(corr: Iterable[tuple], frame_x: tuple[float, float], frame_y: tuple[float, float],
                    min_inliers: int = 2) -> tuple[int, float]:
    """Correspondences ``(code_distance, i, xi, yi, j, xj, yj)`` between rows x and y -> ``(inliers, iou)``.

    ``inliers``: the most keypoints (counted once on each side, the smaller side) that one similarity
    transform x -> y maps to within :data:`LOCAL_TOLERANCE`; ``iou``: the overlap of x's frame mapped by that
    transform with y's frame, over their union. Deterministic: every two of the closest correspondences (by code
    distance, then keypoint) propose a transform, and every correspondence votes.
    Pairs with fewer than ``min_inliers`` distinct keypoints on a side return ``(0, 0.0)`` at once.
    """
    corr = sorted(set(corr))[:LOCAL_MAX_CORRESPONDENCES]
    if min(len({t[1] for t in corr}), len({t[4] for t in corr})) < min_inliers:
        return 0, 0.0  # too few distinct keypoints to ever reach the threshold: most pairs stop here
    c = np.array(corr, dtype=np.float64)
    ki, kj = c[:, 1].astype(np.int64), c[:, 4].astype(np.int64)
    p, q = c[:, 2] + 1j * c[:, 3], c[:, 5] + 1j * c[:, 6]
    a, b = _similarities(p, q, ki, kj)
    if not len(a):
        return 0, 0.0
    counts = (np.abs(a[:, None] * p[None] + b[:, None] - q[None]) <= LOCAL_TOLERANCE).sum(axis=1)
    best, best_h = 0, -1
    for h in np.lexsort((np.arange(len(counts)), -counts))[:16].tolist():
        if counts[h] <= best:
            break
        hit = np.abs(a[h] * p + b[h] - q) <= LOCAL_TOLERANCE
        n = min(len(set(ki[hit].tolist())), len(set(kj[hit].tolist())))
        if n > best:
            best, best_h = n, h
    if best_h < 0:
        return 0, 0.0
    ah, bh = a[best_h], b[best_h]
    wx, hx = frame_x
    corners = [ah * z + bh for z in (0j, complex(wx, 0), complex(wx, hx), complex(0, hx))]
    inter = _clip_area(corners, frame_y[0], frame_y[1])
    union = abs(ah) ** 2 * wx * hx + frame_y[0] * frame_y[1] - inter
    return best, (inter / union if union > 0 else 0.0)


def is_keypoint_copy(inliers: int, iou: float) -> bool:
    """The keypoint path's threshold."""
    return inliers >= LOCAL_MIN_INLIERS and iou >= LOCAL_MIN_IOU


class _LocalKeys(beam.DoFn):
    def __init__(self):
        self._missing = beam.metrics.Metrics.counter(NS, "dedup_near_no_keypoints")

    def process(self, m):
        sig = unpack_orb_keypoints(m.get("orb"))
        if sig is None:
            self._missing.inc()
            return
        frame, xy, codes = sig
        pts = xy.tolist()
        codes_list = codes.tolist()
        for key, i in local_keys(codes):
            yield key, (m["rank"], i, pts[i][0], pts[i][1], codes_list[i], frame)


class _LocalMatch(beam.DoFn):
    """One bucket -> ``(x_uid, (x_frame, [(y_uid, y_rank, y_frame, correspondence), ...]))`` per worse row x
    with correspondences in it: one element per row and bucket, whatever the number of partners."""

    def __init__(self):
        self._split = beam.metrics.Metrics.counter(NS, "dedup_near_keypoint_buckets_split")

    def process(self, kv):
        (band, _), members = kv
        per_row: dict[str, tuple] = {}
        for (x_uid, y_uid), (_, y_rank, x_frame, y_frame, corr) in bucket_correspondences(
                band, list(members), self._split):
            per_row.setdefault(x_uid, (x_frame, []))[1].append((y_uid, y_rank, y_frame, corr))
        yield from per_row.items()


def verify_row(x_uid: str, groups: Iterable[tuple]) -> Iterator[tuple[str, tuple]]:
    """All of row x's correspondences (from every bucket) -> a ``(x_uid, ("duplicate_near", y_uid, y_rank))``
    decision for each better-ranked row y that passes :func:`match_keypoints` (in uid order). Also yields
    ``(None, pairs_checked)`` last, for the counter."""
    by_row: dict[str, list] = {}
    frame_x = None
    for frame, items in groups:
        frame_x = frame
        for y_uid, y_rank, y_frame, corr in items:
            by_row.setdefault(y_uid, [y_rank, y_frame, []])[2].append(corr)
    checked = 0
    for y_uid in sorted(by_row):
        y_rank, y_frame, corr = by_row[y_uid]
        if len(corr) < LOCAL_MIN_INLIERS:
            continue
        checked += 1
        if is_keypoint_copy(*match_keypoints(corr, frame_x, y_frame, LOCAL_MIN_INLIERS)):
            yield x_uid, ("duplicate_near", y_uid, y_rank)
    yield None, checked


class _LocalVerify(beam.DoFn):
    def __init__(self):
        self._pairs = beam.metrics.Metrics.counter(NS, "dedup_near_keypoint_pairs")
        self._copies = beam.metrics.Metrics.counter(NS, "dedup_near_keypoint_copies")

    def process(self, kv):
        x_uid, groups = kv
        for uid, decision in verify_row(x_uid, groups):
            if uid is None:
                self._pairs.inc(decision)
            else:
                self._copies.inc()
                yield uid, decision


def _decisions(inp: KindInputs):
    h = inp.config.near_dup_hamming
    by_phash = (inp.members
                | "NearKeys" >> beam.ParDo(_NearKeys(h))
                | "NearGroup" >> beam.GroupByKey()
                | "NearDecide" >> beam.FlatMap(decide_bucket, "near", h))
    by_keypoints = (inp.members
                    | "KeypointKeys" >> beam.ParDo(_LocalKeys())
                    | "KeypointGroup" >> beam.GroupByKey()
                    | "KeypointMatch" >> beam.ParDo(_LocalMatch())
                    | "KeypointByRow" >> beam.GroupByKey()
                    | "KeypointVerify" >> beam.ParDo(_LocalVerify()))
    return (by_phash, by_keypoints) | "NearPaths" >> beam.Flatten()


register_kind(DedupKind(
    "near", "duplicate_near", priority=20, decisions=_decisions, active=lambda cfg: "near" in cfg.dedup,
    best_dropper=lambda payloads, h: near_best_dropper(np.array(payloads, dtype=np.uint64), int(h))))
