"""Bad input never kills a run: each input that used to end a job with a traceback (docs/bad-input.md) is fed
as it is, and the run either refuses it in one line with exit 2 before any work, or exits 0 with every input
row accounted for (input_rows == curated + rejected) under the stated reason.

The end-to-end runs use ``--stages caption`` on local files: no row is downloaded."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate import records
from clip_curate.cli import config_error_message, main as cli_main
from clip_curate.fields import ConfigError, load_yaml_config
from clip_curate.preflight import check_input_readable, probe_output
from clip_curate.readers import ReaderConfig, plan_input
from clip_curate.readers.base import ReadRejection, read_split
from clip_curate.readers.pools import fit_value, unify_types
from clip_curate.stages.caption import CaptionConfig, caption_verdict

CAPTION_ONLY = ["--stages", "caption", "--no-detect-language"]


# ---------------------------------------------------------------------------------------------
# the inputs of the table, one builder each


def surrogate_jsonl(d: Path) -> Path:
    """Valid JSON whose second caption decodes to a lone surrogate; the first row carries a NUL in a column."""
    p = d / "surrogate.jsonl"
    p.write_text('{"url": "http://a.test/1.jpg", "caption": "a red bus", "note": "x\\u0000y"}\n'
                 '{"url": "http://a.test/2.jpg", "caption": "half a pair \\ud800 here", "note": "ok"}\n'
                 '{"url": "http://a.test/3.jpg", "caption": "a green tram", "note": "ok"}\n')
    return p


def mixed_encoding_dir(d: Path) -> Path:
    """One UTF-8 CSV and one Latin-1 CSV (two of its three rows hold non-ASCII bytes)."""
    root = d / "mixed"
    root.mkdir()
    (root / "a.csv").write_bytes("url,caption\nhttp://a.test/1.jpg,café au lait\nhttp://a.test/2.jpg,tea\n"
                                 .encode("utf-8"))
    (root / "b.csv").write_bytes("url,caption\nhttp://b.test/1.jpg,crème brûlée\nhttp://b.test/2.jpg,plain\n"
                                 "http://b.test/3.jpg,déjà vu\n".encode("latin-1"))
    return root


def int_str_jsonl(d: Path) -> Path:
    """A carried column that is an int in some rows and a string in others (and a nested one)."""
    p = d / "drift.jsonl"
    rows = [{"url": f"http://a.test/{i}.jpg", "caption": f"caption {i}", "n": i if i % 2 else f"n{i}",
             "meta": {"i": i} if i % 3 else [i]} for i in range(6)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def big_int_jsonl(d: Path) -> Path:
    p = d / "bigint.jsonl"
    p.write_text('{"url": "http://a.test/1.jpg", "caption": "one", "n": 7}\n'
                 '{"url": "http://a.test/2.jpg", "caption": "two", "n": %d}\n' % (2 ** 70))
    return p


def parquet_drift_dir(d: Path) -> Path:
    root = d / "pqdrift"
    root.mkdir()
    pq.write_table(pa.table({"url": ["http://a.test/1.jpg", "http://a.test/2.jpg"], "caption": ["a", "b"],
                             "n": pa.array([1, 2], pa.int64())}), root / "a.parquet")
    pq.write_table(pa.table({"url": ["http://b.test/1.jpg"], "caption": ["c"], "n": pa.array(["three"])}),
                   root / "b.parquet")
    return root


GZ_ROWS = 3000


def truncated_gz_dir(d: Path) -> Path:
    """A good .csv.gz and one cut in half (its stream ends before gzip's end-of-stream marker)."""
    root = d / "gz"
    root.mkdir()
    text = "url,caption\n" + "".join(f"http://a.test/{i}.jpg,caption number {i}\n" for i in range(GZ_ROWS))
    (root / "good.csv.gz").write_bytes(gzip.compress(text.encode()))
    data = gzip.compress(text.replace("a.test", "b.test").encode())
    (root / "truncated.csv.gz").write_bytes(data[: len(data) // 2])
    return root


PQ_GROUP = 400


def corrupt_page_parquet(d: Path) -> Path:
    """Two zstd row groups; bytes inside the compressed data page of the second group's caption are flipped."""
    root = d / "corrupt"
    root.mkdir()
    path = root / "urls.parquet"
    n = 2 * PQ_GROUP
    pq.write_table(pa.table({"url": [f"http://a.test/{i}.jpg" for i in range(n)],
                             "caption": [f"caption {i} " + "x" * 40 for i in range(n)]}),
                   path, row_group_size=PQ_GROUP, compression="zstd", use_dictionary=False)
    raw = bytearray(path.read_bytes())
    start = pq.ParquetFile(path).metadata.row_group(1).column(1).data_page_offset
    frame = raw.index(b"\x28\xb5\x2f\xfd", start)  # the zstd frame of that page
    for i in range(frame + 6, frame + 30):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    return root


BOMB = """beam:
  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
  b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
  c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
  d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
  e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
  f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
"""


# ---------------------------------------------------------------------------------------------
# helpers


def _items(inp, **kw):
    plan = plan_input(ReaderConfig(input=str(inp), **kw))
    return plan, [item for s in plan.splits for item in read_split(s, plan)]


def _rejections(items):
    return [i for i in items if isinstance(i, ReadRejection)]


def _run(capsys, *args) -> tuple[int, str]:
    rc = cli_main(["run", *map(str, args)])
    return rc, capsys.readouterr().err.strip()


def _refused(capsys, *args, says: str) -> str:
    rc, err = _run(capsys, *args)
    assert rc == 2, err
    assert err.count("\n") == 0 and says in err, err
    return err


def _accounted(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == stats["curated_rows"] + stats["rejected_rows"]
    written = sum(pq.read_metadata(p).num_rows for p in (out / "curated").glob("*.parquet"))
    rejected = sum(pq.read_metadata(p).num_rows for p in (out / "rejected").glob("*.parquet"))
    assert (written, rejected) == (stats["curated_rows"], stats["rejected_rows"])
    return stats


def _table(out: Path, sub: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / sub).glob("*.parquet"))])


# ---------------------------------------------------------------------------------------------
# fast: the pieces


def test_text_problem_and_repair_keep_valid_text_and_its_uid():
    assert records.text_problem("naïve café 😀") is None
    assert records.repair_text("naïve café 😀") == "naïve café 😀"
    assert records.text_problem("a\x00b") == "NUL at character 1"
    assert records.repair_text("a\ud800b\x00") == "a\ufffdb\ufffd"
    assert records.make_uid("http://a.test/x.jpg", "café") == records.make_uid("http://a.test/x.jpg", "café")
    # a caption with a lone surrogate still gets the uid it always had (surrogatepass)
    assert len(records.make_uid("u", "\ud800")) == 32


def test_caption_stage_rejects_invalid_text():
    _, reason, detail = caption_verdict("bad \ud800", CaptionConfig(detect_language=False))
    assert (reason, detail) == ("invalid_text", "caption: lone surrogate U+D800 at character 4")
    assert caption_verdict("tab\x00nul", CaptionConfig(detect_language=False))[1] == "invalid_text"


def test_reader_rejects_invalid_captions_and_urls_and_repairs_other_text(tmp_path):
    p = surrogate_jsonl(tmp_path)
    with p.open("a") as f:
        f.write('{"url": "http://a.test/\\u0000.jpg", "caption": "nul in the url", "note": "ok"}\n')
    _, items = _items(p)
    rows = [i for i in items if isinstance(i, dict)]
    bad = _rejections(items)
    assert [(b.stage, b.reason) for b in bad] == [("caption", "invalid_text"), ("read", "invalid_url")]
    assert bad[0].row["caption"] == "half a pair \ufffd here" and "U+D800 at character 12" in bad[0].detail
    assert bad[0].uid == records.make_uid("http://a.test/2.jpg", "half a pair \ud800 here")
    assert [r["note"] for r in rows] == ["x\ufffdy", "ok"]
    assert rows[0]["uid"] == records.make_uid("http://a.test/1.jpg", "a red bus")


def test_encoding_per_file_and_input_encoding_flag(tmp_path):
    root = mixed_encoding_dir(tmp_path)
    _, items = _items(root)
    bad = _rejections(items)
    assert len(items) == 5 and [b.reason for b in bad] == ["bad_encoding", "bad_encoding"]
    assert bad[0].detail.startswith(f"{root / 'b.csv'}:2: column 'caption': byte 0xE8")
    assert "--input-encoding" in bad[0].detail and bad[1].detail.startswith(f"{root / 'b.csv'}:4:")
    _, items = _items(root / "b.csv", input_encoding="latin-1")
    assert [r["caption"] for r in items] == ["crème brûlée", "plain", "déjà vu"]
    with pytest.raises(ConfigError, match="--input-encoding: unknown encoding 'klingon'"):
        ReaderConfig(input=str(root), input_encoding="klingon")


def test_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffurl,caption\nhttp://a.test/1.jpg,hello\n".encode("utf-8"))
    _, items = _items(p)
    assert items[0]["url"] == "http://a.test/1.jpg"


def test_carried_types_unify_and_every_value_fits():
    assert unify_types([pa.int64(), pa.float64()]) == (pa.float64(), False)
    assert unify_types([pa.int32(), pa.int64()]) == (pa.int64(), False)
    assert unify_types([pa.int64(), pa.string()]) == (pa.string(), True)
    assert unify_types([pa.int64(), pa.uint64()]) == (pa.string(), True)
    assert unify_types([pa.list_(pa.int64())]) == (pa.string(), False)
    assert fit_value(2 ** 70, pa.string()) == (str(2 ** 70), True)
    assert fit_value({"b": 1, "a": [2]}, pa.string()) == ('{"a": [2], "b": 1}', True)
    assert fit_value(True, pa.string()) == ("true", True)
    assert fit_value(2 ** 70, pa.int64()) == (None, False)
    assert fit_value(3.0, pa.int64()) == (3, True)
    assert fit_value(3.5, pa.int64()) == (None, False)
    assert fit_value("12", pa.int64()) == (12, True)
    assert fit_value("twelve", pa.int64()) == (None, False)
    assert fit_value(300, pa.int8()) == (None, False)
    assert fit_value(True, pa.int64()) == (None, False)
    assert fit_value("false", pa.bool_()) == (None, False)
    assert fit_value(2, pa.float64()) == (2.0, True)
    assert fit_value("x", pa.timestamp("us")) == (None, False)


@pytest.mark.parametrize("build, column, values", [
    (int_str_jsonl, "n", ["n0", "1", "n2", "3", "n4", "5"]),
    (big_int_jsonl, "n", ["7", str(2 ** 70)]),
    (parquet_drift_dir, "n", ["1", "2", "three"]),
])
def test_drifting_columns_are_planned_as_string(tmp_path, build, column, values):
    plan, items = _items(build(tmp_path))
    assert dict((f.name, f.type) for f in plan.extra_fields)[column] == pa.string()
    assert [r[column] for r in items] == values
    pa.Table.from_pylist([{column: r[column]} for r in items], pa.schema([(column, pa.string())]))


def test_later_value_that_does_not_fit_the_peeked_type_is_null(tmp_path, monkeypatch):
    from clip_curate.readers import url_list

    monkeypatch.setattr(url_list, "PEEK_ROWS", 2)
    p = tmp_path / "late.jsonl"
    p.write_text("".join(json.dumps({"url": f"http://a.test/{i}.jpg", "caption": "c", "n": v}) + "\n"
                         for i, v in enumerate([1, 2, "three", 2 ** 70, 4.0])))
    plan, items = _items(p)
    assert plan.extra_fields[0].type == pa.int64()
    assert [r["n"] for r in items] == [1, 2, None, None, 4]


def test_truncated_gzip_keeps_the_rows_before_the_damage(tmp_path):
    root = truncated_gz_dir(tmp_path)
    _, items = _items(root)
    rows, bad = [i for i in items if isinstance(i, dict)], _rejections(items)
    assert len(bad) == 1 and bad[0].reason == "unreadable_source" and bad[0].damage == bad[0].detail
    assert bad[0].detail.startswith(f"{root / 'truncated.csv.gz'}:") and "EOFError" in bad[0].detail
    lost_from = int(bad[0].detail.split(":")[1])
    good = [r for r in rows if "a.test" in r["url"]]
    cut = [r for r in rows if "b.test" in r["url"]]
    assert len(good) == GZ_ROWS and 0 < len(cut) < GZ_ROWS and lost_from == len(cut) + 2
    assert cut[-1]["url"] == f"http://b.test/{len(cut) - 1}.jpg"  # rows before the damage, in order, whole


def test_corrupt_parquet_page_keeps_the_other_row_groups(tmp_path):
    root = corrupt_page_parquet(tmp_path)
    _, items = _items(root)
    rows, bad = [i for i in items if isinstance(i, dict)], _rejections(items)
    assert len(rows) == PQ_GROUP and len(bad) == 1
    assert bad[0].detail.startswith(f"{root / 'urls.parquet'} row group 1: rows 0..{PQ_GROUP - 1} "
                                    f"({PQ_GROUP} row(s)) not read") and "ZSTD" in bad[0].detail


def test_unreadable_parquet_footer_is_one_damaged_source_not_a_refusal(tmp_path):
    root = parquet_drift_dir(tmp_path)
    (root / "c.parquet").write_bytes(b"PAR1 not really")
    plan, items = _items(root)
    bad = _rejections(items)
    assert len(items) == 4 and [b.reason for b in bad] == ["unreadable_source"]
    assert "footer unreadable" in bad[0].detail
    with pytest.raises(ConfigError, match="cannot be read to its end: .*c.parquet"):
        check_input_readable(plan)


def test_strict_input_preflight_names_the_damage(tmp_path):
    plan = plan_input(ReaderConfig(input=str(truncated_gz_dir(tmp_path))))
    with pytest.raises(ConfigError) as exc:
        check_input_readable(plan)
    assert "truncated.csv.gz" in str(exc.value) and "\n" not in str(exc.value)
    check_input_readable(plan_input(ReaderConfig(input=str(tmp_path / "gz" / "good.csv.gz"))))


# -- output probe


def _immutable_dir(path: Path):
    """A directory nobody (root included) may create files in, or None when this system cannot make one."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return path
    return None


def _release(path: Path) -> None:
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


def test_probe_output_refuses_files_and_unwritable_directories(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for api in ("beam", "fsspec"):
        with pytest.raises(ConfigError, match="is a file, not a directory"):
            probe_output(str(f), api=api)
        with pytest.raises(ConfigError, match="which is a file"):
            probe_output(str(f / "out"), api=api)
    probe_output(str(tmp_path / "new" / "deeper"))
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind
    probe_output(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    ro = _immutable_dir(tmp_path / "ro")
    if ro is None:
        pytest.skip("running as root without a working chattr: no directory is unwritable to this test")
    try:
        for api in ("beam", "fsspec"):
            with pytest.raises(ConfigError, match="is not writable"):
                probe_output(str(ro), api=api)
            with pytest.raises(ConfigError, match="is not writable"):
                probe_output(str(ro / "out"), api=api)
    finally:
        _release(ro)


# -- configs


@pytest.fixture(scope="module")
def classes():
    from clip_curate.config import all_config_classes

    return all_config_classes()


@pytest.mark.parametrize("text, says", [
    (BOMB, "aliases and anchors are not accepted"),
    ("min_caption_words: &n 3\nmax_caption_chars: *n\n", "YAML alias *n at line 2"),
    ("stages: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ("beam:\n  runner: {a: 1}\n", "'beam' 'runner': expected a scalar"),
    ("beam:\n  no_such_option: 3\n", "'beam': unknown flag --no_such_option=3"),
    ("beam:\n  - [--runner, DirectRunner]\n", "'beam' item 1: expected a scalar"),
    ("beam: 3\n", "key 'beam': 3 is not of type"),
])
def test_yaml_configs_are_parsed_safely(tmp_path, classes, text, says):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(says)) as exc:
        load_yaml_config(str(p), classes)
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 300


def test_yaml_config_size_cap_and_good_beam_section(tmp_path, classes):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than 1 MB"):
        load_yaml_config(str(big), classes)
    ok = tmp_path / "ok.yaml"
    ok.write_text("min-caption-words: 2\nbeam:\n  direct_num_workers: 1\n  experiments: [a, b]\n  "
                  "save_main_session: false\n")
    values, beam_args = load_yaml_config(str(ok), classes)
    assert values == {"min_caption_words": 2}
    assert beam_args == ["--direct_num_workers=1", "--experiments=a", "--experiments=b"]


# -- ConfigErrors that come back through Beam


def _raise_config_error(_):
    raise ConfigError("the flag --x is wrong")


def test_config_error_raised_inside_a_beam_step_is_found():
    from apache_beam.options.pipeline_options import PipelineOptions, TypeOptions

    options = PipelineOptions([])
    options.view_as(TypeOptions).allow_unsafe_triggers = True  # the FnApiRunner, as run.py uses it
    with pytest.raises(Exception) as exc:
        with beam.Pipeline(options=options) as p:
            _ = p | beam.Create([1]) | "Boom" >> beam.Map(_raise_config_error)
    assert config_error_message(exc.value) == "the flag --x is wrong"
    remote = RuntimeError("Pipeline failed: Traceback (most recent call last):\n  File ...\n"
                          "clip_curate.fields.ConfigError: the flag --y is wrong [while running 'Boom']\n")
    assert config_error_message(remote) == "the flag --y is wrong"
    assert config_error_message(RuntimeError("a bug")) is None


# ---------------------------------------------------------------------------------------------
# end to end: one run per row of the table


@pytest.mark.slow
def test_row_lone_surrogate_caption(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _run(capsys, "--input", surrogate_jsonl(tmp_path), "--output", out, *CAPTION_ONLY)
    assert rc == 0, err
    stats = _accounted(out)
    assert (stats["input_rows"], stats["curated_rows"]) == (3, 2)
    assert stats["rejected_by"] == {"caption": {"invalid_text": 1}}
    assert stats["counters"]["read_repaired_values"] == 1
    rejected = _table(out, "rejected").to_pylist()[0]
    assert rejected["caption"] == "half a pair \ufffd here" and "U+D800" in rejected["detail"]


@pytest.mark.slow
def test_row_utf8_and_latin1_csv_in_one_directory(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _run(capsys, "--input", mixed_encoding_dir(tmp_path), "--output", out, *CAPTION_ONLY)
    assert rc == 0, err
    stats = _accounted(out)
    assert (stats["input_rows"], stats["curated_rows"]) == (5, 3)
    assert stats["rejected_by"] == {"read": {"bad_encoding": 2}}
    details = sorted(_table(out, "rejected").column("detail").to_pylist())
    assert [d.split(": ")[0].rsplit("/", 1)[-1] for d in details] == ["b.csv:2", "b.csv:4"]


@pytest.mark.slow
def test_row_int_and_str_in_one_jsonl_column(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _run(capsys, "--input", int_str_jsonl(tmp_path), "--output", out, *CAPTION_ONLY)
    assert rc == 0, err
    assert _accounted(out)["curated_rows"] == 6
    table = _table(out, "curated")
    assert table.schema.field("n").type == pa.string() and table.schema.field("meta").type == pa.string()
    assert sorted(table.column("n").to_pylist()) == ["1", "3", "5", "n0", "n2", "n4"]
    assert '{"i": 1}' in table.column("meta").to_pylist()


@pytest.mark.slow
def test_row_integer_beyond_int64(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _run(capsys, "--input", big_int_jsonl(tmp_path), "--output", out, *CAPTION_ONLY)
    assert rc == 0, err
    assert _accounted(out)["curated_rows"] == 2
    assert sorted(_table(out, "curated").column("n").to_pylist()) == [str(2 ** 70), "7"]


@pytest.mark.slow
def test_row_parquet_column_int64_in_one_file_string_in_another(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _run(capsys, "--input", parquet_drift_dir(tmp_path), "--output", out, *CAPTION_ONLY)
    assert rc == 0, err
    assert _accounted(out)["curated_rows"] == 3
    assert sorted(_table(out, "curated").column("n").to_pylist()) == ["1", "2", "three"]


@pytest.mark.slow
def test_row_truncated_csv_gz_beside_a_good_one(tmp_path, capsys):
    root = truncated_gz_dir(tmp_path)
    out = tmp_path / "out"
    rc, err = _run(capsys, "--input", root, "--output", out, *CAPTION_ONLY)
    assert rc == 0, err
    stats = _accounted(out)
    assert stats["rejected_by"] == {"read": {"unreadable_source": 1}}
    assert GZ_ROWS < stats["curated_rows"] < 2 * GZ_ROWS
    [damage] = stats["damaged_sources"]
    assert damage.startswith(f"{root / 'truncated.csv.gz'}:") and "EOFError" in damage
    # --strict-input: refused before any work, nothing written
    strict_out = tmp_path / "strict"
    _refused(capsys, "--input", root, "--output", strict_out, *CAPTION_ONLY, "--strict-input",
             says="--strict-input: an input source cannot be read to its end")
    assert not strict_out.exists()


@pytest.mark.slow
def test_row_parquet_corrupt_page_in_second_row_group(tmp_path, capsys):
    root = corrupt_page_parquet(tmp_path)
    out = tmp_path / "out"
    rc, err = _run(capsys, "--input", root, "--output", out, *CAPTION_ONLY)
    assert rc == 0, err
    stats = _accounted(out)
    assert (stats["input_rows"], stats["curated_rows"]) == (PQ_GROUP + 1, PQ_GROUP)
    assert stats["damaged_sources"][0].startswith(f"{root / 'urls.parquet'} row group 1")
    strict_out = tmp_path / "strict"
    _refused(capsys, "--input", root, "--output", strict_out, *CAPTION_ONLY, "--strict-input",
             says="row group 1")
    assert not strict_out.exists()


@pytest.mark.slow
def test_row_output_that_cannot_be_written(tmp_path, capsys):
    urls = surrogate_jsonl(tmp_path)
    f = tmp_path / "out.txt"
    f.write_text("not a directory")
    _refused(capsys, "--input", urls, "--output", f, *CAPTION_ONLY, says=f"--output '{f}' is a file")
    _refused(capsys, "--input", urls, "--output", f / "sub", *CAPTION_ONLY, says="which is a file")
    ro = _immutable_dir(tmp_path / "ro")
    if ro is None:
        pytest.skip("running as root without a working chattr: no directory is unwritable to this test")
    try:
        _refused(capsys, "--input", urls, "--output", ro, *CAPTION_ONLY, says="is not writable")
        _refused(capsys, "--input", urls, "--output", ro / "out", *CAPTION_ONLY, says="is not writable")
    finally:
        _release(ro)


@pytest.mark.slow
def test_export_output_that_cannot_be_written(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _run(capsys, "--input", surrogate_jsonl(tmp_path), "--output", out, "--stages", "none")
    assert rc == 0, err
    # curated rows without images: the export probes --output before it writes anything
    f = tmp_path / "shards.txt"
    f.write_text("x")
    assert cli_main(["export", "--input", str(out), "--output", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a file" in err


@pytest.mark.slow
def test_row_yaml_alias_bomb_in_the_beam_section(tmp_path, capsys):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB)
    err = _refused(capsys, "--config", cfg, "--input", surrogate_jsonl(tmp_path), "--output", tmp_path / "out",
                   *CAPTION_ONLY, says="aliases and anchors are not accepted")
    assert len(err) < 300 and not (tmp_path / "out").exists()


def _tar(path: Path, samples: list[tuple[str, dict, bytes]]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for key, meta, image in samples:
            for name, data in ((f"{key}.jpg", image), (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_pool_columns_unify_and_a_damaged_shard_is_one_damaged_source(tmp_path, jpeg):
    image = jpeg(1)
    shards = tmp_path / "shards"
    shards.mkdir()
    metas = [{"url": f"http://a.test/{i}.jpg", "caption": f"c{i}", "n": i if i % 2 else f"n{i}"} for i in range(6)]
    _tar(shards / "00000.tar", [(f"{i:05d}", m, image) for i, m in enumerate(metas)])
    data = (shards / "00000.tar").read_bytes()
    (shards / "00001.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated mid-sample
    plan, items = _items(shards)
    assert dict((f.name, f.type) for f in plan.extra_fields)["n"] == pa.string()
    rows, bad = [i for i in items if isinstance(i, dict)], _rejections(items)
    assert sorted({r["n"] for r in rows}) == ["1", "3", "5", "n0", "n2", "n4"]
    assert bad and {b.reason for b in bad} == {"corrupt_shard"}
    assert {b.damage for b in bad} == {f"{shards / '00001.tar'}: damaged tar shard (see its read/corrupt_shard rows)"}
    hf = tmp_path / "hf"
    hf.mkdir()
    for name, n in (("a", pa.array([1], pa.int64())), ("b", pa.array(["two"]))):
        pq.write_table(pa.table({"image": pa.array([image], pa.binary()), "caption": ["c"], "n": n}),
                       hf / f"{name}.parquet")
    plan, items = _items(hf, input_format="hf-parquet")
    assert dict((f.name, f.type) for f in plan.extra_fields)["n"] == pa.string()
    assert sorted(r["n"] for r in items) == ["1", "two"]
