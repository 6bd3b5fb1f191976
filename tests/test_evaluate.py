"""Proxy evaluation: metrics on constructed embeddings, pools, eval set, end-to-end runs at a tiny setting."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate.synthetic import evaluate as E
from clip_curate import export
from clip_curate.synthetic import world as W
from clip_curate.cli import main as cli_main
from clip_curate.synthetic.train import TINY_PREPROCESS_CFG

# a 2-layer micro model keeps the end-to-end runs to seconds
MICRO_CFG = {"embed_dim": 16,
             "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16,
                            "mlp_ratio": 2.0},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


# ---------------------------------------------------------------------------------------------
# metrics on hand-made embeddings

def test_zero_shot_accuracy_constructed():
    classes = np.eye(3, dtype=np.float32)  # class c = axis c
    images = np.array([[1, 0.1, 0], [0.2, 1, 0], [0, 0.3, 1], [0.9, 1, 0], [0, 0, 1]], np.float32)
    labels = [0, 1, 2, 0, 1]  # rows 3 and 4 are misclassified (closest to class 1 and 2)
    assert E.zero_shot_accuracy(images, classes, labels) == pytest.approx(3 / 5)
    # scale does not matter (cosine), and a collapsed model (all ties) scores 0, not 1/3 or 1
    assert E.zero_shot_accuracy(images * 7, classes * 3, labels) == pytest.approx(3 / 5)
    assert E.zero_shot_accuracy(np.ones((4, 3)), np.ones((3, 3)), [0, 1, 2, 0]) == 0.0


def test_class_embeddings_mean_of_prompts():
    per_class = [np.array([[1, 0], [1, 0.0]]), np.array([[0, 3.0], [0, 1.0], [0, 2.0]])]
    np.testing.assert_allclose(E.class_embeddings(per_class), [[1, 0], [0, 1]], atol=1e-6)


def test_retrieval_recall_constructed():
    # 4 pairs; text i is image i rotated a little, except text 2, which sits nearest image 0
    img = np.eye(4, dtype=np.float32)
    txt = np.eye(4, dtype=np.float32) + 0.1
    txt[2] = [1, 0, 0.5, 0]
    r = E.retrieval_recall(img, txt, ks=(1, 2, 5))
    # image 0: texts 0 (1.1 unnormalised, cos .95) vs text 2 (cos .89) -> rank 0. image 2: text 2 cos .45,
    # text 0/1/3 cos .08-.09 -> rank 0. So i2t@1 = 1.
    assert r["i2t_r@1"] == 1.0 and r["i2t_r@5"] == 1.0
    # text 2 is closest to image 0 (cos .89 vs image 2 .45) -> t2i@1 = 3/4, @2 = 1
    assert r["t2i_r@1"] == pytest.approx(0.75) and r["t2i_r@2"] == 1.0
    # identical captions are interchangeable with groups=; collapsed embeddings score 0
    same = E.retrieval_recall(np.eye(2), np.array([[1, 1.0], [1, 1.0]]), ks=(1,), groups=["a", "a"])
    assert same == {"i2t_r@1": 1.0, "t2i_r@1": 1.0}
    assert E.retrieval_recall(np.ones((3, 2)), np.ones((3, 2)), ks=(1,))["i2t_r@1"] == 0.0


def test_summary_and_paired_comparison():
    s = E.summarize([0.5, 0.6, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1) and s["n"] == 3
    c = E.compare([0.50, 0.52, 0.48], [0.60, 0.61, 0.62])
    assert c["delta_mean"] == pytest.approx(0.11) and c["margin_exceeds_spread"] and c["curated_better_every_seed"]
    c = E.compare([0.50, 0.60, 0.40], [0.52, 0.58, 0.45])
    assert not c["margin_exceeds_spread"] and c["spread"] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# pools, eval set, end to end

def _pool_table(items) -> pa.Table:
    items = [it for it in items if it.image_bytes]
    return pa.table({"uid": [it.uid for it in items], "url": [f"http://x/{it.uid}" for it in items],
                     "caption": [it.caption for it in items], "image": [it.image_bytes for it in items],
                     "width": pa.array([128] * len(items), pa.int32()),
                     "clip_score": pa.array([0.7] * len(items), pa.float32())})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltiny")
    w = W.generate_world(40, seed=5, image_px=64)
    raw_dir, cur_dir = root / "raw" / "curated", root / "out" / "curated"
    raw_dir.mkdir(parents=True)
    cur_dir.mkdir(parents=True)
    pq.write_table(_pool_table(w.items), raw_dir / "part-00000-of-00001.parquet")
    pq.write_table(_pool_table([it for it in w.items if it.truth["caption_ok"]]), cur_dir / "part-00000-of-00001.parquet")
    E.make_eval_set(str(root / "heldout"), n=24, seed=9, image_px=64)
    (root / "micro.json").write_text(json.dumps({"model_cfg": MICRO_CFG}))
    return root, w


def test_make_and_load_eval_set(tiny):
    root, _ = tiny
    es = E.load_eval_set(str(root / "heldout"), TINY_PREPROCESS_CFG)
    assert len(es) == 24 and tuple(es.pixels.shape) == (24, 3, 64, 64)
    assert set(es.classes) == set(W.LABEL_ATTRIBUTES)
    ls = W.heldout_set(24, 9, image_px=64)
    assert [es.classes["shape"][i] for i in es.labels["shape"]] == [it.truth["shape"] for it in ls.items]
    assert es.prompts["colour"]["red"] == W.zero_shot_prompts("colour", "red")
    # the Parquet file alone carries its classes in the schema metadata
    os.rename(root / "heldout" / "classes.json", root / "classes.bak")
    try:
        alone = E.load_eval_set(str(root / "heldout" / "eval.parquet"), TINY_PREPROCESS_CFG, ["count"])
        assert alone.classes == {"count": ["1", "2", "3", "4"]}
    finally:
        os.rename(root / "classes.bak", root / "heldout" / "classes.json")


def test_pool_from_parquet_and_webdataset_agree(tiny, tmp_path):
    root, _ = tiny
    from_parquet = E.load_pool(str(root / "out"), TINY_PREPROCESS_CFG)
    assert from_parquet.kind == "parquet" and from_parquet.uids == sorted(from_parquet.uids)
    res = export.export_webdataset(str(root / "out"), str(tmp_path / "wds"), shard_size=7)
    from_wds = E.load_pool(str(tmp_path / "wds"), TINY_PREPROCESS_CFG)
    assert from_wds.kind == "webdataset" and res.total == len(from_wds.captions)
    assert from_wds.captions == from_parquet.captions and from_wds.uids == from_parquet.uids
    assert bool((from_wds.pixels == from_parquet.pixels).all())


@pytest.mark.slow
def test_evaluate_end_to_end_tiny(tiny, capsys):
    root, w = tiny
    out = root / "result"
    argv = ["evaluate", "--raw", str(root / "raw"), "--curated", str(root / "out"), "--eval-set",
            str(root / "heldout"), "--steps", "3", "--batch-size", "8", "--seeds", "0,1", "--output", str(out),
            "--model-config", str(root / "micro.json"), "--threads", "1"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "zero_shot_mean" in printed and "curated" in printed
    result = json.loads((out / "evaluation.json").read_text())
    assert (out / "evaluation.png").stat().st_size > 5000
    assert result["settings"]["samples_seen"] == 24 and result["settings"]["seeds"] == [0, 1]
    assert result["settings"]["model_cfg"] == MICRO_CFG
    n_raw = sum(1 for it in w.items if it.image_bytes)
    assert result["arms"]["raw"]["pairs"] == n_raw
    assert result["arms"]["curated"]["pairs"] == sum(1 for it in w.items if it.truth["caption_ok"] and it.image_bytes)
    for arm in ("raw", "curated"):
        runs = result["arms"][arm]["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert set(r["zero_shot"]) == set(W.LABEL_ATTRIBUTES)
            assert set(r["retrieval"]) == {"i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5"}
            assert all(0 <= v <= 1 for v in r["zero_shot"].values())
        assert set(result["arms"][arm]["summary"]["zero_shot_mean"]) == {"mean", "std", "min", "max", "n"}
    assert set(result["headline"]) >= {"delta_mean", "spread", "margin_exceeds_spread", "raw", "curated"}
    assert result["chance"]["zero_shot/shape"] == pytest.approx(1 / 6)
    # reproducible from the seed: the same run again gives the same figures
    assert cli_main(argv) == 0
    again = json.loads((out / "evaluation.json").read_text())
    assert again["arms"]["raw"]["runs"][0]["zero_shot"] == result["arms"]["raw"]["runs"][0]["zero_shot"]
    assert again["arms"]["curated"]["runs"][1]["retrieval"] == result["arms"]["curated"]["runs"][1]["retrieval"]


@pytest.mark.slow
def test_raw_url_list_is_downloaded_unfiltered(tiny, tmp_path, served_world, local_net_flags):
    """--raw URLS: a real clip-curate run --stages download,image against a local world server."""
    root, _ = tiny
    with served_world(tmp_path, 24, 11, include_uid=False, image_px=64, broken_404=0.1) as web:
        w, urls = web.world, web.urls
        assert E.pool_kind(str(urls)) == "urls"
        rc = E.main(["--raw", str(urls), "--curated", str(root / "out"), "--eval-set", str(root / "heldout"),
                     "--steps", "2", "--batch-size", "8", "--seeds", "0", "--output", str(tmp_path / "ev"),
                     "--model-config", str(root / "micro.json"), "--attributes", "shape,colour",
                     *local_net_flags(respect_robots_txt=True)])
    assert rc == 0
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert result["arms"]["raw"]["pairs"] == sum(1 for it in w.items if it.kind != "broken_404")
    assert set(result["arms"]["raw"]["runs"][0]["zero_shot"]) == {"shape", "colour"}
    assert os.path.isdir(tmp_path / "ev" / "raw-pool" / "curated")


def test_user_mistakes(tiny, tmp_path, capsys):
    root, _ = tiny
    base = ["evaluate", "--raw", str(root / "raw"), "--curated", str(root / "out"), "--eval-set", str(root / "heldout"),
            "--output", str(tmp_path / "o"), "--model-config", str(root / "micro.json"), "--steps", "1"]
    cases = [
        (["evaluate", "--raw", str(root / "raw")], "--curated is required"),
        (base + ["--seeds", "0,x"], "--seeds"),
        (base + ["--batch-size", "500"], "--batch-size 500 is larger than the raw pool"),
        (base + ["--attributes", "smell"], "--attributes: smell"),
        (base + ["--allow-private-addresses"], "unrecognized arguments"),
        (base[:6] + [str(tmp_path / "none")] + base[7:], "no eval.parquet"),
        (base[:4] + [str(root / "heldout" / "classes.json")] + base[5:], "holds no images"),
        (["evaluate", "--make-eval-set", str(tmp_path / "e"), "--eval-size", "1"], "--eval-size"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "o" / "evaluation.json").exists()
