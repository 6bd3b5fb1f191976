"""Embedding failures are rows: a batch whose forward pass raises is retried element by element, and
elements that still fail are rejected ``embed/embed_error`` with the exception's first line; the job goes on."""
from __future__ import annotations

import numpy as np
import pytest

from clip_curate.models.clip import ModelConfig
from clip_curate.stages.embed import ClipEmbedder, ClipModelHandler, Embed, EmbedFailure, failure_detail

CFG = ModelConfig(clip_model="test-tiny-random", device="cpu", batch_size=4)
POISON = "poison"  # captions starting with this make the fake model raise


class _PoisonedEmbedder(ClipEmbedder):
    """The real tiny model, except that a batch holding a poisoned caption raises (like a bad tensor would);
    a batch of more than ``oom_over`` examples raises an out-of-memory error."""

    def __init__(self, config, poisoned_tokens, oom_over):
        super().__init__(config)
        self._poisoned = poisoned_tokens
        self._oom_over = oom_over

    def embed(self, images, tokens):
        if self._oom_over is not None and len(images) > self._oom_over:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nsecond line of the message")
        for t in tokens:
            if any(np.array_equal(t, p) for p in self._poisoned):
                raise ValueError(f"bad tensor for this example\nshape {tuple(images.shape)}")
        return super().embed(images, tokens)


class _PoisonedHandler(ClipModelHandler):
    def __init__(self, config, poisoned_captions=(), oom_over=None):
        super().__init__(config)
        self._captions = tuple(poisoned_captions)
        self._oom_over = oom_over

    def load_model(self):
        from clip_curate.models.clip import load_preprocess

        tok = load_preprocess(self._config)[1]
        poisoned = [tok([c])[0].numpy().astype(np.int64) for c in self._captions]
        return _PoisonedEmbedder(self._config, poisoned, self._oom_over)


class _PoisonedEmbed(Embed):
    def __init__(self, config, poisoned_captions=(), oom_over=None):
        super().__init__(config)
        self._poison_args = (tuple(poisoned_captions), oom_over)

    def handler(self):
        from apache_beam.ml.inference.base import KeyedModelHandler

        return KeyedModelHandler(_PoisonedHandler(self._config, *self._poison_args))


def _rows(jpeg, n):
    captions = [f"{POISON} {i}" if i in (2, 5) else f"a photo number {i}" for i in range(n)]
    return [{"uid": f"u{i}", "url": f"http://x/{i}", "caption": captions[i], "image": jpeg(i, shape=(40, 40))}
            for i in range(n)]


def test_failure_detail_is_the_first_line():
    exc = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")
    assert failure_detail(exc) == "embedding failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert failure_detail(ValueError()) == "embedding failed: ValueError"


def test_handler_retries_a_failing_batch_element_by_element(jpeg):
    """Direct handler call: the batch raises, each element is retried alone, only the poisoned ones fail."""
    from clip_curate.stages.embed import _Prepare

    rows = _rows(jpeg, 4)
    prep = _Prepare(CFG, "k")
    prep.setup()
    examples = [next(iter(prep.process(r)))[1] for r in rows]
    handler = _PoisonedHandler(CFG, poisoned_captions=[rows[2]["caption"]])
    out = list(handler.run_inference(examples, handler.load_model()))
    assert len(out) == 4
    assert isinstance(out[2].inference, EmbedFailure)
    assert out[2].inference.detail == "embedding failed: ValueError: bad tensor for this example"
    for i in (0, 1, 3):
        img, txt, score = out[i].inference
        assert img.shape == (32,) and np.isfinite(score)


@pytest.mark.slow
def test_failed_elements_are_rejected_rows_and_the_job_goes_on(jpeg, run_transform):
    rows = _rows(jpeg, 8)
    poisoned = [r["caption"] for r in rows if r["caption"].startswith(POISON)]
    kept, rejected, counters, _ = run_transform(rows, _PoisonedEmbed(CFG, poisoned_captions=poisoned))
    assert len(kept) + len(rejected) == len(rows)
    assert sorted(r["uid"] for r in rejected) == ["u2", "u5"]
    for r in rejected:
        assert (r["stage"], r["reason"]) == ("embed", "embed_error")
        assert r["detail"] == "embedding failed: ValueError: bad tensor for this example"
    assert all(r["clip_score"] is not None and len(r["image_embedding"]) == 32 for r in kept)
    assert counters["embed_embed_error"] == 2
    assert counters["embed_batch_retries"] >= 1  # batches holding a poisoned element were retried
    assert counters["embedded_rows"] == 6


@pytest.mark.slow
def test_out_of_memory_batches_fall_back_to_single_elements(jpeg, run_transform):
    """Every batch of more than one example runs out of memory: each element is embedded alone, none is lost."""
    rows = _rows(jpeg, 6)
    kept, rejected, counters, _ = run_transform(rows, _PoisonedEmbed(CFG, oom_over=1))
    assert rejected == [] and len(kept) == 6
    assert counters["embed_batch_retries"] >= 1 and counters["embedded_rows"] == 6
