"""Near duplicates of real photos: precision and recall of exact + near dedup, and what the keypoint half costs.

The world (:func:`build_world`, a pure function of the seed) holds scikit-image's real sample photos
(colour and grey), each as an original plus seeded variants: re-encode (JPEG q50-95), resize (0.4-1x), crop
(0-10 % per side, drawn per side), brightness (+-5..15 %), rotation (0.5-3 degrees, then the inscribed
crop), two combinations of all of these, and one crop + resize. "Different photos" it plants on purpose:

- two halves of one large photo (``hubble_deep_field``, overlapping on 12 % of the width);
- a region of a photo (its top-left 55 % x 55 %: the same pixels, another framing) beside the photo itself;
- photos that look alike in their statistics (the textures ``brick``, ``grass``, ``gravel``; the documents
  ``page`` and ``text``).

What counts as the same picture: a copy made from one exposure by the edits above (after aligning, its frame
overlaps the original's by >= 40 % of their union). ``motorcycle_right`` is in ``motorcycle_left``'s group: a
stereo pair shows one view from a camera shifted ~6 % of the frame (the median disparity), less than the crops
dedup has to catch, so no frame-level rule can keep them apart without missing crops. The test
``tests/test_near_dup_real.py`` runs the world through the real Beam stages (DecodeResize, then Dedup with
``dedup=("exact", "near")``).

    python bench/near_dup_real.py                 # seeds 0-4: precision / recall, per variant kind
    python bench/near_dup_real.py --cost          # CPU ms per image (pHash, keypoints), keys and pairs per row
    python bench/near_dup_real.py --scale 500 1000 2000 4000   # distinct crops: pairs per row, false-match margin
    python bench/near_dup_real.py --beam 2000     # the Dedup transform on the DirectRunner, with/without keypoints
    python bench/near_dup_real.py --key-points 32 # another key budget (keys per row = 4 x key points)
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "1")

#: Distinct originals (``cat`` is ``chelsea`` again, so it is left out).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera", "moon", "immunohistochemistry", "clock",
          "cell", "brick", "grass", "gravel", "retina", "page", "text")
#: Photos that also get a "region" twin: their top-left 55 % x 55 %, a different picture.
REGION_OF = ("astronaut", "coffee", "rocket", "retina")
VARIANTS = ("reencode", "resize", "crop", "brightness", "rotate", "combo1", "combo2", "crop_resize")
_OPS = {"reencode": (), "resize": ("resize",), "crop": ("crop",), "brightness": ("bright",), "rotate": ("rot",),
        "combo1": ("rot", "crop", "bright", "resize"), "combo2": ("rot", "crop", "bright", "resize"),
        "crop_resize": ("crop", "resize")}


@dataclass(frozen=True)
class Photo:
    """One row of the world: ``group`` names the picture it is a copy of; ``kind`` how it was made."""

    uid: str
    data: bytes
    group: str
    kind: str


def _u8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        arr = (255 * (arr - arr.min()) / max(np.ptp(arr), 1e-9)).astype(np.uint8)
    return arr


def originals() -> dict[str, Image.Image]:
    """The distinct pictures of the world, by group name (RGB)."""
    from skimage import data

    out = {name: Image.fromarray(_u8(getattr(data, name)())).convert("RGB") for name in PHOTOS}
    left, right, _ = data.stereo_motorcycle()
    out["motorcycle"] = Image.fromarray(left)
    hubble = Image.fromarray(data.hubble_deep_field())  # 1000 x 872: two halves overlapping on 120 px
    out["hubble_west"] = hubble.crop((0, 0, 560, hubble.height))
    out["hubble_east"] = hubble.crop((440, 0, hubble.width, hubble.height))
    for name in REGION_OF:
        w, h = out[name].size
        out[f"{name}_region"] = out[name].crop((0, 0, round(0.55 * w), round(0.55 * h)))
    out["_stereo_right"] = Image.fromarray(right)
    return out


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate about the centre, then crop the largest centred rectangle of the same aspect with no border."""
    import cv2

    arr = np.asarray(img)
    h, w = arr.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    out = cv2.warpAffine(arr, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
    t = abs(np.radians(degrees))
    s = 1 / (np.cos(t) + np.sin(t) * max(w / h, h / w))
    cw, ch = int(w * s), int(h * s)
    x, y = (w - cw) // 2, (h - ch) // 2
    return Image.fromarray(np.ascontiguousarray(out[y:y + ch, x:x + cw]))


def variant(img: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """One seeded copy of ``img`` (see the module docstring), JPEG-encoded at quality 50-95."""
    for op in _OPS[kind]:
        if op == "rot":
            img = rotate(img, float(rng.choice([-1, 1]) * rng.uniform(0.5, 3.0)))
        elif op == "crop":
            left, top, right, bottom = rng.uniform(0, 0.10, size=4)
            w, h = img.size
            img = img.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))
        elif op == "bright":
            factor = 1 + float(rng.choice([-1, 1]) * rng.uniform(0.05, 0.15))
            img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) * factor, 0, 255).astype(np.uint8))
        elif op == "resize":
            f = rng.uniform(0.4, 1.0)
            img = img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))), Image.Resampling.BICUBIC)
    return jpeg(img, rng.integers(50, 96))


