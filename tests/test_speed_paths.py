"""The fast paths keep behaviour: image hashes (pHash, ORB keypoints) are computed only when an enabled stage
reads them, and dedup still finds duplicates in rows written without them (re-filtered outputs, earlier
shards); the batched Parquet writer writes every row once.
"""
from __future__ import annotations

import io
import json
import os
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_curate.stages.dedup import Dedup, DedupConfig, prior_records
from clip_curate.stages.image import IMAGE_HASHES, DecodeResize, ImageConfig, hashes_needed, process_image


def _photos(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEG crops (300-500 px) of scikit-image's real photos."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(f()).convert("RGB") for f in (data.astronaut, data.coffee, data.chelsea, data.rocket)]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = int(rng.integers(300, 500)), int(rng.integers(300, 500))
        scale = max(w / src.width, h / src.height) * (1 + 0.5 * (i // len(sources)))
        big = src.resize((max(w, round(src.width * scale)), max(h, round(src.height * scale))), Image.BICUBIC)
        x, y = int(rng.integers(0, big.width - w + 1)), int(rng.integers(0, big.height - h + 1))
        buf = io.BytesIO()
        big.crop((x, y, x + w, y + h)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _reencoded(jpeg: bytes, quality: int = 70) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    return _photos(8)


def _configs(**dedup):
    return types.SimpleNamespace(dedup=DedupConfig(**dedup), image=ImageConfig(), caption=object())


def test_hashes_needed_follow_the_enabled_stages():
    every = ("caption", "image", "dedup")
    assert hashes_needed(_configs(), ("caption", "image")) == frozenset()           # no dedup stage
    assert hashes_needed(_configs(), every) == IMAGE_HASHES                           # default: exact + near
    assert hashes_needed(_configs(dedup=("exact",)), every) == frozenset()           # sha256 is always there
    assert hashes_needed(_configs(dedup=("none",)), every) == frozenset()
    assert hashes_needed(_configs(dedup=("none",), decontaminate="x"), every) == {"phash"}
    assert hashes_needed(_configs(dedup=("semantic",)), every) == frozenset()


def test_process_image_computes_only_the_hashes_asked_for(photos):
    full = process_image(photos[0], ImageConfig()).fields
    bare = process_image(photos[0], ImageConfig(), hashes=frozenset()).fields
    assert full["phash"] and full["orb_keypoints"]
    assert bare["phash"] is None and bare["orb_keypoints"] is None
    assert bare["sha256"] == full["sha256"] and bare["image"] == full["image"]
    only = process_image(photos[0], ImageConfig(), hashes=frozenset({"phash"})).fields
    assert only["phash"] == full["phash"] and only["orb_keypoints"] is None


def test_image_stage_without_dedup_computes_no_hashes(run_transform, photos):
    rows = [{"uid": f"u{i}", "url": None, "caption": "c", "image_bytes": b} for i, b in enumerate(photos[:3])]
    none = run_transform(rows, DecodeResize(ImageConfig(), hashes=frozenset()))
    assert len(none.kept) == 3 and all(r["phash"] is None and r["orb_keypoints"] is None and r["sha256"]
                                       for r in none.kept)
    both = run_transform(rows, DecodeResize(ImageConfig()))
    assert all(r["phash"] and r["orb_keypoints"] for r in both.kept)


def _stored_rows(photos, hashes):
    """Rows as the image stage leaves them: 4 distinct photos, an exact byte copy of photo 0, re-encodes of
    photos 1 and 2 (near duplicates)."""
    blobs = photos[:4] + [photos[0], _reencoded(photos[1]), _reencoded(photos[2], 60)]
    rows = []
    for i, blob in enumerate(blobs):
        f = process_image(blob, ImageConfig(), hashes=hashes).fields
        rows.append({"uid": f"u{i}", "url": f"http://127.0.0.1/{i}.jpg", "caption": f"caption {i}", **f})
    return rows


def test_dedup_finds_duplicates_in_rows_written_without_hashes(run_transform, photos):
    with_hashes = run_transform(_stored_rows(photos, IMAGE_HASHES), Dedup(DedupConfig()))
    without = run_transform(_stored_rows(photos, frozenset()), Dedup(DedupConfig()))
    dropped = {r["uid"]: r["reason"] for r in with_hashes.rejected}
    assert dropped == {r["uid"]: r["reason"] for r in without.rejected}
    assert sorted(dropped.values()) == ["duplicate_exact", "duplicate_near", "duplicate_near"]
    assert {frozenset(p) for p in ({"u0", "u4"}, {"u1", "u5"}, {"u2", "u6"})} == {
        frozenset(p) for p in ({"u0", "u4"}, {"u1", "u5"}, {"u2", "u6"}) if len(p & set(dropped)) == 1}
    assert without.counters.get("dedup_hashes_computed") == 7
    assert not with_hashes.counters.get("dedup_hashes_computed")
    assert len(without.kept) + len(without.rejected) == 7


def test_prior_shards_without_hashes_get_them(tmp_path, photos):
    rows = _stored_rows(photos, frozenset())[:2]
    table = pa.table({"uid": [r["uid"] for r in rows], "url": [r["url"] for r in rows],
                      "caption": [r["caption"] for r in rows], "sha256": [r["sha256"] for r in rows],
                      "phash": pa.array([None, None], pa.string()),
                      "image": [{"bytes": r["image"], "path": None} for r in rows]})
    path = str(tmp_path / "part-0.parquet")
    pq.write_table(table, path)
    expected = _stored_rows(photos, IMAGE_HASHES)[:2]
    got = list(prior_records(("curated", path), ("dedup",), hashes=IMAGE_HASHES))
    for g, e in zip(got, expected):  # the stored JPEG's pHash: within a few bits of the array's (JPEG loss)
        assert bin(g["phash"] ^ int(e["phash"], 16)).count("1") <= 4
    from clip_curate.stages.image import unpack_orb_keypoints

    for g, e in zip(got, expected):  # keypoints of the stored JPEG: the same frame, nearly the same points
        (frame, xy, _), (frame_e, xy_e, _) = unpack_orb_keypoints(g["orb"]), unpack_orb_keypoints(e["orb_keypoints"])
        assert frame == frame_e and abs(len(xy) - len(xy_e)) <= len(xy_e) // 4
    assert [g["phash"] for g in prior_records(("curated", path), ("dedup",))] == [None, None]  # not asked


@pytest.mark.slow
def test_run_without_dedup_then_refilter_with_dedup(tmp_path, photos):
    """A pool curated without dedup writes null pHash/keypoints; re-filtering that output with dedup finds the
    same duplicates a run with dedup finds."""
    from clip_curate.run import run

    blobs = photos[:6] + [photos[0], _reencoded(photos[1]), _reencoded(photos[3], 60)]
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"url": [f"http://img.test/{i}.jpg" for i in range(len(blobs))],
                             "caption": [f"photo number {i}" for i in range(len(blobs))], "jpg": blobs}), pool)
    common = ["--progress-seconds", "0", "--no-store-embeddings"]
    run(["--input", str(pool), "--output", str(tmp_path / "plain"), "--stages", "image"] + common)
    plain = pq.read_table(tmp_path / "plain" / "curated").to_pylist()
    assert len(plain) == len(blobs) and all(r["phash"] is None and r["orb_keypoints"] is None for r in plain)
    assert all(r["sha256"] for r in plain)
    run(["--input", str(tmp_path / "plain"), "--output", str(tmp_path / "refiltered"), "--stages", "dedup"] + common)
    run(["--input", str(pool), "--output", str(tmp_path / "direct"), "--stages", "image,dedup"] + common)

    def dropped(out):
        rej = pq.read_table(out / "rejected").to_pylist()
        stats = json.loads((out / "stats.json").read_text())
        assert stats["input_rows"] == stats["curated_rows"] + stats["rejected_rows"]
        return {r["url"]: r["reason"] for r in rej}

    direct = dropped(tmp_path / "direct")
    assert {f"http://img.test/{i}.jpg" for i in (6, 7, 8)} <= set(direct)  # (photo 4 is a crop of photo 0)
    assert dropped(tmp_path / "refiltered") == direct
    assert all(r["phash"] for r in pq.read_table(tmp_path / "direct" / "curated").to_pylist())
    assert os.path.isdir(tmp_path / "refiltered" / "curated")


def test_parquet_writer_per_bundle_shards_hold_every_row_once(tmp_path):
    """Rows are written where they are made (no shuffle): every row once, no shard over max_rows, row groups
    of the declared schema; no rows still writes one empty shard."""
    import apache_beam as beam

    from clip_curate.writers import WriteParquetTable

    schema = pa.schema([("uid", pa.string()), ("n", pa.int64()), ("image", pa.binary())])
    rows = [{"uid": f"u{i}", "n": i, "image": bytes([i % 256]) * 100, "extra": "dropped"} for i in range(1000)]
    with beam.Pipeline() as p:
        (p | "Rows" >> beam.Create(rows) | beam.Reshuffle()
         | "Write" >> WriteParquetTable(str(tmp_path / "out"), schema, 0, "part", "rows", "zstd", max_rows=300))
        (p | "NoRows" >> beam.Create([]) | "WriteNone" >> WriteParquetTable(str(tmp_path / "empty"), schema,
                                                                            max_rows=300))
    files = sorted((tmp_path / "out").glob("part-*.parquet"))
    tables = [pq.read_table(f) for f in files]
    assert all(t.num_rows <= 300 for t in tables) and len(files) >= 4
    assert all(t.schema.equals(schema) for t in tables)
    got = sorted(r["n"] for t in tables for r in t.to_pylist())
    assert got == list(range(1000))
    empty = sorted((tmp_path / "empty").glob("part-*.parquet"))
    assert len(empty) == 1 and pq.read_table(empty[0]).num_rows == 0
