"""Dedup: exact, near (pHash LSH), semantic (SemDeDup), decontamination; the shared rule; worker/order independence.

Ground truth: real photos (scikit-image) turned into re-encoded / resized / cropped / colour-shifted variants,
the synthetic world (``clip_curate.synthetic.world``) with its exact/near duplicates and eval leaks, and clustered
synthetic embeddings with planted near-identical twins.
"""
import io
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from clip_curate.stages.dedup import (Dedup, DedupConfig, band_keys, bucket_decisions, explain, fit_semantic_model,
                               load_eval_set, near_best_dropper, normalize_url, popcount64, rank_key,
                               semantic_best_dropper, semantic_keys)
from clip_curate.stages.image import ImageConfig, process_image
from clip_curate.fields import ConfigError
from clip_curate.synthetic import world

# Distinct photos (``cat`` is the same picture as ``chelsea``, so it is left out).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field",
          "retina", "page", "horse", "text", "moon", "coins", "clock", "colorwheel", "logo", "brick", "grass",
          "gravel", "cell")
VARIANTS = world.NEAR_DUP_VARIANTS  # reencode, resize, crop (<= 10 % of the area), colour_shift
IMG_CFG = ImageConfig(image_size=256)


def _photo(name):
    arr = getattr(skdata, name)()
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        arr = (255 * (arr - arr.min()) / max(np.ptp(arr), 1e-9)).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


