"""Near dedup, keypoint half: the row keys (strongest keypoints' code bands), the buckets (each row pair
verified once, earlier runs' rows never the worse row, big buckets split) and the pair verification, on
synthetic signatures and on real photos (scikit-image)."""
import io
import random

import numpy as np
import pytest
from PIL import Image

from clip_curate.stages.dedup import near
from clip_curate.stages.dedup.rule import PRIOR_SCORE
from clip_curate.stages.image import _ORB_HEAD, _ORB_POINT, _ORB_VERSION, ImageConfig, process_image


def _blob(xy, codes, frame=(256, 256)):
    rec = np.empty(len(codes), dtype=_ORB_POINT)
    rec["x"] = np.round(np.asarray(xy)[:, 0] * 4 * min(frame)).astype(int)
    rec["y"] = np.round(np.asarray(xy)[:, 1] * 4 * min(frame)).astype(int)
    rec["code"] = np.asarray(codes, dtype=np.uint64)
    return _ORB_HEAD.pack(_ORB_VERSION, frame[0], frame[1], len(codes)) + rec.tobytes()


def _picture(seed, n=64):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0.12, 0.88, (n, 2))  # inside the copy's crop
    codes = rng.integers(0, 2 ** 63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    return xy, codes


def _copy(xy, codes, seed, flips=3):
    """A 10 %-per-side crop of the picture (same keypoints, shifted and rescaled), a few code bits flipped
    outside band 0."""
    rng = np.random.default_rng(seed)
    noisy = codes.copy()
    for k in range(len(noisy)):
        for bit in rng.choice(np.arange(16, 64), flips, replace=False):
            noisy[k] ^= np.uint64(1) << np.uint64(int(bit))
    return (xy - 0.1) / 0.8, noisy


def _rank(uid, score=-0.5, prior=False):
    return (PRIOR_SCORE if prior else score, 0, uid)


def _buckets(rows):
    """``{key: [(rank, blob), ...]}`` as the keypoint grouping builds them."""
    out = {}
    for rank, blob in rows:
        for key in near.Signature.of(blob).keys:
            out.setdefault(key, []).append((rank, blob))
    return out


def _all_decisions(rows, counter=None):
    decisions, verified = [], []
    for key, members in sorted(_buckets(rows).items()):
        ms = sorted(members, key=lambda m: m[0])
        sigs = [near.Signature.of(m[1]) for m in ms]
        verified += [(ms[x][0][2], ms[y][0][2]) for x, y in near.bucket_pairs(key, ms, sigs, counter)]
        decisions += near.verify_bucket(key, members, counter)[0]
    return sorted(decisions), verified


def test_keys_are_the_strongest_keypoints_bands():
    xy, codes = _picture(0)
    keys = near.local_keys(codes)
    assert keys == sorted(keys) and len(keys) == near.LOCAL_BANDS * near.LOCAL_KEY_POINTS
    top = codes[0]
    assert {(b << 16) | int((top >> np.uint64(16 * b)) & np.uint64(0xFFFF)) for b in range(4)} <= set(keys)
    weakest = codes[near.LOCAL_KEY_POINTS]  # not among the strongest: not a key
    assert int(weakest & np.uint64(0xFFFF)) not in set(keys)
    assert near.local_keys(np.array([5, 5], dtype=np.uint64)) == [5, 1 << 16, 2 << 16, 3 << 16]  # distinct only


def test_copies_share_keys_and_verify_unrelated_pictures_do_not():
    xy, codes = _picture(1)
    cxy, ccodes = _copy(xy, codes, 2)
    orig, copy = near.Signature.of(_blob(xy, codes)), near.Signature.of(_blob(cxy, ccodes))
    assert len(orig.keys & copy.keys) >= near.LOCAL_KEY_POINTS  # band 0 kept: every strong keypoint's
    inliers, iou = near.verify_pair(copy, orig)
    assert inliers == len(codes) and iou == pytest.approx(0.64, abs=0.01)
    assert near.is_keypoint_copy(inliers, iou)
    other = near.Signature.of(_blob(*_picture(3)))
    assert not orig.keys & other.keys and near.verify_pair(other, orig) == (0, 0.0)
    # codes within 16 bits that share no 16-bit band are no correspondence
    spread = codes ^ np.uint64(0x000F_000F_000F_000F)
    assert len(near.pair_correspondences(near.Signature.of(_blob(xy, spread)), orig)) == 0


def test_each_pair_is_verified_once_in_one_bucket_and_prior_rows_are_never_dropped():
    xy, codes = _picture(4)
    rows = [(_rank("best", -0.9), _blob(xy, codes)),
            (_rank("mid", -0.5), _blob(*_copy(xy, codes, 5))),
            (_rank("worst", -0.1), _blob(*_copy(xy, codes, 6))),
            (_rank("old", prior=True), _blob(*_copy(xy, codes, 7)))]
    rows += [(_rank(f"other{k}", -0.3), _blob(*_picture(10 + k))) for k in range(5)]
    decisions, verified = _all_decisions(rows)
    assert sorted(verified) == sorted(set(verified))  # once each
    assert sorted(verified) == [("best", "old"), ("mid", "best"), ("mid", "old"), ("worst", "best"),
                                ("worst", "mid"), ("worst", "old")]
    assert {(x, y) for x, (_, y, _) in decisions} == set(verified)
    assert all(reason == "duplicate_near" for _, (reason, _, _) in decisions)
    assert "old" not in {x for x, _ in decisions}   # an earlier run's row only drops
    # a pair that shares a single key is not verified
    lone = ~codes
    lone[0] = codes[0] ^ np.uint64(0xFFFF_FFFF_FFFF_0000)  # only the strongest keypoint's band 0 is shared
    one_key = [(_rank("a", -0.9), _blob(xy, codes)), (_rank("b", -0.1), _blob(xy, lone))]
    assert len(near.Signature.of(one_key[0][1]).keys & near.Signature.of(one_key[1][1]).keys) == 1
    assert _all_decisions(one_key) == ([], [])


def test_bucket_decisions_do_not_depend_on_member_order():
    xy, codes = _picture(8)
    rows = [(_rank(f"c{k}", -k / 10), _blob(*_copy(xy, codes, 20 + k))) for k in range(6)]
    rows += [(_rank(f"u{k}", -0.25), _blob(*_picture(30 + k))) for k in range(4)]
    key = min(set.intersection(*(set(near.Signature.of(b).keys) for _, b in rows[:6])))
    members = [m for m in rows if key in near.Signature.of(m[1]).keys]
    first = near.verify_bucket(key, members)
    assert first[1] == 15 and len(first[0]) == 15
    for seed in range(4):
        shuffled = members[:]
        random.Random(seed).shuffle(shuffled)
        assert near.verify_bucket(key, shuffled) == first


def test_a_big_bucket_is_split_by_the_next_band_and_counted(monkeypatch):
    monkeypatch.setattr(near, "LOCAL_MAX_BUCKET", 8)
    split = []

    class Counter:
        def inc(self, n=1):
            split.append(n)

    xy, codes = _picture(9)
    rows = []
    for k in range(30):  # all share band 0 of every keypoint; rows 0-14 also share band 1 (a true group)
        c = codes.copy()
        if k >= 15:
            c ^= np.uint64((k + 1) << 16) * np.uint64(1)
        rows.append((_rank(f"r{k:02d}", -1 + k / 100), _blob(xy, c)))
    key = min(near.Signature.of(rows[0][1]).keys)
    ms = sorted(rows, key=lambda m: m[0])
    sigs = [near.Signature.of(m[1]) for m in ms]
    pairs = near.bucket_pairs(key, ms, sigs, Counter())
    assert split
    uids = [m[0][2] for m in ms]
    assert {(uids[x], uids[y]) for x, y in pairs} >= {(f"r{a:02d}", f"r{b:02d}") for a in range(15) for b in range(a)}
    # the rows that differ in band 1 are never compared with the group (bounded work)
    assert not [(x, y) for x, y in pairs if (x < 15) != (y < 15)]


def _stored(name, box=None, quality=90):
    from skimage import data

    arr = getattr(data, name)()
    img = Image.fromarray(arr if arr.dtype == np.uint8 else (255 * arr / arr.max()).astype(np.uint8))
    if box:
        w, h = img.size
        img = img.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return near.Signature.of(process_image(buf.getvalue(), ImageConfig()).fields["orb_keypoints"])


def test_real_crops_share_keys_and_different_photos_rarely_do():
    pytest.importorskip("skimage.data")
    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")
    origs = {n: _stored(n) for n in names}
    for n in names:
        crop = _stored(n, (0.06, 0.04, 0.93, 0.95), 70)
        assert crop.keys & origs[n].keys, n                                   # they meet in a bucket
        assert len(crop.words & origs[n].words) >= near.LOCAL_MIN_SHARED_KEYS, n  # and the pair is verified
        assert near.is_keypoint_copy(*near.verify_pair(crop, origs[n])), n
    shared = [len(origs[a].words & origs[b].words) for i, a in enumerate(names) for b in names[i + 1:]]
    assert sum(s >= near.LOCAL_MIN_SHARED_KEYS for s in shared) <= 2, shared
    assert not [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
                if near.is_keypoint_copy(*near.verify_pair(origs[a], origs[b]))]


def test_correspondences_keep_mutual_closest_codes_only():
    """A keypoint of a repeated pattern matches several keypoints of the other row; only pairs that are each
    other's closest code stay (ties kept), so periodic textures propose fewer false transforms."""
    base = np.uint64(0xABCD)                       # band 0 shared by every code below
    far = base | (np.uint64(0b111) << np.uint64(16))    # 3 bits from base
    near_code = base | (np.uint64(0b1) << np.uint64(16))  # 1 bit from base
    xy = np.array([[0.2, 0.2], [0.5, 0.5], [0.8, 0.8]])
    x = near.Signature.of(_blob(xy[:1], np.array([base])))
    y = near.Signature.of(_blob(xy, np.array([far, near_code, near_code])))
    corr = near.pair_correspondences(x, y)
    assert sorted(corr[:, 4].astype(int).tolist()) == [1, 2]     # the tie at 1 bit; not the 3-bit one
    assert set(corr[:, 0].astype(int).tolist()) == {1}
    x2 = near.Signature.of(_blob(xy[:2], np.array([base, far])))
    y2 = near.Signature.of(_blob(xy[:1], np.array([near_code])))
    corr2 = near.pair_correspondences(x2, y2)                   # y's keypoint is closer to x's first
    assert corr2[:, 1].astype(int).tolist() == [0]
