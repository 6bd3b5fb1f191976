"""Model loading: names, hub tags, offline hub, local checkpoints (safetensors / weights_only torch),
refused pickles, devices and precision flags on CPU."""
from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest
import torch

from clip_curate.models import clip as cm
from clip_curate.models.clip import (ModelConfig, encode_images, encode_texts, load_clip, model_id,
                                    validate_model_config)
from clip_curate.fields import ConfigError

TINY = ModelConfig(clip_model="test-tiny-random", device="cpu")
TEXTS = ["a red circle", "two blue squares on a striped background", "ein roter Kreis"]


@pytest.fixture(scope="module")
def tiny():
    return load_clip(TINY)


def _images(n=3, size=48):
    from PIL import Image

    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 7, 3), dtype=np.uint8)) for _ in range(n)]


def _local_dir(tmp_path, tiny, fmt="safetensors"):
    d = tmp_path / f"ckpt-{fmt}"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cm.TEST_TINY_MODEL_CFG, "preprocess_cfg": dict(cm.TEST_TINY_PREPROCESS_CFG)}))
    sd = {k: v.contiguous().clone() for k, v in tiny.model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(d / "open_clip_model.safetensors"))
    else:
        torch.save({"state_dict": sd}, str(d / "open_clip_pytorch_model.bin"))
    return d


def test_random_init_is_seeded_and_normalised(tiny):
    again = load_clip(TINY)
    for (k, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    t = encode_texts(tiny, TEXTS)
    i = encode_images(tiny, _images())
    assert t.shape == (3, 32) and i.shape == (3, 32) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(i, axis=1), 1.0, atol=1e-5)
    assert tiny.model_id == "test-tiny-random@random-init" and tiny.embed_dim == 32
    assert encode_texts(tiny, []).shape == (0, 32)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_local_checkpoint_dir_and_file(tmp_path, tiny, fmt):
    d = _local_dir(tmp_path, tiny, fmt)
    expected = encode_texts(tiny, TEXTS)
    for name in (str(d), f"local-dir:{d}", str(next(p for p in d.iterdir() if p.name != "open_clip_config.json"))):
        cfg = ModelConfig(clip_model=name, device="cpu")
        validate_model_config(cfg)
        loaded = load_clip(cfg)
        np.testing.assert_allclose(encode_texts(loaded, TEXTS), expected, atol=1e-6)
        np.testing.assert_allclose(encode_images(loaded, _images()), encode_images(tiny, _images()), atol=1e-6)
        assert "@" in loaded.model_id and loaded.model_id == model_id(cfg)


def test_arch_name_with_local_weights_file(tmp_path, tiny):
    """``--clip-model ARCH --clip-pretrained FILE`` with an architecture in open_clip's registry."""
    import open_clip

    arch_dir = tmp_path / "archs"
    arch_dir.mkdir()
    (arch_dir / "Tiny-Test-Arch.json").write_text(json.dumps(cm.TEST_TINY_MODEL_CFG))
    open_clip.add_model_config(str(arch_dir))
    d = _local_dir(tmp_path, tiny)
    cfg = ModelConfig(clip_model="Tiny-Test-Arch", clip_pretrained=str(d / "open_clip_model.safetensors"),
                      device="cpu")
    validate_model_config(cfg)
    loaded = load_clip(cfg)
    np.testing.assert_allclose(encode_texts(loaded, TEXTS), encode_texts(tiny, TEXTS), atol=1e-6)
    assert model_id(cfg).startswith("Tiny-Test-Arch@open_clip_model.safetensors@")
    with pytest.raises(ConfigError, match="--clip-pretrained: weights file not found"):
        validate_model_config(ModelConfig(clip_model="Tiny-Test-Arch", clip_pretrained=str(tmp_path / "no.pt")))


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def test_pickled_objects_are_refused_not_executed(tmp_path, tiny):
    d = _local_dir(tmp_path, tiny, "torch")
    marker = tmp_path / "pwned"
    ckpt = d / "open_clip_pytorch_model.bin"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": _Evil(str(marker))}, str(ckpt))
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        load_clip(ModelConfig(clip_model=str(d), device="cpu"))
    assert not marker.exists()


