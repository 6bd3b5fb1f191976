"""Pools as input: a real img2dataset run (WebDataset and Parquet outputs) against a local server,
curated with the server stopped; Hugging Face image Parquet; re-filtering our own output from stored
embeddings; damaged shards.

Every run checks the invariant input rows == curated + rejected, and that every row img2dataset
wrote (failures included) comes out exactly once.
"""
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate.cli import main as cli_main
from clip_curate.fields import ConfigError
from clip_curate.readers.pools import detect_pool_format
from clip_curate.readers import ReaderConfig, plan_input
from clip_curate.readers.base import ReadRejection, read_split
from clip_curate.synthetic.world import generate_world
from clip_curate.run import run

T0, T = 0.5, 0.6          # loose first pass, then the threshold compared (synthetic-tiny recommends 0.77)
COMMON = ["--clip-model", "synthetic-tiny", "--image-size", "64", "--progress-seconds", "0", "--shard-rows", "40",
          "--no-nsfw-concept"]  # like the demo: the default concept prompts are not tuned for the synthetic world

I2D = """
import img2dataset
img2dataset.download(url_list={urls!r}, input_format="parquet", url_col="url", caption_col="caption",
                     save_additional_columns=["uid"], output_format={fmt!r}, output_folder={out!r},
                     processes_count=1, thread_count=4, image_size=96, resize_mode="no",
                     number_sample_per_shard=32, timeout=5, retries=0, enable_wandb=False)
"""


def _img2dataset(urls, fmt, out):
    """img2dataset's own Python API, in a child process (it installs signal handlers and a pool)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = "127.0.0.1"
    res = subprocess.run([sys.executable, "-c", I2D.format(urls=str(urls), fmt=fmt, out=str(out))],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]


def _table(directory):
    files = sorted(p for p in os.listdir(directory) if p.endswith(".parquet"))
    tables = [pq.read_table(os.path.join(directory, f)) for f in files]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _rows(out, which):
    t = _table(os.path.join(out, which))
    return t.to_pylist() if t is not None else []


def _accounted(out):
    stats = json.loads(open(os.path.join(out, "stats.json")).read())
    cur, rej = _rows(out, "curated"), _rows(out, "rejected")
    assert stats["input_rows"] == stats["curated_rows"] + stats["rejected_rows"] == len(cur) + len(rej)
    uids = [r["uid"] for r in cur + rej]
    assert len(uids) == len(set(uids)), "a row came out twice"
    return stats, cur, rej


@pytest.fixture(scope="module")
def pool(tmp_path_factory, served_world):
    """A synthetic world downloaded by img2dataset into both of its pool formats; server then stopped."""
    tmp = tmp_path_factory.mktemp("pools")
    with served_world(tmp, 96, 23, columns=["url", "caption", "uid"], broken_404=0.06, broken_not_image=0.03,
                      image_px=96) as web:
        assert web.server.base_url.startswith("http://127.0.0.1:")
        world = web.world
        for fmt in ("webdataset", "parquet"):
            _img2dataset(web.urls, fmt, tmp / fmt)
    meta = pa.concat_tables([pq.read_table(tmp / "webdataset" / f) for f in sorted(os.listdir(tmp / "webdataset"))
                             if f.endswith(".parquet")])
    return {"tmp": tmp, "world": world, "meta": meta.to_pylist()}


@pytest.fixture(scope="module")
def first_pass(pool):
    """The WebDataset pool curated with every stage at the loose threshold T0."""
    out = pool["tmp"] / "out_t0"
    stats = run(["--input", str(pool["tmp"] / "webdataset"), "--output", str(out), "--min-clip-score", str(T0)]
                + COMMON)
    return out, stats


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_img2dataset_pool_every_row_accounted(pool, first_pass, fmt, caplog):
    """Both img2dataset layouts: every row it wrote comes out once, its failures as read/source_failed
    with img2dataset's error message; metadata is carried; nothing is downloaded."""
    src = pool["tmp"] / fmt
    assert detect_pool_format(str(src)) == ("webdataset" if fmt == "webdataset" else "img2dataset-parquet")
    if fmt == "webdataset":
        out, stats = first_pass
    else:
        out = pool["tmp"] / "out_parquet"
        with caplog.at_level(logging.INFO):
            stats = run(["--input", str(src), "--output", str(out), "--min-clip-score", str(T0),
                         "--stages", "caption,embed,clip,dedup"] + COMMON)
        assert "input: detected img2dataset-parquet" in caplog.text
        assert "image stage added" in caplog.text
    stats, cur, rej = _accounted(out)
    written = {r["uid"]: r for r in pool["meta"]}
    assert len(written) == len(pool["world"]) == stats["input_rows"]
    assert {r["uid"] for r in cur + rej} == set(written)
    failed = {u: r for u, r in written.items() if r["status"] != "success"}
    broken = {it.uid for it in pool["world"].items if it.kind.startswith("broken")}
    assert broken and broken <= set(failed)
    source_failed = {r["uid"]: r for r in rej if (r["stage"], r["reason"]) == ("read", "source_failed")}
    assert set(source_failed) == set(failed)
    for uid, r in source_failed.items():
        assert r["detail"] == failed[uid]["error_message"] and r["status"] == failed[uid]["status"]
        assert r["url"] == failed[uid]["url"] and r["key"] == failed[uid]["key"]
    assert stats["rejected_by"]["read"] == {"source_failed": len(failed)}
    assert any("404" in r["detail"] for r in source_failed.values())
    # img2dataset's metadata rides along; its sizes/sha256 are renamed beside ours
    assert cur and all(r["status"] == "success" and r["key"] == written[r["uid"]]["key"] for r in cur)
    assert all(r["input_sha256"] == written[r["uid"]]["sha256"] and r["input_width"] == written[r["uid"]]["width"]
               for r in cur)
    assert all(r["image"] and r["width"] == 64 and r["clip_score"] >= T0 for r in cur)
    assert stats["input_format"] == ("webdataset" if fmt == "webdataset" else "img2dataset-parquet")
    assert not any(k.startswith("download") for k in stats["counters"]), "the downloader ran"
    assert 0 < stats["embedded_rows"] <= len(written) - len(failed)


