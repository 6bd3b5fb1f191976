"""The embed stage's fast CLIP preprocessing (simplejpeg + OpenCV) against open_clip's own eval transform.

Tolerance (docs/clip.md): for model inputs of 224 px or more, a shrink by less than 2x (the stored 256 px image
-> ViT-B-32's 224) uses OpenCV's bicubic resize: mean |pixel difference| < 3 levels (about 0.7 on photos) and image-embedding cosine >= 0.9999 to
open_clip's Pillow path on photos and smooth images (>= 0.995 on white noise, the worst case); every other scale, and every input that is not a JPEG, gives open_clip's pixels exactly.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from clip_curate.models.clip import ModelConfig, load_clip, load_preprocess
from clip_curate.stages.embed import fast_pixels, pixel_plan, prepare_image, resized_geometry
from clip_curate.stages.image import ImageConfig, process_image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "hubble_deep_field", "immunohistochemistry")


def _encode(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def stored() -> dict[str, bytes]:
    """The image stage's stored 256 px JPEGs of real photos and of synthetic images of several shapes."""
    from skimage import data

    rng = np.random.default_rng(3)
    raw = {name: _encode(np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB"))) for name in PHOTOS}
    yy, xx = np.mgrid[0:420, 0:700] / 700.0
    raw["gradient_700x420"] = _encode(np.stack([xx * 255, yy * 255, (1 - xx) * 255], -1).astype(np.uint8))
    raw["noise_300x900"] = _encode(rng.integers(0, 256, (900, 300, 3), dtype=np.uint8))
    raw["gray_512x512"] = _encode(data.camera())           # a grayscale JPEG
    return {k: process_image(v, ImageConfig()).fields["image"] for k, v in raw.items()}


def _open_clip_input(loaded, data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return loaded.preprocess(im)


def _normalised(plan, pixels: list[np.ndarray]) -> torch.Tensor:
    mean = torch.tensor(plan.mean).view(1, 3, 1, 1)
    std = torch.tensor(plan.std).view(1, 3, 1, 1)
    return torch.from_numpy(np.stack(pixels)).float().div(255.0).sub(mean).div(std)


def test_geometry_is_torchvision_resize_and_center_crop():
    import torchvision.transforms.functional as F

    for w, h in [(256, 256), (256, 384), (384, 256), (257, 911), (1000, 256), (300, 299), (64, 65), (223, 500)]:
        for size in (32, 64, 224, 256):
            nh, nw = F._compute_resized_output_size((h, w), [size])
            rw, rh, left, top = resized_geometry(w, h, size)
            assert (rw, rh) == (nw, nh)
            assert (left, top) == (int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0)))


def test_plan_takes_the_fast_path_only_for_shortest_side_resize_and_crop():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    vit, _ = load_preprocess(ModelConfig(clip_model="ViT-B-32", clip_pretrained="none"))
    assert pixel_plan(vit).fast_size == 224
    assert pixel_plan(vit, fast=False).fast_size is None
    tiny, _ = load_preprocess(ModelConfig(clip_model="synthetic-tiny"))
    assert pixel_plan(tiny).fast_size == 64
    for mode in ("squash", "longest"):
        t = image_transform_v2(PreprocessCfg(size=224, resize_mode=mode), is_train=False)
        assert pixel_plan(t).fast_size is None, mode


def test_vit_b_32_embeddings_within_tolerance(stored):
    loaded = load_clip(ModelConfig(clip_model="ViT-B-32", clip_pretrained="none", device="cpu"))
    plan = pixel_plan(loaded.preprocess)
    assert plan.fast_size == 224
    names = list(stored)
    ref = torch.stack([_open_clip_input(loaded, stored[n]) for n in names])
    fast = _normalised(plan, [prepare_image(stored[n], plan) for n in names])
    level_diff = ((fast - ref) * torch.tensor(plan.std).view(1, 3, 1, 1) * 255).abs()
    assert level_diff.mean() < 3.0               # noise images differ most; photos < 1 level
    assert level_diff.mean() > 0               # really the OpenCV path, not Pillow's
    with torch.inference_mode():
        a = torch.nn.functional.normalize(loaded.model.encode_image(ref), dim=-1)
        b = torch.nn.functional.normalize(loaded.model.encode_image(fast), dim=-1)
    cos = dict(zip(names, (a * b).sum(-1).tolist()))
    noise = cos.pop("noise_300x900")   # white noise: the worst case of a resize without antialiasing
    assert min(cos.values()) >= 0.9999, cos
    assert 0.995 <= noise < 0.9999     # noise differs more, and the check can tell



def test_other_scales_and_formats_are_open_clips_pixels_exactly(stored):
    loaded = load_clip(ModelConfig(clip_model="synthetic-tiny", device="cpu"))   # 256 -> 64: Pillow's resize
    plan = pixel_plan(loaded.preprocess)
    for name, data in stored.items():
        ref = (_open_clip_input(loaded, data) * torch.tensor(plan.std).view(3, 1, 1)
               + torch.tensor(plan.mean).view(3, 1, 1)) * 255
        np.testing.assert_allclose(fast_pixels(data, 64).astype(np.float32), ref.numpy(), atol=1e-3, err_msg=name)
    # a PNG takes the model's own PIL transform
    vit, _ = load_preprocess(ModelConfig(clip_model="ViT-B-32", clip_pretrained="none"))
    vplan = pixel_plan(vit)
    png = _encode(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8), "PNG")
    with pytest.raises(ValueError, match="not a JPEG"):
        fast_pixels(png, 224)
    slow = pixel_plan(vit, fast=False)
    np.testing.assert_array_equal(prepare_image(png, vplan), prepare_image(png, slow))
    # a grayscale JPEG becomes three equal channels
    gray = prepare_image(stored["gray_512x512"], vplan)
    assert gray.shape == (3, 224, 224) and gray.dtype == np.uint8
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
