"""Pure core of dedup (no Beam): the rank, keys, per-bucket decisions, the semantic model and eval sets.

Everything here is deterministic: the same members give the same decisions whatever their order.
A bucket's members are sorted by :func:`rank_key` first; "drop x" means some member ranked before x is
within the threshold, and the dropper reported for x is the best-ranked such member.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

KINDS = ("exact", "near", "semantic")
REASON = {"exact": "duplicate_exact", "near": "duplicate_near", "semantic": "duplicate_semantic"}
#: When one row is dropped for several reasons, the first in this order is reported.
PRIORITY = ("eval_leak", "duplicate_exact", "duplicate_near", "duplicate_semantic")

Rank = tuple  # (-clip_score, -pixels, uid): smaller is better
Member = tuple  # (uid, rank, payload): payload None (exact), int pHash (near) or float32 vector (semantic)


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


def uid_hash(uid: str) -> int:
    """Stable 63-bit hash of a uid (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(uid.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "big") >> 1


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


# ---------------------------------------------------------------------------------------------
# Per-bucket decisions (the shared rule)

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


def semantic_best_dropper(emb: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """For embeddings in rank order: index of the best-ranked earlier row with cosine >= threshold, or -1."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(emb)
    found = np.full(n, -1, dtype=np.int64)
    for i0 in range(1, n, block):
        i1 = min(i0 + block, n)
        open_rows = np.arange(i1 - i0)
        for j0 in range(0, i1, block):
            j1 = min(j0 + block, i1)
            open_rows = open_rows[found[i0 + open_rows] < 0]
            if not len(open_rows):
                break
            close = (emb[i0 + open_rows] @ emb[j0:j1].T) >= threshold
            close &= (np.arange(j0, j1)[None, :] < (i0 + open_rows)[:, None])
            hit = close.any(axis=1)
            found[i0 + open_rows[hit]] = j0 + np.argmax(close[hit], axis=1)
    return found


def bucket_decisions(members: Sequence[Member], kind: str, threshold: float) -> Iterator[tuple[str, tuple]]:
    """One shared key's members -> ``(uid, (reason, dropper_uid, dropper_rank))`` per dropped member.

    ``threshold``: Hamming distance for ``near``, cosine for ``semantic``, ignored for ``exact``.
    The same uid twice (the same url and caption) is compared once.
    """
    uniq: dict[str, Member] = {}
    for m in members:
        if m[0] not in uniq or m[1] < uniq[m[0]][1]:
            uniq[m[0]] = m
    if len(uniq) < 2:
        return
    ms = sorted(uniq.values(), key=lambda m: m[1])
    reason = REASON[kind]
    if kind == "exact":
        found = np.zeros(len(ms), dtype=np.int64)
        found[0] = -1
    elif kind == "near":
        found = near_best_dropper(np.array([m[2] for m in ms], dtype=np.uint64), int(threshold))
    elif kind == "semantic":
        found = semantic_best_dropper(np.stack([m[2] for m in ms]), float(threshold))
    else:
        raise ValueError(f"unknown dedup kind {kind!r}")
    for i in np.nonzero(found >= 0)[0]:
        y = ms[int(found[i])]
        yield ms[i][0], (reason, y[0], y[1])


# ---------------------------------------------------------------------------------------------
# Semantic model: k-means clusters, split into bounded sub-buckets

@dataclass
class SemanticModel:
    """Centroids (k, d) and, per cluster, ``bits[c]`` split directions with their median thresholds."""

    centroids: np.ndarray
    directions: np.ndarray  # (k, max_bits, d)
    medians: np.ndarray     # (k, max_bits)
    bits: np.ndarray        # (k,)
    cluster_margin: float   # also probe clusters nearly as close as the nearest
    split_margin: float     # rows this close to a split plane go to both sides
    expected_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def empty(self) -> bool:
        return self.centroids.shape[0] == 0


def semantic_margins(threshold: float, dim: int) -> tuple[float, float]:
    """(cluster margin, split margin) for a cosine threshold in ``dim`` dimensions.

    Two unit vectors with cosine >= t are at most r = sqrt(2 - 2t) apart; their projections on a unit
    direction differ by at most r and, for a difference in a random direction, by about r / sqrt(d).
    The margins cover 4 standard deviations of that (capped at the worst case): a pair is split only
    when its difference lies unusually along a centroid or split direction.
    """
    r = math.sqrt(max(0.0, 2 - 2 * threshold))
    stat = 4 * r / math.sqrt(max(dim, 1))
    return min(r, 2 * stat), min(r / 2, stat)


def auto_clusters(n_rows: int, sample_size: int) -> int:
    """k for ``--semantic-clusters 0``: about one cluster per 1000 rows, at least 40 sample points each."""
    return max(1, min(round(n_rows / 1000), sample_size // 40))


def fit_semantic_model(sample: Sequence[np.ndarray], n_rows: int, threshold: float, clusters: int,
                       max_group: int, seed: int = 0) -> SemanticModel:
    """Fit spherical k-means (faiss) on the sample; plan splits so groups stay within ``max_group``.

    A cluster expected (from the sample, scaled to ``n_rows``) to exceed the bound is cut along its top-b
    principal directions, each at the sample median (balanced halves). b starts at
    ceil(log2(expected / max_group)) and grows while the sample, keyed exactly as rows will be (with the
    overlaps), still predicts a sub-bucket above 80 % of ``max_group``.
    """
    if len(sample) == 0:
        return SemanticModel(np.zeros((0, 1), np.float32), np.zeros((0, 0, 1), np.float32),
                             np.zeros((0, 0), np.float32), np.zeros(0, np.int64), 0.0, 0.0)
    import faiss

    x = np.ascontiguousarray(np.stack(sample).astype(np.float32))
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n_rows = max(n_rows, len(x))
    k = clusters or auto_clusters(n_rows, len(x))
    k = max(1, min(k, len(x)))
    if k == 1:
        centroids = x.mean(axis=0, keepdims=True)
    else:
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=256, min_points_per_centroid=1)
        km.train(x)
        centroids = km.centroids
    centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    centroids = centroids.astype(np.float32)
    assign = np.argmax(x @ centroids.T, axis=1)
    scale = n_rows / len(x)
    expected = np.bincount(assign, minlength=k) * scale
    bits = np.array([min(12, math.ceil(math.log2(e / max_group))) if e > max_group else 0 for e in expected],
                    dtype=np.int64)
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    cluster_margin, split_margin = semantic_margins(threshold, d)
    pcs: dict[int, np.ndarray] = {}

    def directions_of(c: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        members = x[assign == c]
        if c not in pcs:
            resid = members - members.mean(axis=0) if len(members) else np.zeros((0, d), np.float32)
            vt = np.linalg.svd(resid, full_matrices=False)[2] if len(members) > 1 else np.zeros((0, d))
            pcs[c] = vt[:12]
        dirs = pcs[c][:b]
        if len(dirs) < b:
            dirs = np.concatenate([dirs, rng.standard_normal((b - len(dirs), d))])
        dirs = (dirs / np.linalg.norm(dirs, axis=1, keepdims=True)).astype(np.float32)
        meds = np.median(members @ dirs.T, axis=0) if len(members) else np.zeros(b)
        return dirs, meds.astype(np.float32)

    planned: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(8):
        for c in np.nonzero(bits)[0]:
            if c not in planned or len(planned[c][0]) != bits[c]:
                planned[int(c)] = directions_of(int(c), int(bits[c]))
        max_bits = int(bits.max())
        directions = np.zeros((k, max_bits, d), np.float32)
        medians = np.zeros((k, max_bits), np.float32)
        for c, (dirs, meds) in planned.items():
            directions[c, :len(dirs)], medians[c, :len(meds)] = dirs, meds
        model = SemanticModel(centroids, directions, medians, bits.copy(), cluster_margin, split_margin, expected)
        sizes: dict[tuple[int, int], int] = {}
        for keys in semantic_keys(x, model):
            for key in keys:
                sizes[key] = sizes.get(key, 0) + 1
        over = {c for (c, _), s in sizes.items() if s * scale > 0.8 * max_group and bits[c] < 12}
        if not over:
            break
        for c in over:
            bits[c] += 1
    return model


def semantic_keys(emb: np.ndarray, model: SemanticModel, max_clusters: int = 3,
                  max_probe_bits: int = 2) -> list[list[tuple[int, int]]]:
    """``(cluster, sub_bucket)`` keys of each row of ``emb`` (n, d).

    A row goes to its nearest centroid and to up to ``max_clusters - 1`` others within the cluster
    margin. Inside a split cluster the sub-bucket is the pattern of sides of the split planes; for the
    ``max_probe_bits`` bits whose projection is nearest the cut (when within the split margin) the row
    goes to both sides, so close pairs straddling a cut still meet.
    """
    emb = np.asarray(emb, dtype=np.float32)
    n = len(emb)
    out: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    if model.empty or not n:
        return out
    sims = emb @ model.centroids.T
    k = sims.shape[1]
    top = min(max_clusters, k)
    cand = np.argpartition(-sims, top - 1, axis=1)[:, :top] if top < k else np.tile(np.arange(k), (n, 1))
    cs = np.take_along_axis(sims, cand, 1)
    order = np.lexsort((cand, -cs))  # per row: most similar first, ties by cluster id
    cand, cs = np.take_along_axis(cand, order, 1), np.take_along_axis(cs, order, 1)
    ok = cs >= cs[:, :1] - model.cluster_margin
    ok[:, 0] = True
    rows, cols = np.nonzero(ok)
    clusters = cand[rows, cols]
    subs: dict[int, np.ndarray] = {}  # entry index -> sub-bucket codes
    split = np.nonzero(model.bits[clusters] > 0)[0]
    for c in np.unique(clusters[split]):
        entries = split[clusters[split] == c]
        b = int(model.bits[c])
        off = emb[rows[entries]] @ model.directions[c, :b].T - model.medians[c, :b]
        codes = ((off > 0).astype(np.int64) << np.arange(b)).sum(axis=1)
        variants = [codes]
        near = np.argsort(np.abs(off), axis=1)[:, :max_probe_bits]
        for j in range(near.shape[1]):
            bit = near[:, j]
            unsure = np.abs(off[np.arange(len(entries)), bit]) < model.split_margin
            flipped = [np.where(unsure, v ^ (1 << bit), -1) for v in variants]
            variants += [np.where(v >= 0, f, -1) for v, f in zip(variants, flipped)]
        stacked = np.stack(variants, axis=1)
        for e, codes_e in zip(entries.tolist(), stacked.tolist()):
            subs[e] = sorted({x for x in codes_e if x >= 0})
    for e, (r, c) in enumerate(zip(rows.tolist(), clusters.tolist())):
        if e in subs:
            out[r].extend((c, s) for s in subs[e])
        else:
            out[r].append((c, 0))
    return out


# ---------------------------------------------------------------------------------------------
# Eval-set decontamination

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


@dataclass
class EvalSet:
    """Eval items: pHashes of their images and (optionally) their embeddings, with item names."""

    phashes: np.ndarray            # uint64
    phash_names: list[str]
    embeddings: np.ndarray | None  # (m, d) float32, L2-normalised
    embedding_names: list[str]
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(set(self.phash_names) | set(self.embedding_names))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_index"] = {}
        return state

    def match_phash(self, phash: int, hamming: int) -> tuple[str, int] | None:
        """(name, distance) of the closest eval image within ``hamming``, or None (band index lookup)."""
        if not len(self.phashes):
            return None
        index = self._index.get(hamming)
        if index is None:
            index = self._index[hamming] = _band_index(self.phashes, hamming)
        masks, table = index
        cand = set()
        for b, m in enumerate(masks):
            cand.update(table.get((b, phash & m), ()))
        if not cand:
            return None
        cand = np.array(sorted(cand), dtype=np.int64)
        d = popcount64(self.phashes[cand] ^ np.uint64(phash))
        i = int(np.argmin(d))  # ties: the smallest index (stable, deterministic)
        return (self.phash_names[cand[i]], int(d[i])) if d[i] <= hamming else None

    def match_embeddings(self, emb: np.ndarray, threshold: float) -> list[tuple[str, float] | None]:
        """Per row of ``emb`` (n, d): (name, cosine) of the most similar eval embedding >= threshold."""
        if self.embeddings is None or not len(emb):
            return [None] * len(emb)
        if emb.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"--decontaminate: eval embeddings have {self.embeddings.shape[1]} dimensions "
                             f"but rows have {emb.shape[1]}; embed the eval set with the same CLIP model")
        sims = emb @ self.embeddings.T
        j = np.argmax(sims, axis=1)
        s = sims[np.arange(len(emb)), j]
        return [(self.embedding_names[j[i]], float(s[i])) if s[i] >= threshold else None for i in range(len(emb))]


def _band_index(phashes: np.ndarray, hamming: int):
    masks = band_masks(hamming)
    table: dict[tuple[int, int], list[int]] = {}
    for i, h in enumerate(phashes.tolist()):
        for b, m in enumerate(masks):
            table.setdefault((b, h & m), []).append(i)
    return masks, table


def image_phash(data: bytes) -> int:
    """imagehash pHash of encoded image bytes (as the image stage computes it), as an int."""
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return int(str(imagehash.phash(img.convert("RGB"))), 16)


def load_eval_set(path: str) -> EvalSet:
    """Eval items from a directory of images, or a Parquet with image bytes and/or ``image_embedding``.

    Parquet: the name column is the first of ``uid``, ``key``, ``name``, ``id`` (else ``eval-<row>``);
    the image column the first of ``image``, ``jpg``, ``png``, ``image_bytes`` (bytes, or a Hugging Face
    ``{"bytes": ...}`` struct). Raises ``ConfigError`` when nothing usable is found or an image is corrupt.
    """
    import fsspec

    from clip_curate.options import ConfigError

    images: list[tuple[str, bytes]] = []
    embs: list[tuple[str, np.ndarray]] = []
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise ConfigError(f"--decontaminate: not found: {path}")
    if fs.isdir(p):
        for f in sorted(fs.find(p)):
            if f.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                name = f[len(p):].lstrip("/") if f.startswith(p) else os.path.basename(f)
                images.append((name, fs.cat_file(f)))
    else:
        import pyarrow.parquet as pq
        try:
            with fs.open(p, "rb") as fh:
                table = pq.read_table(fh)
        except Exception as exc:
            raise ConfigError(f"--decontaminate {path}: not a directory of images or a Parquet file "
                              f"({type(exc).__name__}: {exc})"[:300]) from None
        cols = table.column_names
        name_col = next((c for c in ("uid", "key", "name", "id") if c in cols), None)
        img_col = next((c for c in ("image", "jpg", "png", "image_bytes") if c in cols), None)
        for i, row in enumerate(table.to_pylist()):
            name = str(row[name_col]) if name_col else f"eval-{i}"
            value = row.get(img_col) if img_col else None
            if isinstance(value, dict):
                value = value.get("bytes")
            if value:
                images.append((name, value))
            if row.get("image_embedding") is not None:
                v = np.asarray(row["image_embedding"], dtype=np.float32)
                embs.append((name, v / (np.linalg.norm(v) or 1.0)))
    hashes, names = [], []
    for name, data in images:
        try:
            hashes.append(image_phash(data))
        except Exception as exc:
            raise ConfigError(f"--decontaminate: cannot decode eval image {name}: "
                              f"{type(exc).__name__}: {exc}; remove or fix it"[:300]) from None
        names.append(name)
    if not hashes and not embs:
        raise ConfigError(f"--decontaminate {path}: no eval images ({', '.join(IMAGE_EXTENSIONS)}) or "
                          "image_embedding column found")
    if embs and len({len(e) for _, e in embs}) > 1:
        raise ConfigError(f"--decontaminate {path}: image_embedding rows have different lengths")
    return EvalSet(np.array(hashes, dtype=np.uint64), names,
                   np.stack([e for _, e in embs]).astype(np.float32) if embs else None, [n for n, _ in embs])
