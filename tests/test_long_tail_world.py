"""The long-tailed synthetic world: Zipf concept frequencies, determinism, the default world unchanged."""
import collections
import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from clip_curate.fields import ConfigError
from clip_curate.synthetic import evaluate as E
from clip_curate.synthetic import world as W


def _concepts(items):
    return collections.Counter(W.concept_name(it.truth["colour"], it.truth["shape"]) for it in items)


def _digest(w, with_bytes=True):
    """Hash of the world's items; without bytes it does not depend on the JPEG/PNG encoder's version."""
    h = hashlib.sha256()
    for it in w.items + w.eval_items:
        h.update(repr((it.uid, it.path, it.caption, it.content_type, sorted(it.truth.items()))).encode())
        h.update((it.image_bytes or b"") if with_bytes else b"")
    return h.hexdigest()


def test_weights_follow_zipf_with_the_asked_head_tail_ratio():
    p = W.long_tail_weights(100)
    assert len(p) == len(W.CONCEPTS) == 48 and p.sum() == pytest.approx(1.0)
    assert p[0] / p[-1] == pytest.approx(100.0)
    assert np.all(np.diff(p) < 0)  # strictly decreasing with rank
    ranks = np.arange(1, 49)
    s = np.polyfit(np.log(ranks), np.log(p), 1)[0]  # a straight line on log-log axes: Zipf
    assert s == pytest.approx(-np.log(100) / np.log(48), abs=1e-9)
    assert W.CONCEPTS[0] == ("red", "circle") and W.CONCEPTS[-1] == ("black", "diamond")
    with pytest.raises(ValueError, match="ratio >= 1"):
        W.long_tail_weights(0.5)


def test_sampled_concepts_are_long_tailed():
    """Head concepts ~100x as frequent as tail ones in the scenes drawn (pure attribute draws: fast)."""
    rng = np.random.default_rng(3)
    p = W.long_tail_weights(100)
    n = 60_000
    c = collections.Counter(W.concept_name(a["colour"], a["shape"]) for a in (W.sample_attributes(rng, p)
                                                                            for _ in range(n)))
    names = [W.concept_name(*cs) for cs in W.CONCEPTS]
    head, tail = c[names[0]], c[names[-1]]
    assert head == pytest.approx(n * p[0], rel=0.05)
    assert 60 <= head / tail <= 170  # 100x, within sampling noise of ~75 tail draws
    head8 = sum(c[x] for x in names[:8]) / 8
    tail8 = sum(c[x] for x in names[-8:]) / 8
    assert head8 / tail8 > 20
    # every other attribute stays valid
    a = W.sample_attributes(np.random.default_rng(0), p)
    assert a["background"] in W.BACKGROUNDS and W._contrast_ok(a["colour"], a["background"])
    assert 1 <= a["count"] <= W.MAX_COUNT[a["size"]]


def test_long_tail_world_is_long_tailed_and_deterministic_per_seed():
    w = W.generate_world(600, 5, long_tail=100, eval_size=8)
    c = _concepts(it for it in w.items if it.kind == "matched")
    names = [W.concept_name(*cs) for cs in W.CONCEPTS]
    head = c[names[0]]
    tail = sum(c[x] for x in names[24:]) / 24  # mean over the rarest half
    assert head > 80 and head / max(tail, 0.5) > 20
    assert w.params["long_tail"] == 100
    assert c.most_common(1)[0][0] == "red circle"
    # hard mismatches still change exactly one attribute; captions name the scene's concept when matched
    for it in w.items:
        if it.kind == "matched":
            assert f"{it.truth['colour']} {W.plural(it.truth['shape'], it.truth['count'])}" in it.caption
    again = W.generate_world(600, 5, long_tail=100, eval_size=8)
    assert _digest(again) == _digest(w)
    other = W.generate_world(600, 6, long_tail=100, eval_size=8)
    assert _digest(other) != _digest(w)
    uniform = W.generate_world(600, 5, eval_size=8)
    assert _concepts(it for it in uniform.items if it.kind == "matched")["red circle"] < head / 3


def test_default_world_unchanged():
    """Off (the default), the world is the one the demo and the other tests were built on: same bytes."""
    w = W.generate_world(120, 2026, broken_404=0.03, broken_not_image=0.02)
    assert "long_tail" not in w.params
    assert _digest(W.generate_world(120, 2026, broken_404=0.03, broken_not_image=0.02, long_tail=0)) == _digest(w)
    # pinned: captions, truth and URLs of this world as generated before the long-tail option existed (the
    # images are drawn from the same attributes and seeds, so the same captions and truth mean the same scenes)
    assert _digest(w, with_bytes=False) == DEFAULT_WORLD_DIGEST


