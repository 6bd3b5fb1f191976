"""Embedding stage: the open_clip ModelHandler in RunInference, keyed identity, batching, reuse of
stored embeddings, decode failures as rejections, and the GPU resource hint."""
from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
import pytest
import torch
from PIL import Image

from clip_curate.models.clip import ModelConfig, load_clip
from clip_curate.stages.embed import ClipModelHandler, Embed, pixel_plan, prepare_image

CFG = ModelConfig(clip_model="test-tiny-random", device="cpu", batch_size=4)


@pytest.fixture(scope="session")
def make_rows(jpeg):
    def make(n: int) -> list[dict]:
        return [{"uid": f"u{i:03d}", "url": f"http://127.0.0.1/{i}.jpg", "caption": f"{i} red circles on grass",
                 "image": jpeg(i, shape=(30 + i, 50))} for i in range(n)]
    return make


@pytest.fixture(scope="module")
def loaded():
    return load_clip(CFG)


def _direct(loaded, row):
    """Plain open_clip: the model's own transform on the decoded image, both towers, cosine."""
    img = Image.open(io.BytesIO(row["image"])).convert("RGB")
    x = loaded.preprocess(img).unsqueeze(0)
    t = loaded.tokenizer([row["caption"]])
    with torch.no_grad():
        ie = loaded.model.encode_image(x, normalize=True)[0].numpy()
        te = loaded.model.encode_text(t, normalize=True)[0].numpy()
    return ie, te, float(ie @ te)


def test_preprocessing_split_equals_open_clip_transform(loaded, jpeg):
    plan = pixel_plan(loaded.preprocess)
    assert plan.mean is not None
    data = jpeg(7, shape=(61, 33))
    u8 = prepare_image(data, plan)
    assert u8.dtype == np.uint8 and u8.shape == (3, 32, 32)
    x = (torch.from_numpy(u8).float() / 255 - torch.tensor(plan.mean).view(3, 1, 1)) / torch.tensor(plan.std).view(3, 1, 1)
    ref = loaded.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
    torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)


def test_handler_batches_and_keeps_order(loaded, make_rows):
    handler = ClipModelHandler(CFG)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 4}
    assert not handler.share_model_across_processes()
    assert ClipModelHandler(ModelConfig(clip_model="test-tiny-random", share_model=True)).share_model_across_processes()
    embedder = handler.load_model()
    plan = pixel_plan(loaded.preprocess)
    rows = make_rows(6)
    examples = [(prepare_image(r["image"], plan), loaded.tokenizer([r["caption"]])[0].numpy()) for r in rows]
    batched = list(handler.run_inference(examples, embedder))
    singles = [list(handler.run_inference([e], embedder))[0] for e in examples]
    assert len(batched) == 6
    for b, s, r in zip(batched, singles, rows):
        ie, te, score = _direct(loaded, r)
        np.testing.assert_allclose(b.inference[0], ie, atol=1e-5)
        np.testing.assert_allclose(b.inference[1], te, atol=1e-5)
        assert abs(b.inference[2] - score) < 1e-5 and abs(s.inference[2] - score) < 1e-5


def test_embed_stage_in_pipeline_matches_direct_forward(loaded, make_rows, run_transform):
    rows = make_rows(11)
    rows.append({"uid": "corrupt", "url": "u", "caption": "c", "image": b"\xff\xd8\xff\xe0 not really a jpeg"})
    rows.append({"uid": "noimage", "url": "u", "caption": "c", "image": None})
    kept, rejected, counters, _ = run_transform(rows, Embed(CFG))
    assert sorted(r["uid"] for r in kept) == sorted(f"u{i:03d}" for i in range(11))
    by_uid = {r["uid"]: r for r in rows}
    for r in kept:
        ie, te, score = _direct(loaded, by_uid[r["uid"]])
        assert r["image_embedding"].dtype == np.float32 and r["image_embedding"].shape == (32,)
        np.testing.assert_allclose(r["image_embedding"], ie, atol=1e-5)
        np.testing.assert_allclose(r["text_embedding"], te, atol=1e-5)
        assert abs(r["clip_score"] - score) < 1e-5
        assert r["embed_model"] == "test-tiny-random@random-init/fp32"
        assert r["caption"] == by_uid[r["uid"]]["caption"] and r["url"] == by_uid[r["uid"]]["url"]
    rej = {r["uid"]: r for r in rejected}
    assert set(rej) == {"corrupt", "noimage"}
    assert {r["stage"] for r in rejected} == {"embed"} and {r["reason"] for r in rejected} == {"embed_error"}
    assert rej["corrupt"]["detail"].startswith("image decode failed: ") and "0x" not in rej["corrupt"]["detail"]
    assert rej["noimage"]["detail"] == "no image bytes" and "image" not in rej["noimage"]
    assert counters["embed_in"] == 13 and counters["embed_out"] == 11
    assert counters["embedded_rows"] == 11 and counters["embed_embed_error"] == 2


def test_stored_embeddings_of_the_same_model_are_reused(make_rows, run_transform):
    rows = make_rows(6)
    stored = []
    for i, r in enumerate(rows[:4]):
        emb = np.full(32, 1 / np.sqrt(32), np.float32)
        key = "test-tiny-random@random-init/fp32" if i < 3 else "other-model@x/fp32"
        stored.append(dict(r, image_embedding=emb, text_embedding=emb, clip_score=0.5, embed_model=key))
    kept, rejected, counters, _ = run_transform(stored + rows[4:], Embed(CFG))
    assert not rejected and len(kept) == 6
    scores = {r["uid"]: r["clip_score"] for r in kept}
    assert [scores[f"u{i:03d}"] for i in range(3)] == [0.5, 0.5, 0.5]   # reused as stored
    assert scores["u003"] != 0.5                                          # other model: recomputed
    assert counters["embedded_rows"] == 3 and counters["embed_reused"] == 3
    _, _, counters, _ = run_transform(stored[:3], Embed(ModelConfig(clip_model="test-tiny-random", device="cpu",
                                                                    batch_size=4, reuse_embeddings=False)))
    assert counters["embedded_rows"] == 3


@pytest.mark.slow
def test_multiprocess_workers_agree(loaded, make_rows, run_transform):
    """Two DirectRunner worker processes each load the model; seeded init keeps scores identical."""
    rows = make_rows(16)
    kept, _, counters, _ = run_transform(rows, Embed(CFG),
                                         options=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert len(kept) == 16 and counters["embedded_rows"] == 16
    by_uid = {r["uid"]: r for r in rows}
    for r in kept:
        assert abs(r["clip_score"] - _direct(loaded, by_uid[r["uid"]])[2]) < 1e-5


def test_accelerator_resource_hint_on_run_inference(make_rows):
    acc = "type:nvidia-tesla-t4;count:1;install-nvidia-driver"
    p = beam.Pipeline()
    _ = p | beam.Create(make_rows(1)) | "Embed" >> Embed(ModelConfig(clip_model="test-tiny-random", accelerator=acc))
    proto = p.to_runner_api()
    hinted = {t.unique_name: dict(t.environment_id and proto.components.environments[t.environment_id].resource_hints
                                  or {}) for t in proto.components.transforms.values()}
    with_hint = [name for name, hints in hinted.items()
                 if any(acc.encode() in v for v in hints.values())]
    assert any("RunInference" in n for n in with_hint)
    assert not any("Prepare" in n for n in with_hint)
