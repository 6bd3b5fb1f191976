"""Dedup: exact, near (pHash LSH), semantic (SemDeDup), decontamination; order/worker independence."""
import io
import random

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image, ImageEnhance

from clip_curate import records
from clip_curate.dedup import (Dedup, DedupConfig, band_keys, bucket_decisions, load_eval_set, eval_match,
                               normalize_url, popcount64, rank_key)
from clip_curate.image import ImageConfig, process_image
from clip_curate.options import ConfigError

skdata = pytest.importorskip("skimage.data")
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field",
          "motorcycle_left", "retina", "page", "horse", "text", "moon", "coins", "clock", "colorwheel", "logo"]


def _jpeg(img, q=90):
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _variants(img, rng):
    w, h = img.size
    c = rng.uniform(0.02, 0.05)  # <= 10 % of each side in total
    return {
        "reencode": _jpeg(img, 60),
        "resize": _jpeg(img.resize((int(w * 0.6), int(h * 0.6)))),
        "crop": _jpeg(img.crop((int(w * c), int(h * c), w - int(w * c), h - int(h * c)))),
        "colour": _jpeg(ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(1.08)).enhance(1.1)),
    }


def _photo_rows():
    """Originals + 4 near variants each; plus distinct crops of other regions (negatives)."""
    rng = random.Random(0)
    rows, truth = [], {}
    cfg = ImageConfig(image_size=256)
    for name in PHOTOS:
        try:
            arr = getattr(skdata, name)()
        except Exception:
            continue
        img = Image.fromarray(arr).convert("RGB")
        items = {"orig": _jpeg(img), **_variants(img, rng)}
        for v, data in items.items():
            res = process_image(data, cfg)
            uid = f"{name}-{v}"
            rows.append({"uid": uid, "url": f"http://x.test/{uid}.jpg", "caption": name,
                         "clip_score": 0.5 if v == "orig" else 0.3, **res.fields})
            truth[uid] = name
    return rows, truth


def run_dedup(rows, cfg, workers=1, shuffle=False, repeated=()):
    rows = list(rows)
    if shuffle:
        random.Random(7).shuffle(rows)
    opts = PipelineOptions(direct_num_workers=workers, direct_running_mode="multi_processing" if workers > 1
                           else "in_memory")
    with beam.Pipeline(options=opts) as p:
        kept, rejected = p | beam.Create(rows) | Dedup(cfg, estimated_rows=len(rows))
        kept | "K" >> beam.Map(lambda r: ("kept", r["uid"], "", "")) | "WK" >> beam.io.WriteToText(str(_OUT) + "/k")
        rejected | "R" >> beam.Map(lambda r: ("rej", r["uid"], r["reason"], r["detail"])) | "WR" >> beam.io.WriteToText(str(_OUT) + "/r")
    import ast
    import glob
    out = {}
    for f in glob.glob(str(_OUT) + "/*"):
        for line in open(f):
            t = ast.literal_eval(line)
            key = (t[1], t[0]) if t[1] in repeated else t[1]
            assert key not in out, f"{t[1]} output twice"
            out[key] = t
    import shutil
    shutil.rmtree(_OUT)
    return out


@pytest.fixture(autouse=True)
def _outdir(tmp_path):
    global _OUT
    _OUT = tmp_path / "o"


def _pr(out, truth, reason):
    """precision/recall of dropping: a drop is correct when its group has a kept member."""
    groups = {}
    for uid, g in truth.items():
        groups.setdefault(g, []).append(uid)
    should_drop = sum(len(v) - 1 for v in groups.values())
    dropped = [u for u, t in out.items() if t[0] == "rej" and t[2] == reason]
    correct = sum(1 for u in dropped if truth[u] == truth[out[u][3].split()[-1]])
    return correct / max(len(dropped), 1), correct / max(should_drop, 1)