def test_loading_errors_are_config_errors(tmp_path, tiny):
    cases = [
        (ModelConfig(clip_model="ViT-B-33"), "unknown model 'ViT-B-33'; did you mean ViT-B-32"),
        (ModelConfig(clip_model="syntetic-tiny"), "did you mean synthetic-tiny"),
        (ModelConfig(clip_model=str(tmp_path / "missing.safetensors")), "checkpoint not found"),
        (ModelConfig(clip_model=str(tmp_path / "nodir/")), "checkpoint not found"),
        (ModelConfig(clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b78k"),
         "unknown tag 'laion2b_s34b_b78k' for ViT-B-32; did you mean laion2b_s34b_b79k"),
        (ModelConfig(clip_model="test-tiny-random", clip_pretrained="openai"), "--clip-pretrained: not used"),
    ]
    for cfg, msg in cases:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
            validate_model_config(cfg, check_network=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="has no open_clip_config.json"):
        validate_model_config(ModelConfig(clip_model=str(empty)))
    bare = tmp_path / "bare" / "weights.safetensors"
    bare.parent.mkdir()
    bare.write_bytes(b"x")
    with pytest.raises(ConfigError, match="needs its architecture"):
        validate_model_config(ModelConfig(clip_model=str(bare)))
    # A checkpoint whose tensors don't fit the config, and a corrupt safetensors file.
    d = _local_dir(tmp_path, tiny)
    cfg_json = json.loads((d / "open_clip_config.json").read_text())
    cfg_json["model_cfg"]["embed_dim"] = 48
    (d / "open_clip_config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ConfigError, match="does not match the model config"):
        load_clip(ModelConfig(clip_model=str(d), device="cpu"))
    (d / "open_clip_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match="cannot read safetensors"):
        load_clip(ModelConfig(clip_model=str(d), device="cpu"))
    for bad in (dict(batch_size=0), dict(clip_model=" ")):
        with pytest.raises(ConfigError):
            ModelConfig(**bad)


def test_synthetic_tiny_missing_or_present():
    d = cm.synthetic_tiny_dir()
    cfg = ModelConfig(clip_model="synthetic-tiny", device="cpu")
    if (d / "open_clip_config.json").is_file():
        validate_model_config(cfg)
        assert model_id(cfg).startswith("synthetic-tiny@")
    else:
        with pytest.raises(ConfigError, match="bundled checkpoint is missing"):
            validate_model_config(cfg)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("name,tag", [("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-B-32", "openai"),
                                      ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)])
def test_offline_hub_is_one_clear_error(monkeypatch, tmp_path, name, tag):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    monkeypatch.setenv("HOME", str(tmp_path))            # empty ~/.cache/clip
    cfg = ModelConfig(clip_model=name, clip_pretrained=tag)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"weights are not cached and can't be fetched \(HF_HUB_OFFLINE is set\)"
                                          r".*--clip-model local-dir:DIR"):
        validate_model_config(cfg)
    # Not flagged offline, but the hub endpoint refuses connections: the quick probe says so.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ConfigError, match="cannot connect to http://127.0.0.1"):
        validate_model_config(cfg)


def test_cuda_without_gpu_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    cfg = ModelConfig(clip_model="test-tiny-random", device="cuda")
    with pytest.raises(ConfigError, match="--device cuda: no CUDA device"):
        validate_model_config(cfg)
    with pytest.raises(ConfigError, match="--device cuda"):
        load_clip(cfg)
    # With a resource hint, workers (not the launcher) have the GPU: construction passes, loading checks.
    validate_model_config(ModelConfig(clip_model="test-tiny-random", device="cuda",
                                      accelerator="type:nvidia-tesla-t4;count:1;install-nvidia-driver"))
    assert cm.resolve_device("auto") == "cpu"


def test_precision_flags_on_cpu(tiny, caplog):
    ref = encode_images(tiny, _images())
    with caplog.at_level(logging.WARNING, logger="clip_curate.models.clip"):
        validate_model_config(ModelConfig(clip_model="test-tiny-random", device="cpu", precision="fp16"))
    assert "--precision fp16: not supported on CPU; the embedding stage runs in fp32" in caplog.text
    fp16 = load_clip(ModelConfig(clip_model="test-tiny-random", device="cpu", precision="fp16"))
    assert fp16.precision == "fp32"
    np.testing.assert_allclose(encode_images(fp16, _images()), ref, atol=1e-6)
    caplog.clear()
    bf16_cfg = ModelConfig(clip_model="test-tiny-random", device="cpu", precision="bf16")
    with caplog.at_level(logging.WARNING, logger="clip_curate.models.clip"):
        validate_model_config(bf16_cfg)
    assert "--precision bf16 on CPU: runs under torch CPU autocast" in caplog.text
    bf16 = load_clip(bf16_cfg)
    assert bf16.precision == "bf16"
    got = encode_images(bf16, _images())
    assert got.dtype == np.float32
    assert np.min(np.sum(got * ref, axis=1)) > 0.98  # bf16 rounding only
    assert cm.embed_model_key(bf16_cfg).endswith("/bf16")
    assert cm.embed_model_key(ModelConfig(clip_model="test-tiny-random", device="cpu",
                                          precision="fp16")).endswith("/fp32")


def test_model_id_follows_weights(tmp_path, tiny):
    d = _local_dir(tmp_path, tiny)
    cfg = ModelConfig(clip_model=str(d))
    first = model_id(cfg)
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    sd["logit_scale"] = sd["logit_scale"] + 1
    save_file(sd, str(d / "open_clip_model.safetensors"))
    assert model_id(cfg) != first
    assert model_id(ModelConfig(clip_model="ViT-B-32", clip_pretrained="none")) == "ViT-B-32@random-init"
    assert model_id(ModelConfig(clip_model="ViT-B-32", clip_pretrained="openai")) == "ViT-B-32@openai"
