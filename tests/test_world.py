"""The synthetic world: determinism, ground-truth kinds, hard mismatches, near-duplicates, eval set."""
from __future__ import annotations

import io
import re

import imagehash
import numpy as np
import pytest
from PIL import Image

from clip_curate.synthetic import world as W


@pytest.fixture(scope="module")
def world():
    return W.generate_world(400, seed=11, mismatch_random=0.15, mismatch_hard=0.15, dup_exact=0.05,
                            dup_near=0.08, unsafe=0.05, eval_leak=0.03, eval_size=16,
                            broken_404=0.02, broken_not_image=0.02)


def _phash(data: bytes):
    return imagehash.phash(Image.open(io.BytesIO(data)).convert("RGB"))


def test_same_seed_same_world_and_other_seed_differs():
    a = W.generate_world(40, seed=3)
    b = W.generate_world(40, seed=3)
    c = W.generate_world(40, seed=4)
    assert [(i.uid, i.caption, i.image_bytes, i.truth) for i in a.items] == \
        [(i.uid, i.caption, i.image_bytes, i.truth) for i in b.items]
    assert [i.image_bytes for i in a.items] != [i.image_bytes for i in c.items]
    assert [i.caption for i in a.items] != [i.caption for i in c.items]


def test_kind_proportions(world):
    kinds = world.kinds()
    assert len(world) == 400
    expected = {"mismatch_random": 60, "mismatch_hard": 60, "dup_exact": 20, "dup_near": 32, "unsafe": 20,
                "eval_leak": 12, "broken_404": 8, "broken_not_image": 8}
    for kind, count in expected.items():
        assert kinds[kind] == count, kind
    assert kinds["matched"] == 400 - sum(expected.values())
    assert len({it.uid for it in world.items}) == 400
    assert len({it.path for it in world.items}) == 400
    # order is shuffled: duplicates are not all at the end
    fams = [W.kind_family(it.kind) for it in world.items]
    assert "dup_near" in fams[:200] and "dup_near" in fams[200:]


def test_images_decode_at_requested_size(world):
    for it in world.items:
        if it.kind == "broken_404":
            assert it.image_bytes is None
        elif it.kind == "broken_not_image":
            assert it.content_type == "text/html" and b"<html>" in it.image_bytes
        else:
            img = Image.open(io.BytesIO(it.image_bytes))
            assert img.format in ("JPEG", "PNG")
            if W.kind_family(it.kind) not in ("dup_near", "eval_leak"):
                assert img.size == (128, 128)
    small = W.generate_world(3, seed=1, image_px=96)
    assert Image.open(io.BytesIO(small.items[0].image_bytes)).size == (96, 96)


def test_captions_name_the_drawn_attributes_for_matched_items(world):
    for it in world.items:
        if it.kind != "matched":
            continue
        t = it.truth
        assert t["colour"] in it.caption and t["background"] in it.caption
        assert W.plural(t["shape"], t["count"]) in it.caption
        assert it.truth["caption_ok"]


def test_hard_mismatch_changes_exactly_one_attribute(world):
    hard = [it for it in world.items if it.kind == "mismatch_hard"]
    assert {it.truth["mismatch_attribute"] for it in hard} == set(W.HARD_ATTRIBUTES)
    for it in hard:
        attr, value = it.truth["mismatch_attribute"], it.truth["caption_value"]
        assert value != str(it.truth[attr])
        assert not it.truth["caption_ok"]
    rng = np.random.default_rng(0)
    for _ in range(300):
        attrs = W.sample_attributes(rng)
        new, changed = W.change_one_attribute(attrs, rng)
        diff = [k for k in attrs if attrs[k] != new[k]]
        assert diff == [changed]
        assert new["count"] <= W.MAX_COUNT[new["size"]]


def test_hard_mismatch_caption_differs_from_truth_caption_in_that_word():
    rng = np.random.default_rng(5)
    attrs = {"shape": "circle", "colour": "red", "count": 2, "size": "small", "position": "left",
             "background": "teal", "texture": "striped"}
    new, changed = W.change_one_attribute(attrs, rng, attribute="colour")
    cap = W.describe(new, rng)
    assert changed == "colour" and new["colour"] in cap and "red" not in cap
    with pytest.raises(ValueError, match="cannot change"):
        W.change_one_attribute(attrs, rng, attribute="texture")


def test_random_mismatch_differs_in_some_hard_attribute(world):
    for it in world.items:
        if it.kind == "mismatch_random":
            assert not it.truth["caption_ok"]


def test_exact_duplicates_are_byte_identical_copies_of_matched_items(world):
    by = world.by_uid()
    dups = [it for it in world.items if W.kind_family(it.kind) == "dup_exact"]
    for it in dups:
        src = by[it.truth["of"]]
        assert it.kind == f"dup_exact_of:{src.uid}"
        assert src.kind == "matched"
        assert it.image_bytes == src.image_bytes and it.path != src.path


