"""Operator experience: output safety (--overwrite/--resume), the output schema other tools read, CLI
errors for Beam options, summary hints, progress lines and the demo's layout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate import cli, schemas
from clip_curate.fields import ConfigError
from clip_curate.writers import claim_output, check_compression


def _url_list(tmp: Path, n: int = 3) -> Path:
    urls = tmp / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)],
                             "caption": [f"item {i}" for i in range(n)]}), urls)
    return urls


def _cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# Outputs

def test_claim_output_refuses_non_empty_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "out"
    assert claim_output(str(out)) == []                      # missing: fine
    out.mkdir()
    assert claim_output(str(out)) == []                      # empty: fine
    (out / "curated").mkdir()
    (out / "curated" / "part-00000-of-00001.parquet").write_bytes(b"x")
    (out / "stats.json").write_text('{"damaged_sources": ["old.csv"]}')
    (out / "_stage_stats").mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as e:
        claim_output(str(out))
    assert "not empty" in str(e.value) and "--overwrite" in str(e.value) and "--resume" in str(e.value)
    assert "\n" not in str(e.value)
    assert claim_output(str(out), resume=True) == []
    assert (out / "stats.json").exists()
    with pytest.raises(ConfigError, match="contradict"):
        claim_output(str(out), resume=True, overwrite=True)
    removed = claim_output(str(out), overwrite=True)
    assert sorted(Path(p).name for p in removed) == ["_stage_stats", "curated", "stats.json"]
    assert sorted(os.listdir(out)) == ["notes.txt"]           # what a run did not write stays


def test_run_into_non_empty_output_exits_2_and_overwrite_starts_fresh(tmp_path, capsys):
    urls, out = _url_list(tmp_path), tmp_path / "out"
    base = ["run", "--input", urls, "--output", out, "--stages", "none"]
    assert _cli(base, capsys)[0] == 0
    first = json.loads((out / "stats.json").read_text())
    assert first["input_rows"] == 3
    # an earlier run's leftovers that must not leak into the new run's stats.json
    (out / "stats.json").write_text(json.dumps({**first, "damaged_sources": ["gone.csv: truncated"]}))
    (out / "audit").mkdir()
    (out / "audit" / "audit.json").write_text("{}")
    code, _, err = _cli(base, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "is not empty" in lines[0] and "--overwrite" in lines[0]
    assert _cli(base + ["--overwrite"], capsys)[0] == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == 3 and stats["curated_rows"] + stats["rejected_rows"] == 3
    assert "damaged_sources" not in stats
    assert not (out / "audit").exists()
    assert len(list((out / "curated").glob("*.parquet"))) == 1


def test_export_and_audit_refuse_non_empty_output(tmp_path, capsys):
    urls, out = _url_list(tmp_path), tmp_path / "out"
    assert _cli(["run", "--input", urls, "--output", out, "--stages", "none"], capsys)[0] == 0
    dest = tmp_path / "shards"
    dest.mkdir()
    (dest / "other.txt").write_text("x")
    code, _, err = _cli(["export", "--input", out, "--output", dest], capsys)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    (audit_dir / "audit.json").write_text("{}")
    code, _, err = _cli(["audit", "--input", out, "--output", audit_dir], capsys)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _cli(["audit", "--input", out, "--output", blocker / "sub"], capsys)
    assert code == 2 and "is a file" in err


def test_parquet_compression_is_validated_and_used(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a Parquet codec"):
        check_compression("zip")
    urls = _url_list(tmp_path)
    code, _, err = _cli(["run", "--input", urls, "--output", tmp_path / "o", "--parquet-compression", "zip"], capsys)
    assert code == 2 and "--parquet-compression" in err
    for codec, want in (("zstd", "ZSTD"), ("snappy", "SNAPPY")):
        out = tmp_path / codec
        extra = [] if codec == "zstd" else ["--parquet-compression", codec]   # zstd is the default
        assert _cli(["run", "--input", urls, "--output", out, "--stages", "none", *extra], capsys)[0] == 0
        shard = next((out / "curated").glob("*.parquet"))
        assert pq.ParquetFile(shard).metadata.row_group(0).column(0).compression == want


# ---------------------------------------------------------------------------------------------
# Schema

def test_declared_schema_image_struct_embeddings_and_hf_features():
    cur = schemas.curated_schema(embed_dim=16)
    assert cur.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert cur.field("image_embedding").type == pa.list_(pa.float32(), 16)
    features = json.loads(cur.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert features["image_embedding"]["length"] == 16
    assert features["uid"] == {"dtype": "string", "_type": "Value"}
    assert "image_embedding" not in schemas.curated_schema(embeddings=False).names
    rej = schemas.rejected_schema(embed_dim=16)
    assert rej.field("duplicate_of").type == pa.string()
    row = schemas.project({"uid": "u", "image": b"\xff\xd8jpeg"}, cur)
    assert row["image"] == {"bytes": b"\xff\xd8jpeg", "path": None}
    assert schemas.image_bytes(row["image"]) == schemas.image_bytes(b"\xff\xd8jpeg") == b"\xff\xd8jpeg"


def _installed(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@pytest.mark.slow
def test_outputs_load_in_duckdb_and_datasets(tmp_path, served_world, local_net_flags):
    """A synthetic-tiny run with dedup: curated shards are zstd, image is the HF Image struct, embeddings are
    fixed_size_list[d]; dedup rejections name the duplicate; duckdb and datasets read both outputs."""
    from clip_curate.run import run

    with served_world(tmp_path, 40, 7, dup_exact=0.15) as web:
        out = tmp_path / "out"
        stats = run(["--input", str(web.urls), "--output", str(out), *local_net_flags(),
                     "--clip-model", "synthetic-tiny", "--min-clip-score", "-1", "--dedup", "exact",
                     "--stages", "download,image,embed,dedup"])
    assert stats["input_rows"] == stats["curated_rows"] + stats["rejected_rows"]
    cur = pq.read_table(out / "curated")
    assert cur.schema.field("image").type == schemas.curated_schema().field("image").type
    assert pa.types.is_fixed_size_list(cur.schema.field("image_embedding").type)
    assert cur.schema.field("image_embedding").type.list_size == 128  # synthetic-tiny embed_dim
    rej = pq.read_table(out / "rejected").to_pylist()
    dups = [r for r in rej if r["stage"] == "dedup"]
    assert dups and all(r["duplicate_of"] and r["detail"].endswith(r["duplicate_of"]) for r in dups)
    assert all(r["duplicate_of"] is None for r in rej if r["stage"] != "dedup")
    if _installed("duckdb"):
        import duckdb

        n, with_image = duckdb.sql(f"select count(*), count(image.bytes) from '{out}/curated/*.parquet'").fetchall()[0]
        assert n == stats["curated_rows"] == with_image
        (n_dup,) = duckdb.sql(f"select count(duplicate_of) from '{out}/rejected/*.parquet'").fetchall()[0]
        assert n_dup == len(dups)
    if _installed("datasets"):
        import datasets

        ds = datasets.load_dataset("parquet", data_files=sorted(map(str, (out / "curated").glob("*.parquet"))),
                                   split="train", cache_dir=str(tmp_path / "hf"))
        assert type(ds.features["image"]).__name__ == "Image"
        assert ds[0]["image"].size[0] > 0
        rs = datasets.load_dataset("parquet", data_files=sorted(map(str, (out / "rejected").glob("*.parquet"))),
                                   split="train", cache_dir=str(tmp_path / "hf"))
        assert len(rs) == stats["rejected_rows"]
    if not (_installed("duckdb") and _installed("datasets")):
        pytest.skip("duckdb / datasets not installed: only the pyarrow checks ran (pip install duckdb datasets)")


# ---------------------------------------------------------------------------------------------
# CLI

def test_version(capsys):
    code, out, _ = _cli(["--version"], capsys)
    assert code == 0 and out.startswith("clip-curate ") and out.split()[1][0].isdigit()


@pytest.mark.parametrize("flags, expect", [
    (["--runner", "Foo"], ["unknown runner", "DirectRunner", "DataflowRunner"]),
    (["--runner", "Dirct"], ["did you mean DirectRunner"]),
    (["--direct_num_workers", "two"], ["--direct_num_workers", "invalid int value"]),
    (["--direct-num-workers", "2"], ["did you mean --direct_num_workers"]),
    (["--direct-num-workers=2"], ["did you mean --direct_num_workers"]),
])
def test_beam_option_errors_are_one_line_with_a_hint(tmp_path, capsys, flags, expect):
    urls = _url_list(tmp_path)
    code, _, err = _cli(["run", "--input", urls, "--output", tmp_path / "o", *flags], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for text in expect:
        assert text in err
    assert not (tmp_path / "o").exists()


def test_audit_beam_option_error_is_one_line(tmp_path, capsys):
    code, _, err = _cli(["audit", "--input", tmp_path, "--direct_num_workers", "x"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--direct_num_workers" in err


def test_closed_pipe_prints_no_traceback():
    for cmd in ("clip-curate -h | head -1", "clip-curate run -h | head -1"):
        res = subprocess.run(["bash", "-c", cmd.replace("clip-curate", f"{sys.executable} -m clip_curate.cli")],
                             capture_output=True, text=True, timeout=120)
        assert res.stdout.startswith("usage:"), res
        assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------
# Summary hints

@pytest.mark.parametrize("reason, flag", [("blocked_address", "--allow-private-addresses"),
                                          ("dns_error", "--resolve"), ("robots_unavailable", "--retry-from")])
def test_summary_hint_when_one_reason_dominates(reason, flag):
    from clip_curate.stats import format_summary

    stats = {"input_rows": 10, "curated_rows": 4, "rejected_rows": 6, "rejected_by": {"download": {reason: 6}}}
    hints = [ln for ln in format_summary(stats).splitlines() if ln.startswith("hint:")]
    assert len(hints) == 1 and flag in hints[0] and reason in hints[0] and "60 %" in hints[0]
    stats = {**stats, "curated_rows": 6, "rejected_rows": 4, "rejected_by": {"download": {reason: 4}}}
    assert "hint:" not in format_summary(stats)  # under half: no hint
    stats = {**stats, "rejected_by": {"download": {"http_404": 4}}}
    assert "hint:" not in format_summary(stats)


@pytest.mark.slow
def test_blocked_addresses_get_a_hint_in_the_printed_summary(tmp_path):
    """A real run against loopback without --allow-private-addresses: every row is blocked, and the
    printed summary says which flag allows it."""
    urls = _url_list(tmp_path, 4)
    res = subprocess.run([sys.executable, "-m", "clip_curate.cli", "run", "--input", str(urls), "--output",
                          str(tmp_path / "o"), "--stages", "download", "--no-respect-robots-txt"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "download / blocked_address" in res.stdout
    assert "hint: 100 % of rows are download/blocked_address" in res.stdout
    assert "--allow-private-addresses" in res.stdout


# ---------------------------------------------------------------------------------------------
# Progress

def test_progress_line_total_and_eta():
    from clip_curate.pipeline import progress_line

    assert progress_line("download", 120, 10.0, 600, 1) == "progress download       120 rows of ~600     12.0 rows/s  ETA 40s"
    two = progress_line("download", 120, 10.0, 600, 2)
    assert "of ~300" in two and "1 of 2" in two and "ETA 15s" in two
    assert "ETA" not in progress_line("download", 120, 10.0)


def test_worker_envelope_is_unwrapped():
    import logging

    from clip_curate.cli import QuietBeamWorkerEcho

    envelope = ('severity: INFO timestamp {   seconds: 1764756000   nanos: 12000 } message: "progress download'
                '      120 rows \\"q\\" caf\\303\\251" instruction_id: "bundle_3" transform_id: "ProgressDownload" '
                'log_location: "/x/clip_curate/pipeline.py:81" thread: "Thread-5"')
    record = logging.LogRecord(cli.BEAM_WORKER_ECHO_LOGGER, logging.INFO, "x", 1, "Worker: %s", (envelope,), None)
    assert QuietBeamWorkerEcho().filter(record)
    assert record.getMessage() == 'progress download      120 rows "q" café'
    assert record.name == "clip_curate.pipeline" and record.levelname == "INFO"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_progress_lines_appear_during_a_slow_download(tmp_path, served_world, local_net_flags, workers):
    """Every answer waits 0.5 s and two requests run at once: the download phase lasts about 10 s, and
    progress lines arrive during it (the download releases rows as they finish), as the worker's own
    message, not wrapped in the job service's log envelope."""
    with served_world(tmp_path, 40, 3, delay_s=0.5) as web:
        res = subprocess.run(
            [sys.executable, "-m", "clip_curate.cli", "run", "--input", str(web.urls), "--output",
             str(tmp_path / "o"), "--stages", "download", *local_net_flags(), "--threads", "2",
             "--per-host-connections", "2", "--progress-seconds", "1",
             f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"],
            capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if "progress download" in ln]
    assert lines, res.stderr[-3000:]
    assert not [ln for ln in lines if "severity:" in ln or "instruction_id" in ln]
    assert any(" of ~" in ln and "rows/s" in ln for ln in lines)
    if workers == 1:
        assert any("ETA" in ln for ln in lines)


def test_overwrite_never_removes_the_runs_own_input(tmp_path):
    out = tmp_path / "out"
    (out / "rejected").mkdir(parents=True)
    (out / "stats.json").write_text("{}")
    with pytest.raises(ConfigError, match="own input"):
        claim_output(str(out), overwrite=True, inputs=(None, str(out)))          # --retry-from OUT --output OUT
    with pytest.raises(ConfigError, match="own input"):
        claim_output(str(out), overwrite=True, inputs=(str(out / "curated"), None))
    assert (out / "stats.json").exists()
    assert claim_output(str(out), overwrite=True, inputs=(str(tmp_path / "urls.parquet"),))


def test_overwrite_keeps_inputs_beside_the_outputs(tmp_path):
    """The demo's URL list lives in OUT/_world/: not a part --overwrite removes, so it is no conflict."""
    out = tmp_path / "out"
    (out / "_world").mkdir(parents=True)
    (out / "stats.json").write_text("{}")
    claim_output(str(out), overwrite=True, inputs=(str(out / "_world" / "urls.parquet"),))
    assert (out / "_world").exists() and not (out / "stats.json").exists()