@pytest.mark.slow
def test_hf_parquet_image_struct(tmp_path, caplog):
    """Hugging Face layout: data/*.parquet with image struct<bytes, path> and a text column, a dataset
    card beside; a row whose struct has no bytes is rejected read/missing_image."""
    world = generate_world(40, seed=5, image_px=96)
    items = [it for it in world.items if it.image_bytes]
    (tmp_path / "hf" / "data").mkdir(parents=True)
    (tmp_path / "hf" / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n")
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"image": {"bytes": it.image_bytes, "path": f"{it.uid}.jpg"}, "text": it.caption, "label": i % 3}
            for i, it in enumerate(items)]
    rows.append({"image": {"bytes": None, "path": "elsewhere/lost.jpg"}, "text": "a lost picture", "label": 0})
    sch = pa.schema([("image", image_t), ("text", pa.string()), ("label", pa.int64())])
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, sch), tmp_path / "hf" / "data" / f"train-0000{i}-of-00002.parquet",
                       row_group_size=8)
    src = str(tmp_path / "hf")
    assert detect_pool_format(src, ReaderConfig(input=src, caption_col="text")) == "hf-parquet"
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        stats = run(["--input", src, "--image-col", "image", "--caption-col", "text", "--output", str(out),
                     "--stages", "image,embed,clip", "--min-clip-score", str(T0)] + COMMON)
    assert "input: detected hf-parquet" in caplog.text
    stats, cur, rej = _accounted(out)
    assert stats["input_rows"] == len(rows)
    (lost,) = [r for r in rej if r["stage"] == "read"]
    assert lost["reason"] == "missing_image" and "elsewhere/lost.jpg" in lost["detail"]
    assert lost["caption"] == "a lost picture"
    assert {r["caption"] for r in cur + rej} == {r["text"] for r in rows}
    assert all(r["url"] is None and r["label"] in (0, 1, 2) for r in cur)
    assert stats["embedded_rows"] == len(items)