DEFAULT_WORLD_DIGEST = "c4cf1e8c4879e8a32b9b10404dcdcc92b8e096fd093c3f75eb6480863114e316"


def test_concept_labels_groups_and_eval_set(tmp_path):
    assert W.attribute_classes("concept")[0] == "red circle" and len(W.attribute_classes("concept")) == 48
    assert W.zero_shot_prompts("concept", "white cross")[0] == "a picture of white crosses"
    ls = W.heldout_set(12, 9).with_attribute("concept")
    assert [ls.classnames[i] for i in ls.labels] == [W.label_value(it.truth, "concept") for it in ls.items]
    E.make_eval_set(str(tmp_path), 40, attributes=["colour", "concept"])
    t = pq.read_table(tmp_path / E.EVAL_FILE)
    assert {"label_colour", "label_concept"} <= set(t.column_names) and "label_shape" not in t.column_names
    meta = json.loads((tmp_path / E.CLASSES_FILE).read_text())
    assert len(meta["attributes"]["concept"]["classes"]) == 48
    labels = {"concept": [str(v) for v in t.column("label_concept").to_pylist()]}
    first = labels["concept"][0]
    masks = E.group_masks({"attribute": "concept", "groups": {"a": [first], "b": W.attribute_classes("concept")}},
                          labels)
    assert masks["a"].sum() == labels["concept"].count(first) and masks["b"].all()
    with pytest.raises(ConfigError, match="attribute 'size'"):
        E.group_masks({"attribute": "size", "groups": {"a": ["small"]}}, labels)
    with pytest.raises(ConfigError, match="no held-out image of group 'a'"):
        E.group_masks({"attribute": "concept", "groups": {"a": ["pink unicorn"]}}, labels)
    with pytest.raises(ConfigError, match="--eval-attributes"):
        E.make_eval_set(str(tmp_path / "x"), 10, attributes=["flavour"])


def test_score_model_reports_group_accuracy(tmp_path):
    """Per-group zero-shot accuracy is the accuracy on that group's images: for groups that split the eval set,
    the group figures weighted by their sizes give back the overall one (a random-init micro model)."""
    from clip_curate.synthetic import train

    E.make_eval_set(str(tmp_path), 60, seed=4, image_px=64, attributes=["colour", "concept"])
    names = list(W.attribute_classes("concept"))
    groups = {"attribute": "concept", "groups": {"head": names[:24], "tail": names[24:]}}
    es = E.load_eval_set(str(tmp_path), train.TINY_PREPROCESS_CFG, ["colour", "concept"], groups)
    n_head, n_tail = int(es.groups["head"].sum()), int(es.groups["tail"].sum())
    assert n_head + n_tail == len(es) and n_head and n_tail
    model = train.build_model(MICRO_CFG)
    out = E.score_model(model, es, model_cfg=MICRO_CFG, preprocess_cfg=train.TINY_PREPROCESS_CFG)
    for a in ("colour", "concept"):
        g = out["zero_shot_groups"]
        assert (g["head"][a] * n_head + g["tail"][a] * n_tail) / len(es) == pytest.approx(out["zero_shot"][a])
    flat = E.flat_metrics(out)
    assert flat["zero_shot/concept@tail"] == out["zero_shot_groups"]["tail"]["concept"]
    assert "zero_shot_groups" not in E.score_model(model, E.load_eval_set(str(tmp_path), train.TINY_PREPROCESS_CFG),
                                                   model_cfg=MICRO_CFG, preprocess_cfg=train.TINY_PREPROCESS_CFG)


MICRO_CFG = {"embed_dim": 16,
             "vision_cfg": {"image_size": 64, "patch_size": 32, "width": 32, "layers": 1, "head_width": 16},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_demo_long_tail_flag_checked_early(tmp_path):
    from clip_curate.synthetic import demo

    with pytest.raises(ConfigError, match="--long-tail: 0 .off. or a head/tail frequency ratio >= 1"):
        demo.main(["--long-tail", "0.5", "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    assert demo.build_arg_parser().parse_args(["--long-tail", "100"]).long_tail == 100


def test_evaluate_groups_flag_errors_are_one_line(tmp_path):
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n")
    E.make_eval_set(str(tmp_path / "heldout"), 12, attributes=["concept"])
    base = ["--raw", str(urls), "--curated", str(urls), "--eval-set", str(tmp_path / "heldout")]
    with pytest.raises(ConfigError, match="--groups .*nope.json"):
        E.main(base + ["--groups", str(tmp_path / "nope.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="--groups .*bad.json"):
        E.main(base + ["--groups", str(bad)])
    bad.write_text(json.dumps(["red circle"]))
    with pytest.raises(ConfigError, match='expected {"attribute"'):
        E.main(base + ["--groups", str(bad)])