def build_world(seed: int = 0) -> list[Photo]:
    """Every original (JPEG q90) and its variants; region twins get two variants; the stereo twin joins the
    motorcycle group. Deterministic in ``seed``."""
    rows = []
    pics = originals()
    for index, (name, img) in enumerate(sorted(pics.items())):
        if name.startswith("_"):
            continue
        rng = np.random.default_rng([seed, index])
        rows.append(Photo(f"{name}-orig", jpeg(img, 90), name, "orig"))
        kinds = ("reencode", "combo1") if name.endswith("_region") else VARIANTS
        rows += [Photo(f"{name}-{k}", variant(img, k, rng), name, k) for k in kinds]
        if name == "motorcycle":
            rows.append(Photo("motorcycle-stereo_right", jpeg(pics["_stereo_right"], 90), name, "stereo_right"))
    return rows


# ---------------------------------------------------------------------------------------------
# Scoring (shared with the test)

def score(world: list[Photo], outcome: dict[str, tuple[str, str]]) -> dict:
    """Precision, recall and wrong merges of dedup decisions ``{uid: (reason or "kept", detail)}``.

    A drop is right when the row its detail names (``duplicate of <uid>``) is in the same group; recall is
    right drops over the drops a perfect dedup makes (every row of a group but one)."""
    group = {p.uid: p.group for p in world}
    kind = {p.uid: p.kind for p in world}
    sizes: dict[str, int] = {}
    for p in world:
        sizes[p.group] = sizes.get(p.group, 0) + 1
    dropped = {u: d for u, (r, d) in outcome.items() if r != "kept"}
    wrong = sorted((u, d.rsplit(" ", 1)[-1]) for u, d in dropped.items() if group.get(d.rsplit(" ", 1)[-1]) != group[u])
    right = len(dropped) - len(wrong)
    should = sum(n - 1 for n in sizes.values())
    missed_groups = {g for g in sizes if sum(1 for u in group if group[u] == g and u not in dropped) > 1}
    kept_by_kind: dict[str, list[int]] = {}
    for u, k in kind.items():
        kept_by_kind.setdefault(k, [0, 0])
        kept_by_kind[k][0] += u in dropped
        kept_by_kind[k][1] += 1
    return {"rows": len(world), "dropped": len(dropped), "precision": right / max(len(dropped), 1),
            "recall": right / max(should, 1), "wrong": wrong, "groups_with_extra_copies": sorted(missed_groups),
            "dropped_by_kind": {k: f"{a}/{b}" for k, (a, b) in sorted(kept_by_kind.items())}}