@pytest.mark.slow
def test_refilter_reuses_embeddings_and_matches_direct_run(pool, first_pass, caplog):
    """Re-filtering the T0 output at T keeps exactly the rows a direct run at T keeps, with no forward pass."""
    out_t0, _ = first_pass
    direct = pool["tmp"] / "out_direct"
    run(["--input", str(pool["tmp"] / "webdataset"), "--output", str(direct), "--min-clip-score", str(T)] + COMMON)
    refilter = pool["tmp"] / "out_refilter"
    assert detect_pool_format(str(out_t0)) == "curated"
    with caplog.at_level(logging.INFO):
        stats = run(["--input", str(out_t0), "--output", str(refilter), "--min-clip-score", str(T)] + COMMON)
    assert "input: detected curated" in caplog.text and "are reused" in caplog.text
    _, direct_cur, _ = _accounted(direct)
    stats, cur, rej = _accounted(refilter)
    assert stats["embedded_rows"] == 0 and stats["counters"].get("embed_reused") == stats["input_rows"]
    assert stats["input_rows"] == len(_rows(out_t0, "curated"))
    assert {r["uid"] for r in cur} == {r["uid"] for r in direct_cur}
    assert 0 < len(cur) < stats["input_rows"]
    assert {(r["stage"], r["reason"]) for r in rej} == {("clip", "low_clip_score")}
    by_uid = {r["uid"]: r for r in direct_cur}
    for r in cur:  # same stored fields as the direct run
        d = by_uid[r["uid"]]
        assert r["image"] == d["image"] and r["phash"] == d["phash"] and r["key"] == d["key"]
        assert r["clip_score"] == pytest.approx(d["clip_score"], abs=1e-6)
    assert stats["embedding"]["embed_model"] == cur[0]["embed_model"]


@pytest.mark.slow
def test_refilter_without_clip_model_uses_the_inputs_model(pool, first_pass, caplog):
    """No --clip-model: the re-filter takes the model recorded in the input's stats.json (synthetic-tiny),
    not the default (offline here), and reuses every stored embedding."""
    out_t0, _ = first_pass
    out = pool["tmp"] / "out_recorded_model"
    with caplog.at_level(logging.INFO):
        stats = run(["--input", str(out_t0), "--output", str(out), "--min-clip-score", str(T)] + COMMON[2:])
    assert "using the input's model synthetic-tiny" in caplog.text and "are reused" in caplog.text
    stats, cur, _ = _accounted(out)
    assert stats["embedded_rows"] == 0 and stats["counters"].get("embed_reused") == stats["input_rows"]
    assert stats["config"]["stages"]["embed"]["clip_model"] == "synthetic-tiny" and cur


@pytest.mark.slow
def test_refilter_include_rejected_takes_back_clip_and_dedup_rows(pool, first_pass):
    out_t0, _ = first_pass
    _, cur0, rej0 = _accounted(out_t0)
    back = [r for r in rej0 if r["stage"] in ("clip", "dedup") and r["image_embedding"] is not None]
    assert any(r["stage"] == "clip" for r in back)
    out = pool["tmp"] / "out_loose"
    stats = run(["--input", str(out_t0), "--include-rejected", "--output", str(out), "--min-clip-score", "0.2"]
                + COMMON)
    stats, cur, rej = _accounted(out)
    assert stats["input_rows"] == len(cur0) + len(back) and stats["embedded_rows"] == 0
    low = {r["uid"] for r in back if r["reason"] == "low_clip_score" and r["clip_score"] >= 0.2}
    assert low and low <= {r["uid"] for r in cur}
    assert all(r["image"] is None for r in cur if r["uid"] in low)  # rejected tables keep no image
    dups = {r["uid"] for r in back if r["stage"] == "dedup"}
    assert dups <= {r["uid"] for r in rej if r["stage"] == "dedup"}  # still duplicates


@pytest.mark.slow
def test_refilter_with_another_model_recomputes_and_says_why(pool, first_pass, caplog):
    out_t0, _ = first_pass
    _, cur0, rej0 = _accounted(out_t0)
    n_back = sum(1 for r in rej0 if r["stage"] in ("clip", "dedup") and r["image_embedding"] is not None)
    out = pool["tmp"] / "out_other"
    with caplog.at_level(logging.INFO):
        stats = run(["--input", str(out_t0), "--include-rejected", "--output", str(out), "--stages", "embed,dedup",
                     "--clip-model", "test-tiny-random"] + COMMON[2:])
    assert "recomputed" in caplog.text and "test-tiny-random" in caplog.text
    stats, cur, rej = _accounted(out)
    assert stats["embedded_rows"] == len(cur0) == len(cur)
    assert all(r["embed_model"].startswith("test-tiny-random") for r in cur)
    assert len(rej) == n_back and all(r["reason"] == "embed_error" and "no image to embed" in r["detail"]
                                      and "synthetic-tiny" in r["detail"] for r in rej)