def test_pure_helpers():
    assert normalize_url("HTTP://Example.COM:80/a?b=1#frag") == "http://example.com/a?b=1"
    keys = band_keys(0xFFFF_0000_FFFF_0000, 6)
    assert len(keys) == 7
    assert popcount64(np.array([0b1011, 0], dtype=np.uint64)).tolist() == [3, 0]
    assert rank_key({"uid": "b", "clip_score": 0.9}) < rank_key({"uid": "a", "clip_score": 0.1})
    assert rank_key({"uid": "a", "width": 10, "height": 10}) < rank_key({"uid": "b", "width": 5, "height": 5})
    members = [{"uid": "x", "rank": (0, 0, "x"), "phash": 0}, {"uid": "y", "rank": (1, 0, "y"), "phash": 0b111}]
    assert list(bucket_decisions(members, "near", DedupConfig(near_dup_hamming=3))) == [("y", ("duplicate_near", "x"))]
    assert list(bucket_decisions(members, "near", DedupConfig(near_dup_hamming=2))) == []
    with pytest.raises(ConfigError, match="--dedup: unknown kind"):
        DedupConfig(dedup=("exact", "fuzzy"))


def test_near_duplicates_of_real_photos_precision_recall_and_order_independence():
    rows, truth = _photo_rows()
    cfg = DedupConfig(dedup=("near",), near_dup_hamming=12)  # crops of 2-5 % per side need ~12 with pHash
    out = run_dedup(rows, cfg)
    precision, recall = _pr(out, truth, "duplicate_near")
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)
    for name in {v for v in truth.values()}:
        if f"{name}-orig" in out:
            assert out[f"{name}-orig"][0] == "kept"  # best-ranked (highest clip_score) survives
    assert run_dedup(rows, cfg, workers=2, shuffle=True) == out


def test_exact_by_sha_and_url_and_repeated_uid():
    base = {"caption": "c", "width": 10, "height": 10, "phash": "0" * 16}
    rows = [dict(base, uid="a", url="http://h.test/1", sha256="s1", clip_score=0.2),
            dict(base, uid="b", url="http://h.test/2", sha256="s1", clip_score=0.9),   # same bytes, better
            dict(base, uid="c", url="HTTP://H.test:80/1", sha256="s3", clip_score=0.1),  # same URL as a
            dict(base, uid="d", url="http://h.test/4", sha256="s4", clip_score=0.1),
            dict(base, uid="d", url="http://h.test/4", sha256="s4", clip_score=0.1)]    # same uid twice
    out = run_dedup(rows, DedupConfig(dedup=("exact",)), repeated=("d",))
    assert out["b"][0] == "kept"
    assert out["a"][2] == "duplicate_exact" and out["a"][3] == "duplicate of b"
    assert out["c"][2] == "duplicate_exact" and out["c"][3] == "duplicate of a"  # a is better ranked than c
    assert out[("d", "kept")] and out[("d", "rej")][3] == "same uid as kept row d"
    assert len(out) == 5


def test_semantic_dedup_on_clustered_embeddings():
    rng = np.random.default_rng(0)
    d, rows, truth = 64, [], {}
    centres = rng.standard_normal((40, d))
    for g in range(400):
        base = centres[g % 40] + 0.8 * rng.standard_normal(d)
        base /= np.linalg.norm(base)
        for j in range(2 if g % 2 else 1):  # half the groups have a near-identical twin
            v = base + (0.01 * rng.standard_normal(d) if j else 0)
            v = (v / np.linalg.norm(v)).astype(np.float32)
            uid = f"g{g}-{j}"
            rows.append({"uid": uid, "url": f"http://s.test/{uid}", "sha256": uid, "phash": None,
                         "clip_score": 0.5 - 0.1 * j, "image_embedding": v})
            truth[uid] = g
    cfg = DedupConfig(dedup=("semantic",), semantic_threshold=0.95, semantic_clusters=8, semantic_max_group=40)
    out = run_dedup(rows, cfg)
    precision, recall = _pr(out, truth, "duplicate_semantic")
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)


def test_decontamination_catches_resized_and_reencoded_eval_images(tmp_path):
    rows, _ = _photo_rows()
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    for name in ("coffee", "rocket"):
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        (eval_dir / f"{name}.png").write_bytes(_png(img.resize((300, 200))))
    ev = load_eval_set(str(eval_dir))
    assert len(ev.phashes) == 2
    out = run_dedup(rows, DedupConfig(dedup=(), decontaminate=str(eval_dir), decontaminate_hamming=10))
    leaked = {u for u, t in out.items() if t[2] == "eval_leak"}
    assert {u for u in leaked if u.startswith(("coffee", "rocket"))} == leaked
    assert len([u for u in leaked if u.startswith("coffee")]) >= 4 and len([u for u in leaked if u.startswith("rocket")]) >= 4
    assert all("eval item" in out[u][3] for u in leaked)


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
