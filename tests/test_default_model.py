"""The default model is the field's standard (ViT-B-32 laion2b_s34b_b79k), never the toy; no silent random
weights; a bad checkpoint is one line; synthetic-tiny on real photos drops nothing as nsfw_concept."""
from __future__ import annotations

import io
import json
import os
import shutil
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate.cli import main as cli_main
from clip_curate.models import clip as cm

#: scikit-image's sample photos (shipped in the package; no download), with plain captions
PHOTOS = {"astronaut": "an astronaut in a spacesuit", "brick": "a brick wall", "camera": "a man with a camera",
          "chelsea": "a tabby cat", "coffee": "a cup of coffee", "coins": "old coins on a table",
          "grass": "grass", "gravel": "gravel", "moon": "the surface of the moon", "rocket": "a rocket on a launch pad",
          "hubble_deep_field": "galaxies in deep space", "clock": "a wall clock", "page": "a page of text",
          "immunohistochemistry": "a stained tissue sample under a microscope", "colorwheel": "a colour wheel",
          "text": "printed text on a page", "cat": "a cat looking up", "retina": "a photo of a retina"}


def _photo_jpeg(name: str) -> bytes:
    import skimage.data
    from PIL import Image

    arr = getattr(skimage.data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    img = Image.fromarray(arr).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_pool(tmp_path_factory):
    """A Hugging Face style Parquet pool (image struct + text) of real photos: rows never touch the network."""
    root = tmp_path_factory.mktemp("photos")
    (root / "data").mkdir()
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"image": {"bytes": _photo_jpeg(n), "path": f"{n}.jpg"}, "text": c} for n, c in PHOTOS.items()]
    pq.write_table(pa.Table.from_pylist(rows, pa.schema([("image", image_t), ("text", pa.string())])),
                   root / "data" / "train-00000-of-00001.parquet")
    return str(root)


@pytest.fixture()
def url_list(tmp_path):
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a photo"]}), path)
    return str(path)


@pytest.fixture()
def empty_hub_cache(tmp_path, monkeypatch):
    """No cached hub or URL weights, whatever this machine has downloaded before."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_default_model_offline_is_one_line_naming_the_ways_on(url_list, tmp_path, monkeypatch, capsys,
                                                               empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli_main(["run", "--input", url_list, "--output", str(tmp_path / "out")])
    line = _one_line_error(capsys)
    assert code == 2
    assert "--clip-model ViT-B-32 --clip-pretrained laion2b_s34b_b79k" in line and "HF_HUB_OFFLINE is set" in line
    for way in ("--clip-model local-dir:DIR", "--clip-model none", "--clip-model synthetic-tiny"):
        assert way in line


def test_hub_probe_is_bounded(monkeypatch):
    """A resolver or connect that never answers costs the launcher the probe's timeout, not a hang."""
    release = threading.Event()

    def never_answers(*args, **kwargs):
        release.wait(30)
        raise OSError("gave up")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(cm.socket, "create_connection", never_answers)
    try:
        reason = cm._hub_offline_reason(timeout_s=0.2)
    finally:
        release.set()
    assert reason == "no answer from https://hub.invalid:443 within 0.2 s"


def test_architecture_without_a_tag_is_refused_with_its_tags(url_list, tmp_path, capsys):
    import open_clip

    code = cli_main(["run", "--input", url_list, "--output", str(tmp_path / "out"), "--clip-model", "ViT-B-32"])
    line = _one_line_error(capsys)
    assert code == 2 and "--clip-model ViT-B-32: no --clip-pretrained tag" in line
    for tag in open_clip.list_pretrained_tags_by_model("ViT-B-32"):
        assert tag in line
    assert "none for random weights on purpose" in line


def test_clip_pretrained_none_only_for_architectures(url_list, tmp_path, capsys):
    code = cli_main(["run", "--input", url_list, "--output", str(tmp_path / "out"), "--clip-model", "synthetic-tiny",
                     "--clip-pretrained", "none"])
    assert code == 2 and "random weights exist only for an open_clip architecture" in _one_line_error(capsys)


