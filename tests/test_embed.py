"""Embedding stage: the open_clip ModelHandler in RunInference, keyed identity, batching, reuse of
stored embeddings, decode failures as rejections, and the GPU resource hint."""
from __future__ import annotations

import io
import pickle
import tempfile

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.metrics.metric import MetricsFilter
from PIL import Image

from clip_curate import records
from clip_curate.models.clip import ModelConfig, load_clip
from clip_curate.stages.embed import ClipModelHandler, Embed, pixel_plan, prepare_image

CFG = ModelConfig(clip_model="test-tiny-random", device="cpu", batch_size=4)


def _jpeg(seed: int, h: int = 40, w: int = 52) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _rows(n: int) -> list[dict]:
    return [{"uid": f"u{i:03d}", "url": f"http://127.0.0.1/{i}.jpg", "caption": f"{i} red circles on grass",
             "image": _jpeg(i, 30 + i, 50)} for i in range(n)]


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


def _run(rows, cfg=CFG, options=None):
    """Run Embed on ``rows``; returns (kept, rejected, clip_curate counters)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    def _dump(items, path):  # nested: pickled by value, so worker processes need not import this file
        import pickle

        with open(path, "wb") as f:
            pickle.dump(list(items), f)

    with tempfile.TemporaryDirectory() as tmp:
        p = beam.Pipeline(options=PipelineOptions(options or []))
        kept, rejected = p | beam.Create(rows) | Embed(cfg)
        for name, pc in (("kept", kept), ("rejected", rejected)):
            pc | f"List{name}" >> beam.combiners.ToList() | f"Dump{name}" >> beam.Map(_dump, f"{tmp}/{name}.pkl")
        result = p.run()
        result.wait_until_finish()
        out = {}
        for name in ("kept", "rejected"):
            with open(f"{tmp}/{name}.pkl", "rb") as f:
                out[name] = pickle.load(f)
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(MetricsFilter().with_namespace(records.METRICS_NAMESPACE))["counters"]}
    return out["kept"], out["rejected"], counters


def test_preprocessing_split_equals_open_clip_transform(loaded):
    plan = pixel_plan(loaded.preprocess)
    assert plan.mean is not None
    data = _jpeg(7, 61, 33)
    u8 = prepare_image(data, plan)
    assert u8.dtype == np.uint8 and u8.shape == (3, 32, 32)
    x = (torch.from_numpy(u8).float() / 255 - torch.tensor(plan.mean).view(3, 1, 1)) / torch.tensor(plan.std).view(3, 1, 1)
    ref = loaded.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
    torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)


def test_handler_batches_and_keeps_order(loaded):
    handler = ClipModelHandler(CFG)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 4}
    assert not handler.share_model_across_processes()
    assert ClipModelHandler(ModelConfig(clip_model="test-tiny-random", share_model=True)).share_model_across_processes()
    embedder = handler.load_model()
    plan = pixel_plan(loaded.preprocess)
    rows = _rows(6)
    examples = [(prepare_image(r["image"], plan), loaded.tokenizer([r["caption"]])[0].numpy()) for r in rows]
    batched = list(handler.run_inference(examples, embedder))
    singles = [list(handler.run_inference([e], embedder))[0] for e in examples]
    assert len(batched) == 6
    for b, s, r in zip(batched, singles, rows):
        ie, te, score = _direct(loaded, r)
        np.testing.assert_allclose(b.inference[0], ie, atol=1e-5)
        np.testing.assert_allclose(b.inference[1], te, atol=1e-5)
        assert abs(b.inference[2] - score) < 1e-5 and abs(s.inference[2] - score) < 1e-5


def test_embed_stage_in_pipeline_matches_direct_forward(loaded):
    rows = _rows(11)
    rows.append({"uid": "corrupt", "url": "u", "caption": "c", "image": b"\xff\xd8\xff\xe0 not really a jpeg"})
    rows.append({"uid": "noimage", "url": "u", "caption": "c", "image": None})
    kept, rejected, counters = _run(rows)
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


def test_stored_embeddings_of_the_same_model_are_reused():
    rows = _rows(6)
    stored = []
    for i, r in enumerate(rows[:4]):
        emb = np.full(32, 1 / np.sqrt(32), np.float32)
        key = "test-tiny-random@random-init/fp32" if i < 3 else "other-model@x/fp32"
        stored.append(dict(r, image_embedding=emb, text_embedding=emb, clip_score=0.5, embed_model=key))
    kept, rejected, counters = _run(stored + rows[4:])
    assert not rejected and len(kept) == 6
    scores = {r["uid"]: r["clip_score"] for r in kept}
    assert [scores[f"u{i:03d}"] for i in range(3)] == [0.5, 0.5, 0.5]   # reused as stored
    assert scores["u003"] != 0.5                                          # other model: recomputed
    assert counters["embedded_rows"] == 3 and counters["embed_reused"] == 3
    _, _, counters = _run(stored[:3], ModelConfig(clip_model="test-tiny-random", device="cpu", batch_size=4,
                                                 reuse_embeddings=False))
    assert counters["embedded_rows"] == 3


def test_multiprocess_workers_agree(loaded):
    """Two DirectRunner worker processes each load the model; seeded init keeps scores identical."""
    rows = _rows(16)
    kept, _, counters = _run(rows, options=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert len(kept) == 16 and counters["embedded_rows"] == 16
    by_uid = {r["uid"]: r for r in rows}
    for r in kept:
        assert abs(r["clip_score"] - _direct(loaded, by_uid[r["uid"]])[2]) < 1e-5


def test_accelerator_resource_hint_on_run_inference():
    acc = "type:nvidia-tesla-t4;count:1;install-nvidia-driver"
    p = beam.Pipeline()
    _ = p | beam.Create(_rows(1)) | "Embed" >> Embed(ModelConfig(clip_model="test-tiny-random", accelerator=acc))
    proto = p.to_runner_api()
    hinted = {t.unique_name: dict(t.environment_id and proto.components.environments[t.environment_id].resource_hints
                                  or {}) for t in proto.components.transforms.values()}
    with_hint = [name for name, hints in hinted.items()
                 if any(acc.encode() in v for v in hints.values())]
    assert any("RunInference" in n for n in with_hint)
    assert not any("Prepare" in n for n in with_hint)
