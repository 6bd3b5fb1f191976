"""Dedup kind ``near``: copies of one picture — re-encodes, resizes, brightness and colour shifts (pHash),
and crops of up to ~10 % per side and small rotations (ORB keypoints). Two paths, one reason
(``duplicate_near``), the same rule: a row is dropped when a better-ranked row sharing one of its keys is
within the threshold.

pHash path. Keys: the pHash split into bands (LSH): two hashes within Hamming distance h share at least one
band when the 64 bits are cut into h + 1 bands. Within a band bucket, :func:`near_best_dropper` finds each
member's best-ranked member within distance h.

Keypoint path (rows with ``orb_keypoints``, computed by the image stage). Keys: a sketch of the row's
keypoint set, the :data:`LOCAL_BANDS` 16-bit bands of the codes of its :data:`LOCAL_KEY_POINTS` strongest
keypoints (:func:`local_keys`, <= 96); each record carries the row's rank and packed keypoints, so one grouping
brings a candidate pair together with what verifies it. In a bucket (:func:`verify_bucket`), a pair is verified
when the bucket's key is its smallest shared key (once per pair) and the bands of its rows'
:data:`LOCAL_FILTER_POINTS` strongest keypoints share :data:`LOCAL_MIN_SHARED_KEYS` values
(:func:`bucket_pairs`). Verification (:func:`verify_pair`): keypoints whose codes share a band and are within
:data:`LOCAL_CODE_HAMMING` bits are correspondences (:func:`pair_correspondences`), and "within the threshold"
means at least :data:`LOCAL_MIN_INLIERS` keypoints on each side agree with one similarity transform (scale
1/1.6..1.6, rotation <= 6 degrees, to 1.5 % of the shorter side), and the two frames, aligned by it, overlap by
at least :data:`LOCAL_MIN_IOU` of their union (:func:`match_keypoints`; a crop keeping >= 64 % of the picture
is a copy; another region of the same photo, or two halves of a panorama, are different pictures).
"""
from __future__ import annotations

from typing import Iterable, Sequence

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

LOCAL_BANDS = 4            # 16-bit bands of a keypoint's 64-bit code
LOCAL_KEY_POINTS = 24      # the strongest keypoints (stored first) whose code bands are the row's keys
LOCAL_FILTER_POINTS = 48   # a row pair is verified when the bands of its rows' this many strongest keypoints
LOCAL_MIN_SHARED_KEYS = 3  # ... share at least this many values (the bucket's key is one)
LOCAL_CODE_HAMMING = 16    # codes within this many bits (of 64) make a correspondence
LOCAL_MUTUAL = True        # ... when each code is the other's closest among the pair's candidates (ties kept)
LOCAL_MAX_BUCKET = 512     # a bigger bucket is split by the keyed keypoint's next band (bounded work; counted)
LOCAL_MAX_CORRESPONDENCES = 256  # per row pair (the closest codes are kept)
LOCAL_HYPOTHESES_FROM = 48  # transforms are proposed by pairs among the closest correspondences
LOCAL_MIN_INLIERS = 7      # keypoints on each side that one similarity transform maps onto each other
LOCAL_TOLERANCE = 0.015    # of the shorter side (3.8 px at the 256 px working size)
LOCAL_MAX_SCALE = 1.6      # relative scale of the two frames (both are normalised to their shorter side)
LOCAL_MAX_ROTATION = 6.0   # degrees
LOCAL_MIN_IOU = 0.4        # overlap / union of the two aligned frames
_BAND_MASK = np.uint64(0xFFFF)


def local_keys(codes: np.ndarray, points: int | None = None) -> list[int]:
    """A row's keypoint keys, ascending: ``band << 16 | value`` for each of the :data:`LOCAL_BANDS` 16-bit bands
    of the codes of its ``points`` (default :data:`LOCAL_KEY_POINTS`) strongest keypoints (distinct values)."""
    return sorted(_key_set(codes, LOCAL_KEY_POINTS if points is None else points))