@pytest.fixture(scope="module")
def _photo_set(jpeg):
    """Each photo as an original + one variant of each kind, through the real image stage; plus crops of
    other regions of the same photo (distinct images, must stay). Returns rows and group truth."""
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    emb_rng = np.random.default_rng(1)
    for name in PHOTOS:
        img = _photo(name)
        data = jpeg(img)
        base = emb_rng.standard_normal(64)
        items = [("orig", data, name)] + [(v, world.near_duplicate(data, rng, v)[0], name) for v in VARIANTS]
        w, h = img.size
        items.append(("region", jpeg(img.crop((0, 0, w // 2, h // 2))), name + "-region"))
        for variant, blob, group in items:
            res = process_image(blob, IMG_CFG)
            assert res.fields, (name, variant)
            emb = base + (0.02 * emb_rng.standard_normal(64) if variant != "orig" else 0)
            if variant == "region":
                emb = emb_rng.standard_normal(64)
            uid = f"{name}-{variant}"
            rows.append({"uid": uid, "url": f"http://photos.test/{uid}.jpg", "caption": name,
                         "clip_score": 0.5 if variant == "orig" else 0.3,
                         "image_embedding": (emb / np.linalg.norm(emb)).astype(np.float32), **res.fields})
            truth[uid] = group
    return rows, truth


@pytest.fixture
def photo_rows(_photo_set):
    """A fresh copy of the photo rows and their group truth (tests may change them)."""
    return [dict(r) for r in _photo_set[0]], dict(_photo_set[1])


@pytest.fixture(scope="session")
def run_dedup(run_transform):
    def run(rows, cfg, workers=1, shuffle=False, seed=7):
        """Run Dedup on the DirectRunner; returns one line per output row, ``[uid, "kept", ""]`` or
        ``[uid, reason, detail, stage]``, and, with one worker, the committed counters."""
        rows = list(rows)
        if shuffle:
            random.Random(seed).shuffle(rows)
        options = [f"--direct_num_workers={workers}",
                   f"--direct_running_mode={'multi_processing' if workers > 1 else 'in_memory'}"]
        ran = run_transform(rows, Dedup(cfg), options=options, via_file=True, reshuffle=True, all_namespaces=True)
        lines = ([[r["uid"], "kept", ""] for r in ran.kept]
                 + [[r["uid"], r["reason"], r["detail"], r["stage"]] for r in ran.rejected])
        return lines, (ran.counters if workers == 1 else {})
    return run


def decisions(lines):
    out = {}
    for line in lines:
        assert line[0] not in out, f"{line[0]} output twice"
        if line[1] != "kept":
            assert line[3] == "dedup"
        out[line[0]] = (line[1], line[2])
    return out


def precision_recall(out, truth, reasons):
    """A drop is right when the row it names as kept is in the same truth group."""
    groups = {}
    for uid, g in truth.items():
        groups.setdefault(g, []).append(uid)
    should_drop = sum(len(v) - 1 for v in groups.values())
    dropped = [u for u, (r, _) in out.items() if r in reasons]
    right = sum(1 for u in dropped if truth.get(out[u][1].rsplit(" ", 1)[-1]) == truth[u])
    return right / max(len(dropped), 1), right / max(should_drop, 1)


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("kwargs, flag", [
    (dict(dedup=("exact", "fuzzy")), "--dedup"),
    (dict(near_dup_hamming=40), "--near-dup-hamming"),
    (dict(near_dup_hamming=-1), "--near-dup-hamming"),
    (dict(decontaminate_hamming=33), "--decontaminate-hamming"),
    (dict(semantic_threshold=0), "--semantic-threshold"),
    (dict(semantic_threshold=1.5), "--semantic-threshold"),
    (dict(decontaminate_threshold=-0.1), "--decontaminate-threshold"),
    (dict(semantic_sample=5), "--semantic-sample"),
    (dict(semantic_max_group=1), "--semantic-max-group"),
    (dict(semantic_clusters=-2), "--semantic-clusters"),
    (dict(semantic_clusters=500, semantic_sample=1000), "--semantic-sample"),
])
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        DedupConfig(**kwargs)


def test_config_kinds_and_activity():
    assert DedupConfig(dedup=("none",)).dedup == () and not DedupConfig(dedup=("none",)).active
    assert DedupConfig(dedup=(" Near", "exact", "near")).dedup == ("near", "exact")
    assert DedupConfig().dedup == ("exact", "near")
    assert DedupConfig(dedup=(), decontaminate="x").active


def test_bad_decontaminate_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--decontaminate: not found"):
        Dedup(DedupConfig(decontaminate=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no eval images"):
        DedupConfig(decontaminate=str(tmp_path / "empty")).validate_environment()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ConfigError, match="cannot decode eval image broken.jpg"):
        load_eval_set(str(bad))
    (tmp_path / "notparquet.txt").write_text("hello")
    with pytest.raises(ConfigError, match="not a directory of images or a Parquet"):
        load_eval_set(str(tmp_path / "notparquet.txt"))


# ---------------------------------------------------------------------------------------------
# Pure core


def test_rank_and_url_normalisation():
    assert normalize_url("HTTP://Example.COM:80/a?b=1#frag") == "http://example.com/a?b=1"
    assert normalize_url("https://x.test:443") == "https://x.test/"
    assert normalize_url("https://x.test:8443/p") == "https://x.test:8443/p"
    assert normalize_url("http://[::1") == "http://[::1"  # unparseable: kept as is
    assert rank_key({"uid": "b", "clip_score": 0.9}) < rank_key({"uid": "a", "clip_score": 0.1})
    assert rank_key({"uid": "b", "clip_score": 0.1}) < rank_key({"uid": "a", "clip_score": None})
    assert rank_key({"uid": "b", "clip_score": 0.1}) < rank_key({"uid": "a", "clip_score": float("nan")})
    assert rank_key({"uid": "b", "width": 10, "height": 10}) < rank_key({"uid": "a", "width": 5, "height": 5})
    assert rank_key({"uid": "b", "width": 256, "height": 256, "original_width": 900, "original_height": 900}) < \
        rank_key({"uid": "a", "width": 256, "height": 256, "original_width": 300, "original_height": 300})
    assert rank_key({"uid": "a"}) < rank_key({"uid": "b"})


def test_band_keys_pigeonhole_guarantee():
    rng = np.random.default_rng(0)
    for h in (0, 3, 6, 12):
        assert len(band_keys(0, h)) == h + 1
        for _ in range(300):
            a = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
            flips = rng.choice(64, size=h, replace=False)
            b = a
            for f in flips:
                b ^= 1 << int(f)
            assert set(band_keys(a, h)) & set(band_keys(b, h))
    assert popcount64(np.array([0b1011, 0, 2**64 - 1], dtype=np.uint64)).tolist() == [3, 0, 64]


def _brute_near(h, t):
    out = np.full(len(h), -1)
    for i in range(len(h)):
        close = popcount64(h[:i] ^ h[i]) <= t
        if close.any():
            out[i] = int(np.argmax(close))
    return out


def test_near_best_dropper_equals_all_pairs():
    rng = np.random.default_rng(3)
    for trial in range(12):
        n, t = int(rng.integers(2, 2500)), int(rng.integers(0, 13))
        base = rng.integers(0, 2**63, size=max(1, n // 5), dtype=np.uint64)
        h = base[rng.integers(0, len(base), n)]
        for _ in range(3):
            flip = rng.random(n) < 0.5
            h[flip] ^= np.uint64(1) << rng.integers(0, 64, size=int(flip.sum())).astype(np.uint64)
        if trial % 3 == 0:
            h[: n // 3] = h[0]                 # many identical hashes (blank images)
        if trial % 4 == 0:
            h &= np.uint64(0xFFFFF)            # low-entropy hashes: large buckets
        assert (near_best_dropper(h, t) == _brute_near(h, t)).all(), (trial, n, t)


def test_semantic_best_dropper_equals_all_pairs():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1500, 32)).astype(np.float32)
    x[700:1000] = x[:300] + 0.05 * rng.standard_normal((300, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    found = semantic_best_dropper(x, 0.95, block=128)
    sims = x @ x.T
    ref = np.array([int(np.argmax(sims[i, :i] >= 0.95)) if (sims[i, :i] >= 0.95).any() else -1
                    for i in range(len(x))])
    assert (found == ref).all() and (found >= 0).sum() >= 300


def test_bucket_rule_is_order_independent_and_drops_even_when_dropper_is_dropped():
    # Chain a > b > c: a~b and b~c, a and c far. b is dropped by a; c is dropped by b although b is dropped.
    members = [("c", (0.0, 0, "c"), 0b1100), ("a", (-0.9, 0, "a"), 0b0000), ("b", (-0.5, 0, "b"), 0b0100)]
    got = sorted(bucket_decisions(members, "near", 1))
    assert got == [("b", ("duplicate_near", "a", (-0.9, 0, "a"))), ("c", ("duplicate_near", "b", (-0.5, 0, "b")))]
    for perm in ([1, 2, 0], [2, 0, 1], [0, 2, 1]):
        assert sorted(bucket_decisions([members[i] for i in perm], "near", 1)) == got
    assert list(bucket_decisions(members, "near", 0)) == []
    # exact: everybody but the best; the same uid twice is one member
    assert sorted(u for u, _ in bucket_decisions(members + [members[0]], "exact", 0)) == ["b", "c"]
    # explain: eval_leak first, then exact, near, semantic; the best-ranked *kept* dropper is named
    assert explain([("duplicate_near", "y", (0,)), ("eval_leak", "eval item e1", None)], set())[0] == "eval_leak"
    assert explain([("duplicate_near", "y", (0,)), ("duplicate_near", "z", (1,))], {"z"}) == \
        ("duplicate_near", "duplicate of z")
    assert explain([("duplicate_near", "y", (0,))], set()) == ("duplicate_near", "duplicate of dropped row y")


# ---------------------------------------------------------------------------------------------
# Beam: exact


def test_exact_by_url_sha_caption_pairs_and_repeated_uid(run_dedup):
    base = {"width": 10, "height": 10, "phash": "0" * 16}
    rows = [dict(base, uid="a", url="http://h.test/1", caption="one", sha256="s1", clip_score=0.2),
            dict(base, uid="b", url="http://h.test/2", caption="two", sha256="s1", clip_score=0.9),  # same bytes
            dict(base, uid="c", url="HTTP://H.test:80/1#x", caption="three", sha256="s3", clip_score=0.1),  # URL of a
            dict(base, uid="d", url="http://h.test/4", caption="four", sha256="s4", clip_score=0.1),
            dict(base, uid="d", url="http://h.test/4", caption="four", sha256="s4", clip_score=0.1),  # uid twice
            dict(base, uid="e", url="http://h.test/5", caption="Two ", sha256="s1", clip_score=0.05)]
    lines, counters = run_dedup(rows, DedupConfig(dedup=("exact",)))
    assert len(lines) == len(rows)
    by_uid = {}
    for uid, reason, detail, *_ in lines:
        by_uid.setdefault(uid, []).append((reason, detail))
    assert by_uid["b"] == [("kept", "")]
    assert by_uid["a"] == [("duplicate_exact", "duplicate of b")]
    # c shares a URL with a only; a is dropped, so c names a dropped row (a chain: b > a > c)
    assert by_uid["c"] == [("duplicate_exact", "duplicate of dropped row a")]
    assert sorted(by_uid["d"]) == [("duplicate_exact", "same url and caption as kept row d"), ("kept", "")]
    assert by_uid["e"] == [("duplicate_exact", "duplicate of b")]
    assert counters["dedup_in"] == 6 and counters["dedup_out"] == 2 and counters["dedup_duplicate_exact"] == 4
    # caption pairs: the same bytes with another caption is not a duplicate; same caption (normalised) is
    lines, _ = run_dedup(rows, DedupConfig(dedup=("exact",), dedup_caption_pairs=True), seed=1, shuffle=True)
    got = {u: r for u, r, *_ in lines if r != "duplicate_exact" or u != "d"}
    assert got["a"] == got["c"] == "kept" and got["e"] == "duplicate_exact" and got["b"] == "kept"


# ---------------------------------------------------------------------------------------------
# Beam: near duplicates of real photos


def test_near_duplicates_of_real_photos(photo_rows, run_dedup):
    rows, truth = photo_rows
    lines, counters = run_dedup(rows, DedupConfig(dedup=("near",), near_dup_hamming=12))
    out = decisions(lines)
    assert len(out) == len(rows) == counters["dedup_in"]
    precision, recall = precision_recall(out, truth, {"duplicate_near"})
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)
    for name in PHOTOS:
        assert out[f"{name}-orig"][0] == "kept"          # the best-ranked copy survives
        assert out[f"{name}-region"][0] == "kept"        # another region of the photo is a different image
        assert out[f"{name}-colour_shift"] == ("duplicate_near", f"duplicate of {name}-orig")
    # the default threshold (6) catches every re-encode, resize and colour shift; crops need ~12
    lines, _ = run_dedup(rows, DedupConfig(dedup=("near",)), seed=2, shuffle=True)
    out6 = decisions(lines)
    for v in ("reencode", "resize", "colour_shift"):
        assert sum(out6[f"{n}-{v}"][0] == "duplicate_near" for n in PHOTOS) >= 0.9 * len(PHOTOS), v
    assert all(out6[f"{n}-orig"][0] == "kept" for n in PHOTOS)


# ---------------------------------------------------------------------------------------------
# Beam: semantic


def clustered_rows(n_groups=600, d=64, seed=0):
    """Embeddings around 30 centres; every 3rd group has a near-identical twin (cosine ~0.999)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, d))
    rows, truth = [], {}
    for g in range(n_groups):
        base = centres[g % 30] + 0.7 * rng.standard_normal(d)
        for j in range(2 if g % 3 == 0 else 1):
            v = base + (0.02 * rng.standard_normal(d) if j else 0)
            uid = f"g{g:04d}-{j}"
            rows.append({"uid": uid, "url": f"http://s.test/{uid}", "caption": "c", "sha256": uid,
                         "phash": None, "clip_score": 0.5 - 0.1 * j + 0.001 * (g % 7),
                         "image_embedding": (v / np.linalg.norm(v)).astype(np.float32)})
            truth[uid] = g
    return rows, truth


def test_semantic_dedup_with_split_clusters(run_dedup):
    rows, truth = clustered_rows()
    cfg = DedupConfig(dedup=("semantic",), semantic_threshold=0.95, semantic_clusters=6, semantic_max_group=60,
                      semantic_sample=len(rows))  # the plan sees every row: no group may exceed the bound
    lines, counters = run_dedup(rows, cfg)
    out = decisions(lines)
    assert len(out) == len(rows)
    precision, recall = precision_recall(out, truth, {"duplicate_semantic"})
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)
    assert counters["dedup_duplicate_semantic"] == sum(r == "duplicate_semantic" for r, _ in out.values())
    assert counters.get("dedup_semantic_groups_over_max", 0) == 0
    # the clusters really were split (6 clusters of ~130 rows, max group 60), and every group fits
    x = np.stack([r["image_embedding"] for r in rows])
    model = fit_semantic_model(list(x), len(rows), 0.95, 6, 60)
    assert model.bits.max() >= 2
    sizes = {}
    for keys in semantic_keys(x, model):
        for k in keys:
            sizes[k] = sizes.get(k, 0) + 1
    assert max(sizes.values()) <= 60


def test_semantic_skips_rows_without_embeddings(run_dedup):
    rows, _ = clustered_rows(n_groups=60)
    for r in rows[::4]:
        r["image_embedding"] = None
    lines, counters = run_dedup(rows, DedupConfig(dedup=("semantic",), semantic_clusters=2, semantic_sample=40))
    out = decisions(lines)
    assert len(out) == len(rows)
    assert all(out[r["uid"]][0] == "kept" for r in rows[::4])
    assert counters["dedup_semantic_no_embedding"] == len(rows[::4])


# ---------------------------------------------------------------------------------------------
# Beam: decontamination


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_decontamination_catches_resized_and_reencoded_eval_images(tmp_path, photo_rows, run_dedup):
    rows, _ = photo_rows
    eval_dir = tmp_path / "eval" / "sub"
    eval_dir.mkdir(parents=True)
    for name in ("coffee", "rocket"):   # the eval copies are resized PNGs: no byte-identical leak
        (eval_dir / f"{name}.png").write_bytes(_png(_photo(name).resize((300, 200))))
    lines, counters = run_dedup(rows, DedupConfig(dedup=(), decontaminate=str(tmp_path / "eval")))
    out = decisions(lines)
    leaked = {u for u, (r, _) in out.items() if r == "eval_leak"}
    expected = {f"{n}-{v}" for n in ("coffee", "rocket") for v in ("orig", "reencode", "resize", "colour_shift")}
    assert expected <= leaked
    assert all(u.startswith(("coffee", "rocket")) for u in leaked)
    assert out["coffee-orig"][1].startswith("eval item sub/coffee.png (phash distance ")
    assert counters["dedup_eval_leak"] == len(leaked)


def test_decontamination_from_parquet_embeddings_and_dimension_mismatch(tmp_path, run_dedup):
    rows, truth = clustered_rows(n_groups=90)
    leak = rows[5]["image_embedding"] + np.float32(0.01)
    table = pa.table({"uid": ["e-1", "e-2"],
                      "image_embedding": [leak.tolist(), np.ones(64, np.float32).tolist()]})
    pq.write_table(table, tmp_path / "eval.parquet")
    ev = load_eval_set(str(tmp_path / "eval.parquet"))
    assert ev.embeddings.shape == (2, 64) and len(ev.phashes) == 0
    lines, _ = run_dedup(rows, DedupConfig(dedup=(), decontaminate=str(tmp_path / "eval.parquet")))
    out = decisions(lines)
    leaked = {u: d for u, (r, d) in out.items() if r == "eval_leak"}
    assert rows[5]["uid"] in leaked and leaked[rows[5]["uid"]].startswith("eval item e-1 (cosine 0.99")
    assert len(leaked) <= 2  # only the leaked row (and its twin, if it has one)
    bad = [dict(r, image_embedding=np.ones(32, np.float32) / np.sqrt(32)) for r in rows[:3]]
    with pytest.raises(Exception, match="eval embeddings have 64 dimensions but rows have 32"):
        run_dedup(bad, DedupConfig(dedup=(), decontaminate=str(tmp_path / "eval.parquet")))


# ---------------------------------------------------------------------------------------------
# The synthetic world (exact and near duplicates, eval leaks, ground truth)


@pytest.mark.slow
def test_world_duplicates_and_eval_leaks(tmp_path, run_dedup):
    w = world.generate_world(400, seed=11, dup_exact=0.05, dup_near=0.08, eval_leak=0.04, eval_size=24)
    w.write_eval_dir(tmp_path / "eval")
    rows, scene = [], {}
    for it in w.items:
        res = process_image(it.image_bytes, IMG_CFG)
        if not res.fields:
            continue
        rows.append({"uid": it.uid, "url": f"http://world.test{it.path}", "caption": it.caption,
                     "clip_score": None, **res.fields})
        scene[it.uid] = it.truth.get("of") or it.uid
    cfg = DedupConfig(dedup=("exact", "near"), near_dup_hamming=8, decontaminate=str(tmp_path / "eval"))
    lines, _ = run_dedup(rows, cfg)
    out = decisions(lines)
    assert len(out) == len(rows)
    kinds = {it.uid: world.kind_family(it.kind) for it in w.items}
    for family, reasons in (("dup_exact", {"duplicate_exact"}), ("dup_near", {"duplicate_near"})):
        dropped = [u for u, (r, _) in out.items() if r in reasons]
        right = [u for u in dropped if scene[out[u][1].rsplit(" ", 1)[-1]] == scene[u]]
        precision = len(right) / max(len(dropped), 1)
        # a copy counts as caught when it (or, for a copy that outranks its source, the source) is dropped
        copies = [u for u, k in kinds.items() if k == family and u in out]
        caught = sum(1 for u in copies if out[u][0] != "kept" or out[scene[u]][0] != "kept")
        assert precision >= 0.95 and caught / len(copies) >= 0.9, (family, precision, caught, len(copies))
    leaks = [u for u, k in kinds.items() if k == "eval_leak" and u in out]
    flagged = [u for u, (r, _) in out.items() if r == "eval_leak"]
    assert sum(out[u][0] == "eval_leak" for u in leaks) >= 0.9 * len(leaks)
    assert sum(kinds[u] == "eval_leak" for u in flagged) >= 0.95 * len(flagged)


# ---------------------------------------------------------------------------------------------
# Worker count, input order, faults: identical decisions, every row exactly once


@pytest.mark.slow
def test_same_decisions_with_two_worker_processes_and_shuffled_input(tmp_path, photo_rows, jpeg, run_dedup):
    rows, _ = photo_rows
    faulty = [dict(rows[0], uid="no-phash", phash=None, url="http://photos.test/np"),
              dict(rows[1], uid="bad-phash", phash="zz-not-hex", url="http://photos.test/bp"),
              dict(rows[2], uid="nan-score", clip_score=float("nan"), url="http://photos.test/nan"),
              dict(rows[3], uid="no-emb", image_embedding=None, url="http://photos.test/ne")]
    rows += faulty + [dict(rows[5])]  # and one uid twice
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "clock.jpg").write_bytes(jpeg(_photo("clock").resize((200, 150)), quality=70))
    cfg = DedupConfig(dedup=("exact", "near", "semantic"), near_dup_hamming=12, semantic_clusters=3,
                      semantic_sample=60, semantic_max_group=20, decontaminate=str(eval_dir))
    one, _ = run_dedup(rows, cfg)
    two, _ = run_dedup(rows, cfg, workers=2, shuffle=True)
    assert len(one) == len(two) == len(rows)
    assert sorted(map(tuple, one)) == sorted(map(tuple, two))
    reasons = {r for _, r, *_ in one}
    assert reasons == {"kept", "duplicate_exact", "duplicate_near", "duplicate_semantic", "eval_leak"}
    assert {u for u, *_ in one} == {r["uid"] for r in rows}