def test_malicious_checkpoint_is_one_line_and_never_unpickled(url_list, tmp_path, capsys):
    import torch

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(cm.synthetic_tiny_dir() / cm.CONFIG_FILE, model / cm.CONFIG_FILE)
    torch.save({"visual.conv1.weight": Evil()}, model / "open_clip_pytorch_model.bin")
    code = cli_main(["run", "--input", url_list, "--output", str(tmp_path / "out"), "--clip-model",
                     f"local-dir:{model}"])
    line = _one_line_error(capsys)
    assert code == 2 and "refusing to unpickle" in line and "holds objects other than weights" in line
    assert not marker.exists()
    assert not (tmp_path / "out" / "curated").exists()  # refused in the launcher, before any work


def test_mismatched_checkpoint_is_one_line(url_list, tmp_path, capsys):
    """Weights that do not fit the directory's config: refused in the launcher, not on a worker."""
    model = tmp_path / "model"
    model.mkdir()
    cfg = json.loads((cm.synthetic_tiny_dir() / cm.CONFIG_FILE).read_text())
    cfg["model_cfg"]["embed_dim"] = 64
    (model / cm.CONFIG_FILE).write_text(json.dumps(cfg))
    shutil.copy(cm.synthetic_tiny_dir() / "open_clip_model.safetensors", model / "open_clip_model.safetensors")
    code = cli_main(["run", "--input", url_list, "--output", str(tmp_path / "out"), "--clip-model", str(model)])
    line = _one_line_error(capsys)
    assert code == 2 and "does not match the model config" in line


@pytest.mark.slow
def test_synthetic_tiny_on_real_photos_drops_nothing_as_nsfw_concept(photo_pool, tmp_path, caplog):
    from clip_curate.run import run

    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        stats = run(["--input", photo_pool, "--image-col", "image", "--caption-col", "text", "--output", str(out),
                     "--clip-model", "synthetic-tiny", "--stages", "image,embed,clip,dedup,safety", "--audit"])
    assert "knows only the synthetic world's coloured shapes" in caplog.text
    assert stats["input_rows"] == len(PHOTOS) == stats["curated_rows"] + stats["rejected_rows"]
    assert stats.get("rejected_by", {}).get("safety", {}).get("nsfw_concept", 0) == 0
    assert "nsfw concept check: off (synthetic-tiny is not calibrated for it); image classifier: on" in stats["judgments"]
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["judgments"] == stats["judgments"]
    curated = pq.read_table(out / "curated", columns=["nsfw_score", "nsfw_clip_score"]).to_pylist()
    assert curated and all(r["nsfw_clip_score"] is None and r["nsfw_score"] is not None for r in curated)
    audit = json.loads((out / "audit" / "audit.json").read_text())
    assert audit["config"]["clip_mode"] == "off"  # no "older adult" for bricks, coins and the moon
    for attr in audit["attributes"].values():
        for group in attr["groups"].values():
            assert group["matched_by"]["clip"] == 0 and group["matched_by"]["both"] == 0


@pytest.mark.slow
def test_random_weights_on_purpose_run_and_say_so(photo_pool, tmp_path):
    from clip_curate.run import run

    out = tmp_path / "out"
    stats = run(["--input", photo_pool, "--image-col", "image", "--caption-col", "text", "--output", str(out),
                 "--clip-model", "ViT-B-32", "--clip-pretrained", "none", "--stages", "image,embed",
                 "--batch-size", "8"])
    assert stats["curated_rows"] == len(PHOTOS)
    assert stats["embedding"]["embed_model"] == "ViT-B-32@random-init/fp32"
    assert ("model: ViT-B-32 with random weights (--clip-pretrained none, on purpose): its scores mean nothing"
            in stats["judgments"])
    rows = pq.read_table(out / "curated", columns=["image_embedding"]).to_pylist()
    assert all(len(r["image_embedding"]) == 512 for r in rows)