def _key_set(codes: np.ndarray, points: int) -> set[int]:
    top = np.asarray(codes, dtype=np.uint64)[:points].tolist()
    return {(c >> (16 * b)) & 0xFFFF | b << 16 for b in range(LOCAL_BANDS) for c in top}


class Signature:
    """One row's keypoints unpacked from its ``orb_keypoints`` blob: ``frame``, ``xy``, ``codes``, its
    :func:`local_keys` (``keys``) and the same of its :data:`LOCAL_FILTER_POINTS` strongest keypoints
    (``words``), as frozensets."""

    __slots__ = ("frame", "xy", "codes", "keys", "words", "_index", "_code_list")

    def __init__(self, frame, xy, codes):
        self.frame, self.xy, self.codes = frame, xy, codes
        self.keys = frozenset(_key_set(codes, LOCAL_KEY_POINTS))
        self.words = self.keys if LOCAL_FILTER_POINTS <= LOCAL_KEY_POINTS else \
            frozenset(_key_set(codes, LOCAL_FILTER_POINTS))
        self._index = self._code_list = None

    @property
    def code_list(self) -> list[int]:
        """The codes as Python ints (built on first use)."""
        if self._code_list is None:
            self._code_list = self.codes.tolist()
        return self._code_list

    @property
    def index(self) -> dict[int, list[int]]:
        """``band << 16 | value`` of every keypoint -> the keypoints that have it (built on first use)."""
        if self._index is None:
            index: dict[int, list[int]] = {}
            for b in range(LOCAL_BANDS):
                for i, v in enumerate(((self.codes >> np.uint64(16 * b)) & _BAND_MASK).tolist()):
                    index.setdefault(v | b << 16, []).append(i)
            self._index = index
        return self._index

    @classmethod
    def of(cls, blob) -> "Signature | None":
        sig = unpack_orb_keypoints(blob)
        return None if sig is None else cls(*sig)


def _closest_pairs(x: Signature, y: Signature, shared=None) -> list[tuple[int, int, int]]:
    """``(code_distance, i, j)`` of the keypoint pairs :func:`pair_correspondences` returns, in its order.
    ``shared``: the band values both rows have, when the caller already has them."""
    ix, iy = x.index, y.index
    cand = {(i, j) for w in (ix.keys() & iy.keys() if shared is None else shared) for i in ix[w] for j in iy[w]}
    cx, cy = x.code_list, y.code_list
    found = sorted((d, i, j) for i, j in cand for d in ((cx[i] ^ cy[j]).bit_count(),) if d <= LOCAL_CODE_HAMMING)
    if LOCAL_MUTUAL and found:
        best_i: dict[int, int] = {}
        best_j: dict[int, int] = {}
        for d, i, j in found:          # ascending distance: the first seen is the closest
            best_i.setdefault(i, d)
            best_j.setdefault(j, d)
        found = [t for t in found if t[0] == best_i[t[1]] and t[0] == best_j[t[2]]]
    return found[:LOCAL_MAX_CORRESPONDENCES]


def _rows(x: Signature, y: Signature, found: list[tuple[int, int, int]]) -> np.ndarray:
    if not found:
        return np.empty((0, 7))
    dij = np.array(found, dtype=np.int64)
    i, j = dij[:, 1], dij[:, 2]
    return np.column_stack([dij[:, 0], i, x.xy[i, 0], x.xy[i, 1], j, y.xy[j, 0], y.xy[j, 1]]).astype(np.float64)


def pair_correspondences(x: Signature, y: Signature) -> np.ndarray:
    """Every keypoint pair of rows x and y whose codes agree exactly on one of the :data:`LOCAL_BANDS` 16-bit
    bands and are within :data:`LOCAL_CODE_HAMMING` bits, as rows ``(code_distance, i, xi, yi, j, xj, yj)``
    sorted as :func:`match_keypoints` sorts them (float64, k x 7). (The shared band keeps ~15 % of a
    copy's codes within 16 bits but ~3 % of an unrelated picture's: without it unrelated pairs reach 10
    inliers.) Found through the band values the rows share, so only those keypoints' codes are compared."""
    return _rows(x, y, _closest_pairs(x, y))


