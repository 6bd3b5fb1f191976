"""The CPU embedder runs TorchScript traces of the CLIP towers, checked against the eager model, and falls
back to eager when tracing fails."""
import numpy as np
import torch

import clip_curate.stages.embed as embed
from clip_curate.models.clip import ModelConfig, open_clip_image_size


def _inputs(e, n=5):
    size = open_clip_image_size(e.loaded.model)
    images = np.random.default_rng(0).integers(0, 255, (n, 3, size, size), dtype=np.uint8)
    tokens = e.loaded.tokenizer(["a red circle", "a dog", "", "two blue squares on grass", "x y z"][:n]).numpy()
    return images, tokens


def _eager(e, images, tokens):
    with torch.inference_mode():
        img = e.loaded.model.encode_image(e.to_model_input(images))
        txt = e.loaded.model.encode_text(torch.from_numpy(tokens))
    return (torch.nn.functional.normalize(img.float(), dim=-1).numpy(),
            torch.nn.functional.normalize(txt.float(), dim=-1).numpy())


def test_cpu_embedder_is_traced_and_equals_the_eager_model():
    e = embed.ClipEmbedder(ModelConfig(clip_model="test-tiny-random", device="cpu"))
    assert isinstance(e._encode_image, torch.jit.ScriptModule) and isinstance(e._encode_text, torch.jit.ScriptModule)
    images, tokens = _inputs(e)  # a batch size the trace was not made with
    got, want = e.embed(images, tokens), _eager(e, images, tokens)
    assert np.abs(got[0] - want[0]).max() <= embed.TRACE_TOLERANCE
    assert np.abs(got[1] - want[1]).max() <= embed.TRACE_TOLERANCE


def test_tracing_failure_keeps_the_eager_model(monkeypatch, caplog):
    def refuse(*a, **k):
        raise RuntimeError("cannot trace this model")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    with caplog.at_level("INFO"):
        e = embed.ClipEmbedder(ModelConfig(clip_model="test-tiny-random", device="cpu"))
    assert not isinstance(e._encode_image, torch.jit.ScriptModule)
    assert "runs eagerly (tracing failed: cannot trace this model)" in caplog.text
    images, tokens = _inputs(e, 3)
    got, want = e.embed(images, tokens), _eager(e, images, tokens)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_a_trace_that_disagrees_is_not_used(monkeypatch, caplog):
    real = torch.jit.trace

    def off_by_one(module, example, **kw):
        traced = real(module, example, **kw)
        return _Shifted(traced)

    class _Shifted(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 1.0

    monkeypatch.setattr(torch.jit, "trace", off_by_one)
    monkeypatch.setattr(torch.jit, "freeze", lambda m: m)
    with caplog.at_level("INFO"):
        e = embed.ClipEmbedder(ModelConfig(clip_model="test-tiny-random", device="cpu"))
    assert "runs eagerly (traced output differs by 1)" in caplog.text
    assert not isinstance(e._encode_image, _Shifted)