def test_near_duplicates_are_near_and_distinct_scenes_are_far(world):
    by = world.by_uid()
    near = [it for it in world.items if W.kind_family(it.kind) == "dup_near"]
    dist = {}
    for it in near:
        src = by[it.truth["of"]]
        assert it.image_bytes != src.image_bytes
        dist.setdefault(it.truth["variant"], []).append(_phash(it.image_bytes) - _phash(src.image_bytes))
    assert set(dist) == set(W.NEAR_DUP_VARIANTS)
    for variant in ("reencode", "resize", "colour_shift"):
        assert max(dist[variant]) <= 8, (variant, dist[variant])
    assert np.median(dist["crop"]) <= 8 and max(dist["crop"]) <= 16, dist["crop"]
    # different scenes: pairwise pHash distances among originals
    originals = [_phash(it.image_bytes) for it in world.items if it.kind == "matched"][:150]
    far = [a - b for i, a in enumerate(originals) for b in originals[i + 1:]]
    assert np.percentile(far, 1) >= 14
    assert np.mean(np.asarray(far) <= 6) < 0.001


def test_near_duplicate_variants_directly():
    data = W.encode_image(W.render_scene(W.sample_attributes(np.random.default_rng(1)), 1))
    rng = np.random.default_rng(2)
    sizes = {}
    for variant in W.NEAR_DUP_VARIANTS:
        out, v = W.near_duplicate(data, rng, variant)
        assert v == variant and out != data
        sizes[variant] = Image.open(io.BytesIO(out)).size
    assert sizes["reencode"] == sizes["colour_shift"] == (128, 128)
    assert sizes["resize"] != (128, 128)
    w, h = sizes["crop"]
    assert 0.95 * 128 <= w < 128 and 0.95 * 128 <= h < 128
    with pytest.raises(ValueError, match="unknown near-duplicate"):
        W.near_duplicate(data, rng, "blur")


def test_unsafe_items_carry_the_motif_and_named_captions(world):
    unsafe = [it for it in world.items if it.kind == "unsafe"]
    assert unsafe and all(it.truth["unsafe"] for it in unsafe)
    term = re.compile(r"\b(" + "|".join(W.UNSAFE_CAPTION_TERMS) + r")\b", re.I)
    named = [it for it in unsafe if it.truth["unsafe_caption"]]
    assert 0 < len(named) < len(unsafe) + 1
    for it in unsafe:
        assert bool(term.search(it.caption)) == it.truth["unsafe_caption"]
    for it in world.items:
        if it.kind != "unsafe":
            assert not term.search(it.caption), it.caption
    # the motif is a distinctive dark red: present in unsafe images, absent from safe renders
    rng = np.random.default_rng(3)
    attrs = W.sample_attributes(rng)

    def splatter_fraction(img):
        a = np.asarray(img).astype(int)
        return float(((abs(a[..., 0] - 120) < 20) & (a[..., 1] < 25) & (a[..., 2] < 30)).mean())

    assert splatter_fraction(W.render_scene(attrs, 9, unsafe=True)) > 0.03
    assert splatter_fraction(W.render_scene(attrs, 9, unsafe=False)) < 0.005


def test_eval_leaks_copy_eval_items(world):
    eval_uids = {it.uid for it in world.eval_items}
    assert len(world.eval_items) == 16
    leaks = [it for it in world.items if W.kind_family(it.kind) == "eval_leak"]
    assert leaks
    eval_by = {it.uid: it for it in world.eval_items}
    for it in leaks:
        assert it.truth["of"] in eval_uids
        assert _phash(it.image_bytes) - _phash(eval_by[it.truth["of"]].image_bytes) <= 16


def test_write_eval_dir(tmp_path, world):
    paths = world.write_eval_dir(tmp_path / "eval")
    assert len(paths) == 16
    assert Image.open(paths[0]).size == (128, 128)


def test_url_table(world):
    table = world.to_url_table("http://127.0.0.1:8000/")
    assert table.num_rows == 400
    rows = table.to_pylist()
    assert rows[0]["url"].startswith("http://127.0.0.1:8000/img/")
    for col in ("uid", "caption", "truth_kind", "truth_family", "truth_of", "truth_caption_ok", "truth_unsafe",
                "truth_unsafe_caption", "truth_mismatch_attribute", "truth_variant", "truth_shape",
                "truth_colour", "truth_count", "truth_size", "truth_position", "truth_background",
                "truth_texture"):
        assert col in table.column_names, col
    fam = {r["truth_family"] for r in rows}
    assert {"matched", "mismatch_hard", "dup_near", "eval_leak", "broken_404"} <= fam
    assert all(isinstance(r["truth_count"], int) for r in rows)