def verify_pair(x: Signature, y: Signature) -> tuple[int, float]:
    """``(inliers, iou)`` of rows x (the worse) and y: :func:`match_keypoints` on :func:`pair_correspondences`.

    Most pairs stop early with ``(0, 0.0)``, the answer :func:`match_keypoints` gives them: first when fewer
    than :data:`LOCAL_MIN_INLIERS` keypoints of a side have a band value the other row also has (a keypoint in
    a correspondence must), then when fewer than that many take part in the correspondences."""
    ix, iy = x.index, y.index
    shared = ix.keys() & iy.keys()
    if sum(len(ix[k]) for k in shared) < LOCAL_MIN_INLIERS or sum(len(iy[k]) for k in shared) < LOCAL_MIN_INLIERS:
        return 0, 0.0
    found = _closest_pairs(x, y, shared)
    if min(len({t[1] for t in found}), len({t[2] for t in found})) < LOCAL_MIN_INLIERS:
        return 0, 0.0
    return _match(_rows(x, y, found), x.frame, y.frame, LOCAL_MIN_INLIERS)


def bucket_pairs(key: int, members: Sequence[tuple], sigs: Sequence[Signature], split_counter=None
                 ) -> list[tuple[int, int]]:
    """The row pairs one keypoint bucket verifies, as ``(worse, better)`` indices into ``members`` (``(rank,
    blob)``, sorted by rank; ``sigs``: their signatures): members of different rows whose smallest shared key
    is ``key`` (so a pair is verified in one bucket only) and whose ``words`` share at least
    :data:`LOCAL_MIN_SHARED_KEYS` values. Rows of earlier runs are never the worse row. A bucket over :data:`LOCAL_MAX_BUCKET` members
    is split by the next band of the keyed keypoint's code (its rows must then share that band too; counted)."""
    return sorted(_pairs(key, list(range(len(members))), members, sigs, split_counter, 0))


def _pairs(key: int, idx: list[int], members, sigs, split_counter, depth: int) -> set[tuple[int, int]]:
    if len(idx) < 2:
        return set()
    if len(idx) > LOCAL_MAX_BUCKET and depth < LOCAL_BANDS - 1:
        if split_counter is not None:
            split_counter.inc()
        band, value = key >> 16, key & 0xFFFF
        shift = np.uint64(16 * band)
        nxt = np.uint64(16 * ((band + depth + 1) % LOCAL_BANDS))
        subs: dict[int, list[int]] = {}
        for k in idx:
            codes = sigs[k].codes[:LOCAL_KEY_POINTS]
            hit = codes[((codes >> shift) & _BAND_MASK) == value]
            for sub in sorted(set(((hit >> nxt) & _BAND_MASK).tolist())):
                subs.setdefault(sub, []).append(k)
        found: set[tuple[int, int]] = set()
        for sub in subs.values():
            found |= _pairs(key, sub, members, sigs, split_counter, depth + 1)
        return found
    out = set()
    for a in range(1, len(idx)):
        rank_x = members[idx[a]][0]
        if is_prior(rank_x):
            continue
        sx = sigs[idx[a]]
        for b in range(a):
            sy = sigs[idx[b]]
            if members[idx[b]][0][2] == rank_x[2] or min(sx.keys & sy.keys, default=-1) != key:
                continue  # the same row twice, or the pair's smallest shared key is another bucket's
            if len(sx.words & sy.words) >= LOCAL_MIN_SHARED_KEYS:
                out.add((idx[a], idx[b]))
    return out