@pytest.mark.slow
def test_refilter_with_other_preprocessing_recomputes(pool, first_pass, caplog):
    """Same model id but the input recorded another preprocessing: embeddings are made again."""
    out_t0, _ = first_pass
    src = pool["tmp"] / "out_t0_other_preprocess"
    shutil.copytree(out_t0, src)
    stats = json.loads((src / "stats.json").read_text())
    stats["embedding"]["preprocess"] = "Compose( Resize(size=72) CenterCrop(size=(72, 72)) )"
    (src / "stats.json").write_text(json.dumps(stats))
    out = pool["tmp"] / "out_other_preprocess"
    with caplog.at_level(logging.INFO):
        stats = run(["--input", str(src), "--output", str(out), "--stages", "embed"] + COMMON)
    assert "preprocessed images differently" in caplog.text
    assert stats["embedded_rows"] == stats["input_rows"] == stats["curated_rows"] > 0


@pytest.mark.slow
def test_refilter_refuses_its_own_input_as_output_and_dedup_less_take_back(first_pass, tmp_path, capsys):
    out_t0, _ = first_pass
    assert cli_main(["run", "--input", str(out_t0), "--output", str(out_t0)] + COMMON[:2]) == 2  # its model
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not empty" in err   # the output rule refuses before anything is read
    assert cli_main(["run", "--input", str(out_t0), "--output", str(out_t0), "--overwrite"] + COMMON[:2]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "would remove this run's own input" in err
    assert (out_t0 / "curated").is_dir() and (out_t0 / "stats.json").exists()
    assert cli_main(["run", "--input", str(out_t0), "--include-rejected", "--stages", "clip",
                     "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the dedup stage rejected: run dedup" in err


# ---------------------------------------------------------------------------------------------
# Damaged shards

def _members(path):
    with tarfile.open(path) as tf:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tf.getmembers()]


def _smash_header(path, member_index):
    """Overwrite the member's own header block (after any pax extension headers)."""
    name, _, data, _ = _members(path)[member_index]
    with open(path, "r+b") as f:
        f.seek(data - 512)
        f.write(b"\xa5" * 512)
    return name


def _truncate_inside(path, member_index):
    name, _, data, size = _members(path)[member_index]
    with open(path, "r+b") as f:
        f.truncate(data + size // 2 + 7)  # inside the member's data, not on a block boundary
    return name


@pytest.mark.slow
def test_damaged_img2dataset_shards_name_every_lost_row(pool, tmp_path):
    """With img2dataset's metadata parquet every lost sample is named: one read/corrupt_shard row each."""
    src = tmp_path / "wds"
    shutil.copytree(pool["tmp"] / "webdataset", src)
    smashed = _smash_header(src / "00000.tar", 3)          # the 2nd sample's .jpg header
    truncated = _truncate_inside(src / "00001.tar", 30)    # the 11th sample's .jpg: samples 11.. are lost
    out = tmp_path / "out"
    run(["--input", str(src), "--output", str(out), "--stages", "none"] + COMMON)
    stats, cur, rej = _accounted(out)
    assert stats["input_rows"] == len(pool["meta"])
    corrupt = [r for r in rej if r["reason"] == "corrupt_shard"]
    key = smashed.split(".")[0]
    assert any(r["key"] == key and "00000.tar" in r["detail"] for r in corrupt)
    lost_1 = [r for r in corrupt if "00001.tar" in r["detail"]]
    shard1_ok = [r for r in pool["meta"] if r["key"].startswith("00001") and r["status"] == "success"]
    assert len(lost_1) == len(shard1_ok) - 10 and all(r["url"] and r["caption"] for r in lost_1)
    assert truncated.split(".")[0] in {r["key"] for r in lost_1}
    assert stats["rejected_by"]["read"]["source_failed"] == sum(r["status"] != "success" for r in pool["meta"])


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_damaged_plain_webdataset_is_recorded_not_skipped(tmp_path, caplog):
    """Without metadata: a sample that lost a member is rejected by key; a stretch whose samples cannot be
    named is one read/corrupt_shard row naming the shard and bytes; a file that is no tar likewise."""
    world = generate_world(30, seed=9, image_px=64)
    items = [it for it in world.items if it.image_bytes][:24]
    src = tmp_path / "shards"
    src.mkdir()
    for s in range(3):
        _write_tar(src / f"shard-{s}.tar", [(f"s{s}/{it.uid}", {"jpg": it.image_bytes, "txt": it.caption.encode(),
                                                                 "json": json.dumps({"uid": it.uid}).encode()})
                                            for it in items[s * 8:(s + 1) * 8]])
    _smash_header(src / "shard-0.tar", 3)            # 2nd sample's jpg header
    _truncate_inside(src / "shard-1.tar", 13)        # 5th sample's json: the rest of the shard is gone
    (src / "shard-3.tar").write_bytes(b"<html>not a tar</html>" * 40)
    cfg = ReaderConfig(input=str(src))
    plan = plan_input(cfg)
    assert plan.fmt == "webdataset" and len(plan.splits) == 4
    with caplog.at_level(logging.WARNING):
        rows = [r for s in plan.splits for r in read_split(s, plan)]
    assert "shard-0.tar is damaged" in caplog.text
    bad = [r for r in rows if isinstance(r, ReadRejection)]
    reasons = [(r.reason, r.detail) for r in bad]
    assert all(reason == "corrupt_shard" for reason, _ in reasons)
    by_shard = {s: [d for _, d in reasons if d.startswith(s)] for s in ("shard-0", "shard-1", "shard-2", "shard-3")}
    assert len(by_shard["shard-0"]) == 1 and items[1].uid in by_shard["shard-0"][0]
    assert [r.uid for r in bad if r.detail.startswith("shard-0")] == [items[1].uid]
    assert len(by_shard["shard-1"]) == 2 and any("count unknown" in d for d in by_shard["shard-1"])
    assert by_shard["shard-2"] == [] and len(by_shard["shard-3"]) == 1 and "not a readable tar" in by_shard["shard-3"][0]
    good = {r["uid"] for r in rows if not isinstance(r, ReadRejection)}
    # WebDataset brace notation and globs name shards too
    assert len(plan_input(ReaderConfig(input=str(src / "shard-{0..2}.tar"))).splits) == 3
    assert len(plan_input(ReaderConfig(input=str(src / "shard-[01].tar"))).splits) == 2
    assert good == {it.uid for it in items[:1] + items[2:8] + items[8:12] + items[16:24]}
    # end to end: the same pool through the pipeline, every row (and stretch) accounted
    out = tmp_path / "out"
    stats = run(["--input", str(src), "--output", str(out), "--stages", "image"] + COMMON)
    stats, cur, rej = _accounted(out)
    assert stats["rejected_by"]["read"] == {"corrupt_shard": len(bad)} and len(cur) == len(good)


def test_one_line_errors(tmp_path, capsys):
    pq.write_table(pa.table({"blob": [b"x"], "text": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(ConfigError, match=r"no image column found .*columns: blob\); pass --image-col"):
        plan_input(ReaderConfig(input=str(tmp_path), input_format="hf-parquet"))
    with pytest.raises(ConfigError, match="caption column .caption. not found .*text columns: text"):
        plan_input(ReaderConfig(input=str(tmp_path), input_format="hf-parquet", image_col="blob"))
    with pytest.raises(ConfigError, match="no .tar shards"):
        plan_input(ReaderConfig(input=str(tmp_path), input_format="webdataset"))
    with pytest.raises(ConfigError, match="not a clip-curate output"):
        plan_input(ReaderConfig(input=str(tmp_path), input_format="curated"))
    assert cli_main(["run", "--input", str(tmp_path), "--input-format", "hf-parquet", "--image-col", "jpg",
                     "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--image-col 'jpg': no such column" in err
