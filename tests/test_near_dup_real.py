"""Near duplicates of real photos that survive crops: the keypoint path of ``--dedup near``.

The world is ``bench/near_dup_real.py``'s (scikit-image photos; seeded re-encodes, resizes, crops up to 10 % per
side, brightness +-15 %, rotations up to 3 degrees, and their combinations; halves of one large photo and regions
of photos as different pictures). It runs through the real Beam stages: DecodeResize, then Dedup(exact, near).
Pure-function tests cover the keypoint signature and the geometric check (keys, buckets and pair
verification: ``tests/test_near_keys.py``).
"""
import importlib.util
import io
import sys
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_curate.stages.dedup import Dedup, DedupConfig
from clip_curate.stages.dedup import near
from clip_curate.stages.image import (DecodeResize, ImageConfig, orb_keypoints, process_image,
                                      unpack_orb_keypoints)

pytest.importorskip("skimage.data")


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "near_dup_real.py"
    spec = importlib.util.spec_from_file_location("near_dup_real_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


class _ImageThenDedup(beam.PTransform):
    """The two real stages in pipeline order: rows with image_bytes -> (kept, rejected of both stages)."""

    def __init__(self, image_cfg: ImageConfig):
        super().__init__()
        self._cfg = image_cfg

    def expand(self, rows):
        images, bad = rows | DecodeResize(self._cfg)
        kept, dropped = images | Dedup(DedupConfig(dedup=("exact", "near")))
        return kept, (bad, dropped) | beam.Flatten()


def _outcome(ran, world):
    out = {r["uid"]: ("kept", "") for r in ran.kept}
    for r in ran.rejected:
        assert r["uid"] not in out, f"{r['uid']} output twice"
        out[r["uid"]] = (r["reason"] if r["stage"] == "dedup" else f"{r['stage']}/{r['reason']}", r["detail"])
    assert sorted(out) == sorted(p.uid for p in world)  # every row exactly once
    return out


def _rows(world):
    return [{"uid": p.uid, "url": f"http://photos.test/{p.uid}.jpg", "caption": p.group, "image_bytes": p.data}
            for p in world]


# ---------------------------------------------------------------------------------------------
# The world through the real stages


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 3])
def test_real_photo_copies_found_and_different_photos_never_merged(seed, run_transform):
    world = bench.build_world(seed)
    assert len({p.group for p in world}) >= 12 + 4          # >= 12 distinct photos, plus the planted look-alikes
    ran = run_transform(_rows(world), _ImageThenDedup(ImageConfig()), via_file=True)
    out = _outcome(ran, world)
    assert not [u for u, (r, _) in out.items() if r.startswith("image/")]
    res = bench.score(world, out)
    assert res["wrong"] == [], res["wrong"]                  # no two different photos merged
    assert res["precision"] >= 0.98 and res["recall"] >= 0.95, res
    kept_groups = {p.group for p in world if out[p.uid][0] == "kept"}
    assert kept_groups == {p.group for p in world}           # every picture keeps a copy
    # the look-alikes are kept apart: both halves of the large photo, each region beside its photo
    for a, b in (("hubble_west", "hubble_east"), ("astronaut", "astronaut_region"), ("retina", "retina_region")):
        assert a in kept_groups and b in kept_groups
    # the stereo pair is one view (documented): the right image is a copy of the left one
    assert out["motorcycle-stereo_right"][0].startswith("duplicate_")
    # crops and rotations are what the keypoints add: each is caught
    for kind in ("crop", "rotate", "combo1", "combo2", "crop_resize"):
        caught, total = map(int, res["dropped_by_kind"][kind].split("/"))
        assert caught >= total - 1, (kind, res["dropped_by_kind"])
    assert ran.counters["dedup_near_keypoint_copies"] > 0


@pytest.mark.slow
def test_phash_alone_misses_the_crops(run_transform):
    """--orb-keypoints 0: near dedup is the pHash alone, and most crops survive (the keypoint path is what
    reaches the recall target)."""
    world = bench.build_world(0)
    ran = run_transform(_rows(world), _ImageThenDedup(ImageConfig(orb_keypoints=0)), via_file=True)
    res = bench.score(world, _outcome(ran, world))
    assert res["wrong"] == [] and res["recall"] < 0.8, res
    assert ran.counters["dedup_near_no_keypoints"] == len(world)