def run_stages(world: list[Photo], workdir: str, orb_keypoints: int | None = None) -> dict[str, tuple[str, str]]:
    """The world through the real Beam stages: DecodeResize, then Dedup(exact, near). Returns
    ``{uid: ("kept" | reason, detail)}`` (image-stage rejections included, so every row is accounted for)."""
    import apache_beam as beam

    from clip_curate.stages.dedup import Dedup, DedupConfig
    from clip_curate.stages.image import DecodeResize, ImageConfig

    cfg = ImageConfig() if orb_keypoints is None else ImageConfig(orb_keypoints=orb_keypoints)
    src = os.path.join(workdir, "world.pkl")
    with open(src, "wb") as f:
        pickle.dump([{"uid": p.uid, "url": f"http://photos.test/{p.uid}.jpg", "caption": p.group,
                      "image_bytes": p.data} for p in world], f)
    out = os.path.join(workdir, "out")
    with beam.Pipeline() as pipe:
        rows = (pipe | beam.Create([src]) | beam.FlatMap(lambda path: pickle.load(open(path, "rb"))))
        images, bad = rows | DecodeResize(cfg)
        kept, dropped = images | Dedup(DedupConfig(dedup=("exact", "near")))
        lines = ((kept | "K" >> beam.Map(lambda r: json.dumps([r["uid"], "kept", ""]))),
                 (dropped | "D" >> beam.Map(lambda r: json.dumps([r["uid"], r["reason"], r["detail"]]))),
                 (bad | "B" >> beam.Map(lambda r: json.dumps([r["uid"], "image/" + r["reason"], r["detail"]]))))
        lines | beam.Flatten() | beam.io.WriteToText(out)
    outcome = {}
    for path in sorted(glob.glob(out + "*")):
        for line in open(path):
            uid, reason, detail = json.loads(line)
            assert uid not in outcome, f"{uid} output twice"
            outcome[uid] = (reason, detail)
    return outcome


# ---------------------------------------------------------------------------------------------
# Cost

def keypoint_dedup(rows: list[tuple[str, bytes]], min_inliers: int | None = None) -> dict:
    """The keypoint half's pure functions over ``rows`` (``(uid, orb_keypoints blob)``, equal scores) as the
    Beam wiring runs them: keys per row, buckets, each bucket verified with one shared signature cache.
    Returns keys and verified pairs per row, the pairs (``{(worse, better): (inliers, iou)}``; with
    ``min_inliers`` below the threshold, pairs are matched on to that count, which costs more than the
    product's check) and the CPU seconds."""
    from clip_curate.stages.dedup import near

    t0 = time.process_time()
    buckets: dict = {}
    n_keys = 0
    for uid, blob in rows:
        sig = near.Signature.of(blob)
        if sig is None:
            continue
        n_keys += len(sig.keys)
        member = ((0.0, 0, uid), blob)
        for key in sig.keys:
            buckets.setdefault(key, []).append(member)
    cache: dict = {}
    pairs: dict = {}
    for key, members in buckets.items():
        if len(members) < 2:
            continue
        ms = sorted(members, key=lambda m: m[0])
        sigs = []
        for m in ms:
            if m[1] not in cache:
                cache[m[1]] = near.Signature.of(m[1])
            sigs.append(cache[m[1]])
        for x, y in near.bucket_pairs(key, ms, sigs):
            if min_inliers is None:
                pairs[ms[x][0][2], ms[y][0][2]] = near.verify_pair(sigs[x], sigs[y])
            else:
                corr = near.pair_correspondences(sigs[x], sigs[y])
                pairs[ms[x][0][2], ms[y][0][2]] = near._match(corr, sigs[x].frame, sigs[y].frame, min_inliers)
    return {"keys": n_keys, "pairs": pairs, "cpu_s": time.process_time() - t0}


