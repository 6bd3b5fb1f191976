"""WebDataset export: round trip through the webdataset library and open_clip's training loader."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_curate import export, schemas as schema
from clip_curate.synthetic import world as W
from clip_curate.cli import main as cli_main
from clip_curate.fields import ConfigError


@pytest.fixture(scope="session")
def make_rows(jpeg):
    """``make_rows(n, start=0)``: curated rows whose images are 32 px synthetic scenes."""
    def make(n: int, start: int = 0) -> list[dict]:
        out = []
        for i in range(start, start + n):
            scene = W.render_scene(W.sample_attributes(np.random.default_rng(i)), i, image_px=32, supersample=1)
            out.append({"uid": f"{i:032x}", "url": f"http://127.0.0.1/img/{i}.jpg", "caption": f"caption {i} é ✓",
                        "image": jpeg(scene), "width": 32, "height": 32, "original_width": 32,
                        "original_height": 32, "sha256": "ab" * 32, "phash": "0" * 16, "language": "en",
                        "clip_score": 0.5 + i / 1000, "image_embedding": [0.1] * 8, "text_embedding": [0.2] * 8,
                        "embed_model": "synthetic-tiny", "nsfw_score": 0.01, "nsfw_clip_score": None,
                        "unsafe_caption": False, "safety_flags": None, "truth_kind": "matched"})
        return out
    return make


def _write_curated(root: str, parts: list[list[dict]]) -> str:
    cur = os.path.join(root, "curated")
    os.makedirs(cur, exist_ok=True)
    sch = schema.curated_schema([pa.field("truth_kind", pa.string())])
    for i, rows in enumerate(parts):
        pq.write_table(pa.Table.from_pylist([schema.project(r, sch) for r in rows], schema=sch),
                       os.path.join(cur, f"part-{i:05d}-of-{len(parts):05d}.parquet"),
                       row_group_size=7)
    return cur


def _tar_members(path: str) -> list[str]:
    with tarfile.open(path) as t:
        return t.getnames()


def test_round_trip_every_row_once_identical_bytes(tmp_path, make_rows):
    rows = make_rows(23) + make_rows(10, start=100)
    cur = _write_curated(str(tmp_path), [rows[:23], rows[23:]])
    out = str(tmp_path / "wds")
    assert cli_main(["export", "--input", str(tmp_path), "--format", "webdataset", "--output", out,
                     "--shard-size", "10"]) == 0
    assert sorted(os.listdir(out)) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar", "manifest.json",
                                       "sizes.json"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["total_rows"] == 33 and [s["rows"] for s in manifest["shards"]] == [10, 10, 10, 3]
    assert manifest["pattern"] == f"{out}/{{00000..00003}}.tar"
    assert json.load(open(os.path.join(out, "sizes.json"))) == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 10,
                                                                 "00003.tar": 3}
    # plain tar view: three members per row, grouped by key
    names = _tar_members(os.path.join(out, "00000.tar"))
    assert names[:3] == [f"{0:032x}.jpg", f"{0:032x}.txt", f"{0:032x}.json"]

    import webdataset as wds

    seen = {}
    for sample in wds.WebDataset(f"{out}/{{00000..00003}}.tar", shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in seen
        seen[sample["__key__"]] = sample
    by_uid = {r["uid"]: r for r in rows}
    assert set(seen) == set(by_uid)
    for uid, s in seen.items():
        r = by_uid[uid]
        assert s["jpg"] == r["image"]
        assert s["txt"].decode("utf-8") == r["caption"]
        meta = json.loads(s["json"])
        assert meta["uid"] == uid and meta["truth_kind"] == "matched"
        assert meta["clip_score"] == pytest.approx(r["clip_score"], abs=1e-6)
        assert not {"image", "image_embedding", "text_embedding"} & set(meta)
    assert cur  # written


def test_open_clip_training_loader_convention(tmp_path, make_rows):
    """open_clip's dataset-size lookup (sizes.json stands in for --train-num-samples) and its WebDataset
    stage chain (decode pilrgb, rename image=jpg;png;jpeg;webp text=txt, preprocess, tokenize, batch).
    open_clip_train's own tar grouping needs webdataset<=0.2.86 (its training extra pins it), so the
    installed library's tarfile_to_samples stands in for that one step."""
    import webdataset as wds
    from open_clip_train.data import expand_urls, filter_no_caption_or_no_image, get_dataset_size
    from clip_curate.synthetic.train import make_preprocess, make_tokenizer

    _write_curated(str(tmp_path), [make_rows(12)])
    out = str(tmp_path / "wds")
    res = export.export_webdataset(str(tmp_path / "curated"), out, shard_size=5)
    assert get_dataset_size(res.pattern) == (12, 3)
    assert expand_urls(res.pattern)[0] == res.shards
    tok = make_tokenizer()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(res.pattern), wds.tarfile_to_samples(), wds.select(filter_no_caption_or_no_image),
        wds.decode("pilrgb"), wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=make_preprocess(), text=lambda t: tok(t)[0]), wds.to_tuple("image", "text"),
        wds.batched(4, partial=True))
    batches = list(pipeline)
    assert [len(b[0]) for b in batches] == [4, 4, 4]
    assert tuple(batches[0][0].shape) == (4, 3, 64, 64) and tuple(batches[0][1].shape) == (4, 32)


def test_fsspec_paths_and_skips(tmp_path, make_rows):
    import fsspec

    rows = make_rows(5)
    rows[1]["image"] = None  # a row without bytes cannot be a training sample
    rows[3]["uid"] = "a.b/c"  # '.' and '/' would split the WebDataset key
    fs = fsspec.filesystem("memory")
    sch = schema.curated_schema([pa.field("truth_kind", pa.string())])
    with fs.open("/exp-in/curated/part-00000.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist([schema.project(r, sch) for r in rows], schema=sch), f)
    res = export.export_webdataset("memory:///exp-in", "memory:///exp-out", shard_size=100)
    assert res.total == 4 and res.skipped == {"no_image": 1} and res.pattern == "memory:///exp-out/00000.tar"
    with fs.open("/exp-out/00000.tar", "rb") as f:
        names = tarfile.open(fileobj=io.BytesIO(f.read())).getnames()
    assert "a_b_c.jpg" in names and len(names) == 12
    manifest = json.loads(fs.cat("/exp-out/manifest.json"))
    assert manifest["skipped"] == {"no_image": 1}
    with pytest.raises(ConfigError, match="--overwrite"):
        export.export_webdataset("memory:///exp-in", "memory:///exp-out")
    assert export.export_webdataset("memory:///exp-in", "memory:///exp-out", overwrite=True).total == 4


def test_user_mistakes(tmp_path, capsys, make_rows):
    assert cli_main(["export", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "--input" in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"url": ["x"]}), bad)
    assert cli_main(["export", "--input", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "no 'uid' column" in capsys.readouterr().err
    _write_curated(str(tmp_path), [make_rows(2)])
    assert cli_main(["export", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--format", "tfrecord"]) == 2
    assert cli_main(["export", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--shard-size", "0"]) == 2
    assert not os.path.exists(tmp_path / "o" / "00000.tar")


def test_streaming_memory_is_one_batch(tmp_path, make_rows):
    """The writer never holds the corpus: rows come from a generator over record batches."""
    _write_curated(str(tmp_path), [make_rows(40)])
    it = export.iter_rows(str(tmp_path / "curated"), batch_rows=8)
    assert next(it)["uid"] == f"{0:032x}" and "image_embedding" not in next(it)
    img = Image.open(io.BytesIO(make_rows(1)[0]["image"]))
    assert img.format == "JPEG"
