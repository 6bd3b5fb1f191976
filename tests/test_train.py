"""The tiny-model trainer and the shipped ``synthetic-tiny`` checkpoint (real open_clip models, CPU)."""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip_curate.synthetic import train as T
from clip_curate.synthetic import world as W

# A very small config so that a handful of steps run in seconds.
MICRO_CFG = copy.deepcopy(T.TINY_MODEL_CFG)
MICRO_CFG["embed_dim"] = 32
MICRO_CFG["vision_cfg"].update(width=32, layers=1, head_width=16, patch_size=16)
MICRO_CFG["text_cfg"].update(width=32, layers=1, heads=2, context_length=32)


@pytest.fixture(scope="module")
def micro_pairs():
    return W.scene_pairs(48, seed=3)


def _micro_model(pairs, seed=0, steps=4):
    return T.train_clip([p.image_bytes for p in pairs], [p.captions for p in pairs], model_cfg=MICRO_CFG,
                        steps=steps, batch_size=16, seed=seed,
                        hard_negatives=[(p.hard_caption,) for p in pairs])


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 50), rng.normal(0, 1, 70)
    pos[:5] = neg[:5]  # ties count half
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert T.roc_auc(pos, neg) == pytest.approx(brute)
    assert T.roc_auc([2, 3], [0, 1]) == 1.0 and T.roc_auc([0], [1]) == 0.0
    assert np.isnan(T.roc_auc([], [1.0]))


def test_uint8_cache_equals_open_clip_preprocess(micro_pairs):
    images = [p.image_bytes for p in micro_pairs[:8]]
    crop, _ = W.near_duplicate(images[0], np.random.default_rng(1), "crop")  # non-square path
    images.append(crop)
    cached = T._normalise(T.images_to_uint8(images), T.TINY_PREPROCESS_CFG, torch.device("cpu"))
    pre = T.make_preprocess()
    direct = torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    assert torch.allclose(cached, direct, atol=1e-5)