def cost(world: list[Photo], rounds: int = 3) -> dict:
    """CPU ms per image of pHash and of the ORB keypoints on the stored image, and the keypoint half's keys
    per row, verified row pairs per row and CPU per row (through its pure functions)."""
    import cv2

    from clip_curate.stages.image import ImageConfig, orb_keypoints, phash_hex, process_image

    cv2.setNumThreads(1)
    cfg = ImageConfig()
    stored = [np.asarray(Image.open(io.BytesIO(process_image(p.data, cfg).fields["image"])).convert("RGB"))
              for p in world]
    timings = {}
    for name, fn in (("phash", phash_hex), ("orb_keypoints", orb_keypoints)):
        t0 = time.process_time()
        for _ in range(rounds):
            for arr in stored:
                fn(arr)
        timings[name] = 1000 * (time.process_time() - t0) / (rounds * len(stored))
    blobs = [(p.uid, orb_keypoints(a)) for p, a in zip(world, stored)]
    cpu = min(keypoint_dedup(blobs)["cpu_s"] for _ in range(rounds))
    res = keypoint_dedup(blobs)
    timings["keypoint_dedup_cpu_ms_per_row"] = 1000 * cpu / len(world)
    return {"rows": len(world), "cpu_ms_per_image": {k: round(v, 2) for k, v in timings.items()},
            "keypoint_keys_per_row": round(res["keys"] / len(world), 1),
            "row_pairs_verified_per_row": round(len(res["pairs"]) / len(world), 2),
            "orb_keypoints_bytes_per_row": round(np.mean([len(b or b"") for _, b in blobs]))}


def crops_world(n: int, seed: int = 0) -> list[tuple[str, np.ndarray, str, tuple]]:
    """``n`` crops (30-60 % of each side, random position, a random multiple of 90 degrees) of the world's
    originals: ``(uid, stored RGB array, source, box)``. Crops of one source whose boxes overlap by < 20 % of
    their union are different pictures; they and crops of different sources are the false-match test."""
    from clip_curate.stages.image import ImageConfig, process_image

    rng = np.random.default_rng(seed)
    pics = {k: v for k, v in originals().items() if not k.startswith("_") and not k.endswith("_region")}
    names = sorted(pics)
    cfg = ImageConfig(orb_keypoints=0)
    out = []
    for k in range(n):
        name = names[k % len(names)]
        img = pics[name]
        fw, fh = rng.uniform(0.3, 0.6, size=2)
        x0, y0 = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
        box = (x0, y0, x0 + fw, y0 + fh)
        crop = img.crop((round(box[0] * img.width), round(box[1] * img.height), round(box[2] * img.width),
                         round(box[3] * img.height))).rotate(90 * int(rng.integers(0, 4)), expand=True)
        fields = process_image(jpeg(crop, int(rng.integers(60, 95))), cfg).fields
        out.append((f"crop{k}", np.asarray(Image.open(io.BytesIO(fields["image"])).convert("RGB")), name, box))
    return out


def _iou(a: tuple, b: tuple) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def scale(sizes: tuple[int, ...]) -> list[dict]:
    """The keypoint half on growing sets of distinct crops: keys and verified row pairs per row, CPU per row
    (as the product runs it), and the unrelated pairs that reach each inlier count (false-match margin)."""
    from clip_curate.stages.dedup.near import LOCAL_MIN_IOU
    from clip_curate.stages.image import orb_keypoints

    world = crops_world(max(sizes))
    blobs = [(uid, orb_keypoints(arr)) for uid, arr, _, _ in world]
    results = []
    for n in sizes:
        cpu = keypoint_dedup(blobs[:n])["cpu_s"]
        res = keypoint_dedup(blobs[:n], 3)
        info = {u: (src, box) for u, _, src, box in world[:n]}
        reach = {k: 0 for k in range(3, 9)}  # the threshold is LOCAL_MIN_INLIERS
        for (x, y), (inliers, iou) in res["pairs"].items():
            (sx, bx), (sy, by) = info[x], info[y]
            unrelated = sx != sy or _iou(bx, by) < 0.2
            if unrelated and iou >= LOCAL_MIN_IOU:
                for k in reach:
                    reach[k] += inliers >= k
        results.append({"rows": n, "keys_per_row": round(res["keys"] / n, 1),
                        "row_pairs_verified_per_row": round(len(res["pairs"]) / n, 2),
                        "dedup_cpu_ms_per_row": round(1000 * cpu / n, 2),
                        "unrelated_pairs_with_iou_ok_reaching_inliers": reach})
    return results


