"""Reader: formats, paths, carried columns, uid, one-line errors."""
import gzip
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate import records
from clip_curate.fields import ConfigError
from clip_curate.readers import ReaderConfig, plan_input
from clip_curate.readers.base import ReadRejection, read_split

ROWS = [{"url": f"http://h{i % 3}.test/{i}.jpg", "caption": f"caption {i}", "score": i / 10} for i in range(25)]


def _read_all(plan):
    return [r for s in plan.splits for r in read_split(s, plan)]


def _write(path, fmt, rows=ROWS):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "wt") as f:
            f.write("\n".join(lines) + "\n")
    else:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("name", ["u.parquet", "u.csv", "u.tsv", "u.jsonl", "u.jsonl.gz", "u.csv.gz"])
def test_formats_read_every_row_with_carried_columns(tmp_path, name):
    fmt = name.split(".")[1]
    _write(tmp_path / name, fmt)
    plan = plan_input(ReaderConfig(input=str(tmp_path / name)))
    rows = _read_all(plan)
    assert [r["url"] for r in rows] == [r["url"] for r in ROWS]
    assert [r["caption"] for r in rows] == [r["caption"] for r in ROWS]
    assert [float(r["score"]) for r in rows] == [r["score"] for r in ROWS]
    assert rows[3]["uid"] == records.make_uid(ROWS[3]["url"], ROWS[3]["caption"])
    assert len({r["uid"] for r in rows}) == len(ROWS)
    if fmt == "parquet":
        assert len(plan.splits) == 3 and plan.estimated_rows == 25  # one split per row group


def test_directory_and_glob_and_fsspec_memory(tmp_path):
    for i in range(3):
        _write(tmp_path / f"part{i}.parquet", "parquet", ROWS[i * 5:(i + 1) * 5])
    (tmp_path / "_SUCCESS").write_text("")
    assert len(_read_all(plan_input(ReaderConfig(input=str(tmp_path))))) == 15
    assert len(_read_all(plan_input(ReaderConfig(input=str(tmp_path / "part[01].parquet"))))) == 10
    with fsspec.open("memory://bucket/urls.jsonl", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS[:7])
    plan = plan_input(ReaderConfig(input="memory://bucket/urls.jsonl"))
    assert len(plan.files) == 1 and plan.files[0].startswith("memory://")
    assert len(_read_all(plan)) == 7


def test_renamed_columns_input_uid_and_clashing_names(tmp_path):
    rows = [{"link": "http://a.test/1.jpg", "alt": "x", "uid": "my-id-1", "width": 5, "key": "000"}]
    _write(tmp_path / "u.parquet", "parquet", rows)
    plan = plan_input(ReaderConfig(input=str(tmp_path / "u.parquet"), url_col="link", caption_col="alt"))
    (row,) = _read_all(plan)
    assert row["uid"] == "my-id-1" and row["url"] == "http://a.test/1.jpg" and row["caption"] == "x"
    assert row["input_width"] == 5 and row["key"] == "000" and "width" not in row
    assert [f.name for f in plan.extra_fields] == ["input_width", "key"]


@pytest.mark.parametrize("setup,kwargs,message", [
    (None, {"input": "{tmp}/missing.parquet"}, "input not found"),
    ("u.parquet", {"url_col": "link"}, "column 'link' not found"),
    ("u.parquet", {"caption_col": "text"}, "pass --caption-col"),
    ("u.xlsx", {}, "unknown input format"),
    ("empty.csv", {}, "is empty"),
    ("bad.jsonl", {}, "not JSON lines"),
    ("emptydir", {}, "holds no"),
])
def test_user_mistakes_are_one_line_config_errors(tmp_path, setup, kwargs, message):
    if setup == "u.parquet":
        _write(tmp_path / setup, "parquet")
    elif setup == "u.xlsx":
        (tmp_path / setup).write_bytes(b"PK\x03\x04")
    elif setup == "empty.csv":
        (tmp_path / setup).write_text("url,caption\n")
    elif setup == "bad.jsonl":
        (tmp_path / setup).write_text("this is not json\nnor this\n")
    elif setup == "emptydir":
        (tmp_path / setup).mkdir()
    args = {"input": str(tmp_path / (setup or ""))}
    args.update({k: v.format(tmp=tmp_path) for k, v in kwargs.items()})
    with pytest.raises(ConfigError, match=message) as exc:
        plan_input(ReaderConfig(**args))
    assert "\n" not in str(exc.value)


def test_bad_jsonl_lines_become_rows_to_reject(tmp_path):
    (tmp_path / "u.jsonl").write_text('{"url": "http://a.test/1.jpg", "caption": "a"}\nnot json\n[1, 2]\n')
    rows = _read_all(plan_input(ReaderConfig(input=str(tmp_path / "u.jsonl"))))
    assert len(rows) == 3
    bad = [r for r in rows if isinstance(r, ReadRejection)]
    assert len(bad) == 2 and {r.reason for r in bad} == {"unreadable_source"}
    assert [r.detail.rsplit(":", 2)[-2:] for r in bad] == [["2", " not JSON"], ["3", " not an object"]]