def test_heldout_labelled_set():
    a = W.heldout_set(60, seed=5, attribute="colour")
    b = W.generate_world(5, seed=1).heldout(60, seed=5, attribute="colour")
    assert a.images == b.images and a.labels == b.labels
    assert a.classnames == tuple(W.COLOURS)
    for item, label in zip(a.items, a.labels):
        assert item.truth["colour"] == a.classnames[label]
    assert len(set(a.labels)) >= 6
    assert a.prompts("red") and all("red" in p for p in a.prompts("red"))
    for attr in W.LABEL_ATTRIBUTES:
        assert W.heldout_set(4, seed=1, attribute=attr).classnames == W.attribute_classes(attr)
    with pytest.raises(ValueError, match="unknown attribute"):
        W.heldout_set(2, seed=1, attribute="mood")


def test_attribute_groups():
    groups = W.attribute_groups("shape")
    assert set(groups) == set(W.SHAPES)
    assert "crosses" in groups["cross"]["terms"] and groups["cross"]["prompts"]


def test_bad_fractions_are_errors():
    with pytest.raises(ValueError, match="add up"):
        W.generate_world(10, seed=1, mismatch_random=0.6, mismatch_hard=0.6)
    with pytest.raises(ValueError, match=">= 0"):
        W.generate_world(10, seed=1, unsafe=-0.1)
    with pytest.raises(ValueError, match="n must be"):
        W.generate_world(0, seed=1)


@pytest.mark.slow
def test_scene_pairs_are_deterministic_and_parallel_equals_serial():
    a = W.scene_pairs(300, seed=2)
    b = W.scene_pairs(300, seed=2, workers=2)
    assert [p.image_bytes for p in a] == [p.image_bytes for p in b]
    assert [p.captions for p in a] == [p.captions for p in b]
    for p in a[:50]:
        assert p.random_caption not in p.captions and p.hard_caption not in p.captions
        assert p.hard_attribute in W.HARD_ATTRIBUTES


def test_serve_world_answers_images_and_broken_urls(world):
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with W.serve_world(world) as srv:
        table = world.to_url_table(srv.base_url)
        rows = {r["truth_family"]: r for r in table.to_pylist()}
        with opener.open(rows["matched"]["url"], timeout=10) as resp:
            body = resp.read()
            assert resp.headers["Content-Type"] in ("image/jpeg", "image/png")
        assert body == world.by_uid()[rows["matched"]["uid"]].image_bytes
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open(rows["broken_404"]["url"], timeout=10)
        assert err.value.code == 404
        with opener.open(rows["broken_not_image"]["url"], timeout=10) as resp:
            assert resp.headers["Content-Type"] == "text/html"
        with opener.open(srv.url("/robots.txt"), timeout=10) as resp:
            assert b"Allow" in resp.read()


def test_labelled_set_relabels_the_same_images():
    a = W.heldout_set(20, seed=8, attribute="shape")
    b = a.with_attribute("position")
    assert b.images == a.images and b.classnames == W.POSITIONS
    assert b.labels == W.heldout_set(20, seed=8, attribute="position").labels


def test_hard_weights_steer_the_changed_attribute():
    pairs = W.scene_pairs(200, seed=4, hard_weights={"position": 1.0})
    assert {p.hard_attribute for p in pairs} == {"position"}
    uniform = W.scene_pairs(200, seed=4)
    assert len({p.hard_attribute for p in uniform}) == 4


@pytest.mark.slow
def test_scene_twin_is_the_same_scene_with_one_attribute_changed():
    pairs = W.scene_pairs(30, seed=6, twins=True, hard_weights={"shape": 0.5, "count": 0.5})
    assert pairs[:30] == W.scene_pairs(30, seed=6, hard_weights={"shape": 0.5, "count": 0.5})
    assert pairs == W.scene_pairs(300, seed=6, twins=True, workers=2,
                                  hard_weights={"shape": 0.5, "count": 0.5})[:30] + \
        W.scene_pairs(300, seed=6, twins=True, workers=2, hard_weights={"shape": 0.5, "count": 0.5})[300:330]
    for original, twin in zip(pairs[:30], pairs[30:]):
        changed = [a for a in original.attrs if original.attrs[a] != twin.attrs[a]]
        assert changed == [twin.hard_attribute] and twin.hard_attribute in ("shape", "count")
        a = np.asarray(W.decode_image(original.image_bytes)).astype(int)
        b = np.asarray(W.decode_image(twin.image_bytes)).astype(int)
        differing = (np.abs(a - b).sum(2) > 60).mean()
        assert 0.002 < differing < 0.25  # same background, lighting and layout; only the objects differ
        assert twin.captions[0] != original.captions[0]
        word = W.plural(original.attrs["shape"], original.attrs["count"]) if twin.hard_attribute == "shape" else None
        if word:  # the twin's hard negative describes the original scene
            assert word in twin.hard_caption and word not in twin.captions[0]