# ---------------------------------------------------------------------------------------------
# The keypoint signature


def _photo(name="astronaut"):
    from skimage import data

    return np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB"))


def test_keypoint_signature_round_trip_and_bad_values():
    arr = _photo()
    blob = orb_keypoints(arr, 64)
    frame, xy, codes = unpack_orb_keypoints(blob)
    assert len(blob) == 7 + 12 * len(codes) and 8 <= len(codes) <= 64
    assert frame == (1.0, 1.0) and codes.dtype == np.uint64
    assert (xy >= 0).all() and (xy <= 1).all()
    wide = orb_keypoints(np.ascontiguousarray(arr[:200]))  # 512 x 200 -> working frame 655 x 256
    assert unpack_orb_keypoints(wide)[0] == pytest.approx((655 / 256, 1.0))
    assert orb_keypoints(arr, 0) is None
    assert orb_keypoints(np.full((300, 300, 3), 128, np.uint8)) is None       # flat: no keypoints
    for bad in (None, b"", b"\x01\x00", blob[:-1], b"\x09" + blob[1:], "not bytes"):
        assert unpack_orb_keypoints(bad) is None


def test_repeated_structure_keeps_no_keypoints():
    """A checkerboard's corners all look alike: they would match any other checkerboard, so they are dropped."""
    yy, xx = np.mgrid[0:300, 0:300]
    board = (((xx // 25 + yy // 25) % 2) * 200 + 30).astype(np.uint8)
    assert orb_keypoints(np.stack([board] * 3, axis=2)) is None


def test_stage_adds_keypoints_and_they_can_be_switched_off(jpeg):
    data = jpeg(_photo("coffee"))
    on = process_image(data, ImageConfig()).fields
    off = process_image(data, ImageConfig(orb_keypoints=0)).fields
    assert unpack_orb_keypoints(on["orb_keypoints"]) is not None and off["orb_keypoints"] is None
    assert {k: v for k, v in on.items() if k != "orb_keypoints"} == {k: v for k, v in off.items()
                                                                       if k != "orb_keypoints"}


# ---------------------------------------------------------------------------------------------
# Correspondences and the geometric check


def _corr_for(p, q, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [(0, i, float(p[i].real), float(p[i].imag), i,
             float(q[i].real + rng.normal(0, noise)), float(q[i].imag + rng.normal(0, noise))) for i in range(len(p))]


def test_match_keypoints_finds_the_similarity_and_the_overlap():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.1, 0.9, 20) + 1j * rng.uniform(0.1, 1.4, 20)   # points of x (frame 1 x 1.5)
    a = 1.2 * np.exp(1j * np.radians(2.0))                              # x is a 2-degree-rotated crop of y...
    q = a * p + (0.05 + 0.02j)
    inliers, iou = near.match_keypoints(_corr_for(p, q, noise=0.003), (1.0, 1.5), (1.25, 1.9))
    assert inliers == 20
    # the overlap of the aligned frames, counted on a fine grid: in y's frame and mapped back inside x's
    g = np.mgrid[-0.5:2.5:1200j, -0.5:2.5:1200j]
    z = g[1] + 1j * g[0]
    back = (z - (0.05 + 0.02j)) / a
    in_x = (back.real >= 0) & (back.real <= 1.0) & (back.imag >= 0) & (back.imag <= 1.5)
    in_y = (z.real >= 0) & (z.real <= 1.25) & (z.imag >= 0) & (z.imag <= 1.9)
    assert iou == pytest.approx((in_x & in_y).sum() / (in_x | in_y).sum(), abs=0.01)
    # junk correspondences do not change the answer; too few distinct keypoints stop early
    junk = [(9, 100 + k, float(rng.uniform()), float(rng.uniform()), 200 + k, float(rng.uniform()),
             float(rng.uniform())) for k in range(30)]
    assert near.match_keypoints(_corr_for(p, q) + junk, (1.0, 1.5), (1.25, 1.9))[0] == 20
    assert near.match_keypoints(_corr_for(p[:5], q[:5]), (1.0, 1.5), (1.25, 1.9), 7) == (0, 0.0)
    # the same keypoint matched many times counts once
    many = [(0, 0, float(p[0].real), float(p[0].imag), j, float(q[j].real), float(q[j].imag)) for j in range(20)]
    assert near.match_keypoints(many, (1.0, 1.5), (1.25, 1.9))[0] <= 1


def test_match_keypoints_rejects_big_rotation_scale_and_small_overlap():
    rng = np.random.default_rng(2)
    p = rng.uniform(0.05, 0.95, 15) + 1j * rng.uniform(0.05, 0.95, 15)
    for a in (np.exp(1j * np.radians(20)), 2.5):                       # outside the bounds: no hypothesis
        assert near.match_keypoints(_corr_for(p, a * p), (1.0, 1.0), (3.0, 3.0))[0] == 0
    # the right edge of one picture is the left edge of another (two halves of a panorama): every keypoint of
    # the shared strip agrees, but the aligned frames overlap on a sliver
    strip = rng.uniform(0.8, 0.98, 15) + 1j * rng.uniform(0.05, 0.95, 15)
    inliers, iou = near.match_keypoints(_corr_for(strip, strip - 0.78), (1.0, 1.0), (1.0, 1.0))
    assert inliers == 15 and iou < 0.15 and not near.is_keypoint_copy(inliers, iou)


# Keys, buckets and pair verification: tests/test_near_keys.py


# ---------------------------------------------------------------------------------------------
# Beam: rows without keypoints, and earlier outputs' keypoints


def _stored(name, box=None, quality=90):
    img = Image.fromarray(_photo(name))
    if box:
        w, h = img.size
        img = img.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return process_image(buf.getvalue(), ImageConfig()).fields


def test_rows_without_or_with_broken_keypoints_fall_back_to_phash(run_transform):
    orig, crop = _stored("rocket"), _stored("rocket", (0.08, 0.02, 0.95, 0.9), 70)
    rows = [dict(orig, uid="orig", url="http://t/o", caption="a", clip_score=0.9),
            dict(crop, uid="crop", url="http://t/c", caption="a", clip_score=0.5),
            dict(crop, uid="no-kp", url="http://t/n", caption="a", clip_score=0.4, orb_keypoints=None),
            dict(crop, uid="bad-kp", url="http://t/b", caption="a", clip_score=0.3, orb_keypoints=b"junk")]
    ran = run_transform(rows, Dedup(DedupConfig(dedup=("near",))))
    out = {r["uid"]: r["detail"] for r in ran.rejected}
    assert [r["uid"] for r in ran.kept] == ["orig"]
    assert out["crop"] == "duplicate of orig"          # by keypoints (pHash distance > 6 for this crop)
    assert ran.counters["dedup_near_no_keypoints"] == 2
    assert ran.counters["dedup_near_keypoint_copies"] >= 1


def test_earlier_outputs_keypoints_drop_a_new_crop(tmp_path, run_transform):
    """--resume / --chunk-rows: rows already written take part with their stored orb_keypoints."""
    orig, crop = _stored("chelsea"), _stored("chelsea", (0.05, 0.07, 0.92, 1.0), 75)
    shard = tmp_path / "part-0.parquet"
    pq.write_table(pa.Table.from_pylist([{
        "uid": "earlier", "url": "http://t/e", "caption": "cat", "sha256": orig["sha256"], "phash": orig["phash"],
        "orb_keypoints": orig["orb_keypoints"], "width": orig["width"], "height": orig["height"]}]), shard)
    row = dict(crop, uid="new", url="http://t/new", caption="cat", clip_score=0.99)
    ran = run_transform([row], Dedup(DedupConfig(dedup=("near",)), prior_shards=[("curated", str(shard))]))
    assert ran.kept == [] and [(r["uid"], r["detail"]) for r in ran.rejected] == [("new", "duplicate of earlier")]
    assert ran.counters["dedup_near_keypoint_copies"] == 1