def beam_cost(n: int) -> list[dict]:
    """Wall time of the real Dedup(exact, near) transform on the DirectRunner over ``n`` distinct crops, with
    and without their keypoints (the rows carry what the image stage stored)."""
    import apache_beam as beam

    from clip_curate.stages.dedup import Dedup, DedupConfig
    from clip_curate.stages.image import orb_keypoints, phash_hex

    rows = [{"uid": uid, "url": f"http://crops.test/{uid}", "caption": src, "sha256": uid, "phash": phash_hex(arr),
             "orb_keypoints": orb_keypoints(arr), "width": arr.shape[1], "height": arr.shape[0]}
            for uid, arr, src, _ in crops_world(n)]
    out = []
    for label, keep in (("pHash only", False), ("pHash + keypoints", True)):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "rows.pkl")
            with open(src, "wb") as f:
                pickle.dump([r if keep else dict(r, orb_keypoints=None) for r in rows], f)
            t0 = time.monotonic()
            with beam.Pipeline() as pipe:
                kept, dropped = (pipe | beam.Create([src]) | beam.FlatMap(lambda p: pickle.load(open(p, "rb")))
                                 | Dedup(DedupConfig(dedup=("exact", "near"))))
                _ = (kept, dropped) | beam.Flatten() | beam.combiners.Count.Globally()
            wall = time.monotonic() - t0
        out.append({"rows": n, "near": label, "wall_s": round(wall, 1), "ms_per_row": round(1000 * wall / n, 1)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="worlds to run (seeds 0..N-1)")
    p.add_argument("--orb-keypoints", type=int, default=None, help="image stage --orb-keypoints (0: pHash only)")
    p.add_argument("--cost", action="store_true", help="measure CPU cost instead")
    p.add_argument("--scale", type=int, nargs="*", default=None, metavar="N",
                   help="keypoint path on N distinct crops (e.g. 500 1000 2000 4000): pairs and false-match margin")
    p.add_argument("--beam", type=int, default=0, metavar="N",
                   help="wall time of the Dedup transform on the DirectRunner over N distinct crops")
    p.add_argument("--key-points", type=int, default=None, metavar="T",
                   help="keypoints whose code bands are a row's keys (default: near.LOCAL_KEY_POINTS)")
    p.add_argument("--filter-points", type=int, default=None, metavar="T2",
                   help="keypoints whose code bands a row pair must share --min-shared-keys of "
                        "(default: near.LOCAL_FILTER_POINTS)")
    p.add_argument("--min-shared-keys", type=int, default=None, metavar="S",
                   help="keys a row pair must share to be verified (default: near.LOCAL_MIN_SHARED_KEYS)")
    args = p.parse_args(argv)
    from clip_curate.stages.dedup import near

    if args.key_points is not None:
        near.LOCAL_KEY_POINTS = args.key_points
    if args.filter_points is not None:
        near.LOCAL_FILTER_POINTS = args.filter_points
    if args.min_shared_keys is not None:
        near.LOCAL_MIN_SHARED_KEYS = args.min_shared_keys
    print(json.dumps({"key_points": near.LOCAL_KEY_POINTS, "filter_points": near.LOCAL_FILTER_POINTS,
                      "min_shared_keys": near.LOCAL_MIN_SHARED_KEYS}))
    if args.cost:
        print(json.dumps(cost(build_world(0)), indent=1))
        return 0
    if args.scale:
        for res in scale(tuple(args.scale)):
            print(json.dumps(res))
        return 0
    if args.beam:
        for res in beam_cost(args.beam):
            print(json.dumps(res))
        return 0
    totals = []
    for seed in range(args.seeds):
        world = build_world(seed)
        with tempfile.TemporaryDirectory() as tmp:
            res = score(world, run_stages(world, tmp, args.orb_keypoints))
        totals.append(res)
        print(json.dumps({"seed": seed, **res}))
    print(json.dumps({"seeds": args.seeds, "rows": sum(r["rows"] for r in totals),
                      "precision_min": round(min(r["precision"] for r in totals), 4),
                      "recall_min": round(min(r["recall"] for r in totals), 4),
                      "recall_mean": round(float(np.mean([r["recall"] for r in totals])), 4),
                      "wrong_merges": sum(len(r["wrong"]) for r in totals)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