def verify_bucket(key: int, members: Iterable[tuple], split_counter=None, cache: dict | None = None
                  ) -> tuple[list[tuple[str, tuple]], int]:
    """One keypoint bucket ``(rank, blob)`` members -> (``(worse_uid, ("duplicate_near", better_uid,
    better_rank))`` for each of its :func:`bucket_pairs` that passes :func:`is_keypoint_copy`, the number of
    pairs verified). Deterministic: the same members in any order give the same answer. ``cache``: blob ->
    :class:`Signature`, kept by the caller across buckets (a row is a member of up to ~100 buckets)."""
    ms = sorted(members, key=lambda m: m[0])
    if cache is None:
        cache = {}
    sigs = []
    for m in ms:
        sig = cache.get(m[1], False)
        if sig is False:
            sig = cache[m[1]] = Signature.of(m[1])
        sigs.append(sig)
    keep = [k for k, s in enumerate(sigs) if s is not None]
    if len(keep) < len(ms):
        ms, sigs = [ms[k] for k in keep], [sigs[k] for k in keep]
    pairs = bucket_pairs(key, ms, sigs, split_counter)
    out = []
    for x, y in pairs:
        if is_keypoint_copy(*verify_pair(sigs[x], sigs[y])):
            out.append((ms[x][0][2], ("duplicate_near", ms[y][0][2], ms[y][0])))
    return out, len(pairs)


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
    return _match(np.array(corr, dtype=np.float64).reshape(-1, 7), frame_x, frame_y, min_inliers)


def _match(c: np.ndarray, frame_x: tuple[float, float], frame_y: tuple[float, float],
           min_inliers: int) -> tuple[int, float]:
    """:func:`match_keypoints` on correspondences already sorted and cut (a k x 7 array)."""
    if min(len(set(c[:, 1].tolist())), len(set(c[:, 4].tolist()))) < min_inliers:
        return 0, 0.0  # too few distinct keypoints to ever reach the threshold: most pairs stop here
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
    """A row -> ``(key, (rank, blob))`` for each of its :func:`local_keys`: the record carries the whole
    packed signature, so one grouping brings every candidate pair together with what verifies it."""

    def __init__(self):
        self._missing = beam.metrics.Metrics.counter(NS, "dedup_near_no_keypoints")
        self._keys = beam.metrics.Metrics.distribution(NS, "dedup_near_keypoint_keys_per_row")

    def process(self, m):
        blob = m.get("orb")
        sig = unpack_orb_keypoints(blob)
        if sig is None:
            self._missing.inc()
            return
        keys = local_keys(sig[2])
        self._keys.update(len(keys))
        member = (m["rank"], bytes(blob))
        for key in keys:
            yield key, member


_CACHE_ROWS = 8192  # signatures a verifying worker keeps between buckets (~10 kB each)


class _LocalVerify(beam.DoFn):
    def __init__(self):
        self._pairs = beam.metrics.Metrics.counter(NS, "dedup_near_keypoint_pairs")
        self._copies = beam.metrics.Metrics.counter(NS, "dedup_near_keypoint_copies")
        self._split = beam.metrics.Metrics.counter(NS, "dedup_near_keypoint_buckets_split")
        self._cache: dict = {}

    def process(self, kv):
        key, members = kv
        members = list(members)
        if len(members) < 2:
            return
        if len(self._cache) > _CACHE_ROWS:
            self._cache.clear()
        decisions, checked = verify_bucket(key, members, self._split, self._cache)
        self._pairs.inc(checked)
        self._copies.inc(len(decisions))
        yield from decisions


def _decisions(inp: KindInputs):
    h = inp.config.near_dup_hamming
    by_phash = (inp.members
                | "NearKeys" >> beam.ParDo(_NearKeys(h))
                | "NearGroup" >> beam.GroupByKey()
                | "NearDecide" >> beam.FlatMap(decide_bucket, "near", h))
    by_keypoints = (inp.members
                    | "KeypointKeys" >> beam.ParDo(_LocalKeys())
                    | "KeypointGroup" >> beam.GroupByKey()
                    | "KeypointVerify" >> beam.ParDo(_LocalVerify()))
    return (by_phash, by_keypoints) | "NearPaths" >> beam.Flatten()


register_kind(DedupKind(
    "near", "duplicate_near", priority=20, decisions=_decisions, active=lambda cfg: "near" in cfg.dedup,
    best_dropper=lambda payloads, h: near_best_dropper(np.array(payloads, dtype=np.uint64), int(h))))