@pytest.mark.slow
def test_train_is_reproducible_from_seed_and_learns(micro_pairs):
    torch.set_num_threads(1)
    a = _micro_model(micro_pairs, seed=5)
    b = _micro_model(micro_pairs, seed=5)
    c = _micro_model(micro_pairs, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training
    # the loss goes down on a small set with enough steps
    losses = []
    T.train_clip([p.image_bytes for p in micro_pairs], [p.captions[0] for p in micro_pairs], model_cfg=MICRO_CFG,
                 steps=40, batch_size=16, lr=3e-3, seed=1, log_every=39,
                 log=lambda s: losses.append(float(s.split("loss ")[1].split()[0])))
    assert losses[-1] < losses[0] - 0.5


def test_train_rejects_bad_input(micro_pairs):
    with pytest.raises(ValueError, match="captions"):
        T.train_clip([p.image_bytes for p in micro_pairs], ["a"], model_cfg=MICRO_CFG, steps=1)
    with pytest.raises(ValueError, match="at least 2"):
        T.train_clip([micro_pairs[0].image_bytes], ["a"], model_cfg=MICRO_CFG, steps=1)
    with pytest.raises(ValueError, match="hard-negative"):
        T.train_clip([p.image_bytes for p in micro_pairs], [p.captions for p in micro_pairs], model_cfg=MICRO_CFG,
                     steps=1, hard_negatives=["x"])


@pytest.mark.slow
def test_saved_dir_loads_with_open_clip_local_dir(tmp_path, micro_pairs):
    model = _micro_model(micro_pairs)
    out = T.save_model_dir(model, tmp_path / "m", model_cfg=MICRO_CFG, dtype="float32", report={"x": 1})
    cfg = json.loads((out / T.CONFIG_FILE).read_text())
    assert cfg["model_cfg"] == MICRO_CFG and cfg["preprocess_cfg"]["size"] == 64
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    loaded.eval()
    images = [p.image_bytes for p in micro_pairs[:6]]
    texts = [p.captions[0] for p in micro_pairs[:6]]
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        via_open_clip = loaded.encode_image(x, normalize=True).numpy()
        text_open_clip = loaded.encode_text(tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(via_open_clip, T.encode_images(model, images), atol=1e-5)
    np.testing.assert_allclose(text_open_clip, T.encode_texts(model, texts, model_cfg=MICRO_CFG), atol=1e-5)
    # float16 storage halves the file and still loads (open_clip upcasts)
    half = T.save_model_dir(model, tmp_path / "h", model_cfg=MICRO_CFG, dtype="float16")
    assert (half / T.WEIGHTS_FILE).stat().st_size < 0.6 * (out / T.WEIGHTS_FILE).stat().st_size
    m16, _, _ = T.load_model_dir(half)
    assert next(m16.parameters()).dtype == torch.float32


def test_hard_caption_pools_change_exactly_one_attribute(micro_pairs):
    pools = T.hard_caption_pools(micro_pairs, 6, seed=2, weights={"shape": 1.0})
    assert pools == T.hard_caption_pools(micro_pairs, 6, seed=2, weights={"shape": 1.0})  # a pure function
    for pair, pool in zip(micro_pairs, pools):
        assert len(pool) == 6 and pool[0] == pair.hard_caption
        for caption in pool[1:]:  # the extra ones change the shape only: the shape word differs
            assert pair.attrs["shape"] not in caption and pair.attrs["colour"] in caption
    assert len({c for pool in pools for c in pool[1:]}) > 3 * len(pools)  # varied, not one caption repeated


@pytest.mark.slow
def test_several_hard_negatives_per_image(micro_pairs):
    rng = np.random.default_rng(0)
    assert sorted(T._draw_distinct(rng, 5, 5)) == [0, 1, 2, 3, 4]  # distinct while there are enough
    assert len(T._draw_distinct(rng, 2, 4)) == 4
    seen = []

    class Spy(T._TokenCache):
        def __call__(self, texts):
            seen.append(len(texts))
            return super().__call__(texts)

    orig = T._TokenCache
    T._TokenCache = Spy
    try:
        pools = T.hard_caption_pools(micro_pairs, 4, seed=1)
        T.train_clip([p.image_bytes for p in micro_pairs], [p.captions for p in micro_pairs], model_cfg=MICRO_CFG,
                     steps=2, batch_size=16, hard_negatives=pools, hard_per_image=3)
    finally:
        T._TokenCache = orig
    assert seen == [16 * 4, 16 * 4]  # 16 matched captions + 3 hard ones per image, each step


@pytest.mark.slow
def test_twin_batches_hold_each_scene_with_its_twin():
    pairs = W.scene_pairs(12, seed=4, twins=True, hard_weights={"shape": 1.0})
    n = len(pairs) // 2
    twin_of = list(range(n, 2 * n)) + list(range(n))
    batches = []
    orig = T._normalise
    T._normalise = lambda px, cfg, dev: (batches.append(px.clone()), orig(px, cfg, dev))[1]
    try:
        T.train_clip([p.image_bytes for p in pairs], [p.captions for p in pairs], model_cfg=MICRO_CFG, steps=3,
                     batch_size=8, twin_of=twin_of, hard_negatives=[(p.hard_caption,) for p in pairs])
    finally:
        T._normalise = orig
    pixels = T.images_to_uint8([p.image_bytes for p in pairs])
    for batch in batches:  # 4 scenes, then their 4 twins, in the same order
        rows = [next(i for i in range(2 * n) if torch.equal(pixels[i], img)) for img in batch]
        assert len(rows) == 8 and len(set(rows)) == 8
        assert [twin_of[r] for r in rows[:4]] == rows[4:]
    with pytest.raises(ValueError, match="twin_of"):
        T.train_clip([p.image_bytes for p in pairs], [p.captions for p in pairs], model_cfg=MICRO_CFG, steps=1,
                     twin_of=list(range(2 * n)))  # everyone its own twin


def test_transplant_keeps_text_tower_under_a_new_image_tower():
    torch.manual_seed(0)
    vit = T.build_model(MICRO_CFG)
    rn_cfg = copy.deepcopy(MICRO_CFG)
    rn_cfg["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16}
    rn, taken = T.transplant_weights(vit, T.build_model(rn_cfg))
    text_keys = [k for k in vit.state_dict() if not k.startswith("visual.")]
    assert taken == len(text_keys) and taken > 10
    assert all(torch.equal(rn.state_dict()[k], vit.state_dict()[k]) for k in text_keys)
    tokens = T.make_tokenizer(MICRO_CFG)(["two red circles"])
    assert torch.equal(rn.encode_text(tokens), vit.encode_text(tokens))


@pytest.mark.slow
def test_cli_end_to_end_writes_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "tiny"
    rc = T.main(["--output", str(out), "--steps", "3", "--batch-size", "16", "--scenes", "64", "--workers", "1",
                 "--eval-scenes", "32", "--zero-shot-n", "12", "--seed", "3", "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["params"] > 1_000_000
    report = json.loads((out / T.REPORT_FILE).read_text())
    for key in ("retrieval_i2t_top1", "auc_random", "auc_hard", "auc_hard_by_attribute", "zero_shot_accuracy"):
        assert key in report["heldout"]
    assert report["settings"]["seed"] == 3 and report["weights_bytes"] < 15_000_000
    model, preprocess, tokenizer = T.load_model_dir(out)
    assert isinstance(model, open_clip.CLIP)
    assert tokenizer(["a red circle"]).shape == (1, 32)


@pytest.mark.slow
def test_cli_model_config_with_another_image_size(tmp_path, capsys):
    """--model-config with image_size 32: images are preprocessed at 32 px and the saved preprocess says so."""
    cfg = copy.deepcopy(MICRO_CFG)
    cfg["vision_cfg"].update(image_size=32, patch_size=8)
    (tmp_path / "cfg.json").write_text(json.dumps({"model_cfg": cfg}))
    out = tmp_path / "m32"
    assert T.main(["--output", str(out), "--model-config", str(tmp_path / "cfg.json"), "--steps", "2",
                   "--batch-size", "8", "--scenes", "24", "--workers", "1", "--eval-scenes", "16",
                   "--zero-shot-n", "0", "--seed", "2", "--quiet"]) == 0
    saved = json.loads((out / T.CONFIG_FILE).read_text())
    assert saved["preprocess_cfg"]["size"] == 32 and saved["model_cfg"]["vision_cfg"]["image_size"] == 32
    model, preprocess, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    x = preprocess(Image.open(io.BytesIO(W.scene_pairs(1, seed=9)[0].image_bytes)).convert("RGB"))
    assert x.shape == (3, 32, 32) and model.encode_image(x[None]).shape == (1, 32)


def test_cli_errors(tmp_path, capsys):
    assert T.main(["--output", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert T.main(["--output", str(tmp_path), "--seed", "5", "--eval-seed", "5"]) == 2
    if not torch.cuda.is_available():
        assert T.main(["--output", str(tmp_path), "--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err
    assert T.main(["--output", str(tmp_path), "--hard-per-image", "0"]) == 2
    assert "--hard-per-image must be >= 1" in capsys.readouterr().err
    assert T.main(["--output", str(tmp_path), "--hard-weights", "mood=1"]) == 2
    assert "--hard-weights" in capsys.readouterr().err
    assert T.main(["--output", str(tmp_path), "--init-from", str(tmp_path / "missing")]) == 2
    assert "--init-from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main([])  # --output is required


# ---------------------------------------------------------------------------------------------
# The shipped checkpoint

def test_shipped_checkpoint_files():
    d = T.synthetic_tiny_dir()
    assert (d / T.CONFIG_FILE).is_file() and (d / T.WEIGHTS_FILE).is_file()
    assert (d / T.WEIGHTS_FILE).stat().st_size <= 15_000_000
    cfg = json.loads((d / T.CONFIG_FILE).read_text())
    assert set(cfg) >= {"model_cfg", "preprocess_cfg"}
    report = json.loads((d / T.REPORT_FILE).read_text())
    # the targets: (a) >= 0.99 (measured 1.0), (b) >= 0.95 (measured 0.979; shape changes 0.92)
    assert report["heldout"]["auc_random"] >= 0.99 and report["heldout"]["auc_hard"] >= 0.95
    assert min(report["heldout"]["auc_hard_by_attribute"].values()) >= 0.9
    assert cfg["model_cfg"] == T.TINY_RESNET_MODEL_CFG and cfg["preprocess_cfg"]["size"] == 64
    assert report["settings"]["seed"] != report["settings"]["eval_seed"]


@pytest.fixture(scope="module")
def shipped():
    d = T.synthetic_tiny_dir()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{d}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{d}")


@pytest.mark.slow
def test_shipped_model_separates_matched_from_mismatched_on_a_fresh_world(shipped):
    model, preprocess, tokenizer = shipped
    world = W.generate_world(300, seed=4242, mismatch_random=0.25, mismatch_hard=0.25, dup_exact=0, dup_near=0,
                             unsafe=0, eval_leak=0)
    items = world.items
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(io.BytesIO(it.image_bytes)).convert("RGB")) for it in items])
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(tokenizer([it.caption for it in items]), normalize=True)
    score = (img * txt).sum(1).numpy()
    kind = np.array([it.kind for it in items])
    auc_random = T.roc_auc(score[kind == "matched"], score[kind == "mismatch_random"])
    auc_hard = T.roc_auc(score[kind == "matched"], score[kind == "mismatch_hard"])
    assert auc_random >= 0.98, auc_random
    assert auc_hard >= 0.93, auc_hard  # measured 0.96 (held-out figure in training.json: 0.979)


@pytest.mark.slow
def test_shipped_model_knows_the_unsafe_concept(shipped):
    model, preprocess, tokenizer = shipped
    rng = np.random.default_rng(77)
    attrs = [W.sample_attributes(rng) for _ in range(40)]
    with torch.no_grad():
        prompts = model.encode_text(tokenizer(list(W.UNSAFE_CONCEPT_PROMPTS + W.NEUTRAL_CONCEPT_PROMPTS)),
                                    normalize=True)
        unsafe_dir = prompts[:len(W.UNSAFE_CONCEPT_PROMPTS)].mean(0)
        neutral_dir = prompts[len(W.UNSAFE_CONCEPT_PROMPTS):].mean(0)
        scores = {}
        for flag in (True, False):
            x = torch.stack([preprocess(W.render_scene(a, [5, i], unsafe=flag)) for i, a in enumerate(attrs)])
            e = model.encode_image(x, normalize=True)
            scores[flag] = ((e @ unsafe_dir).numpy(), (e @ neutral_dir).numpy())
    # similarity to the unsafe prompts separates images with the motif (measured 0.89; 0.85 on 200); the neutral
    # prompts carry no signal for this model (subtracting them only adds noise)
    assert T.roc_auc(scores[True][0], scores[False][0]) >= 0.85
    assert abs(T.roc_auc(scores[True][1], scores[False][1]) - 0.5) < 0.25
