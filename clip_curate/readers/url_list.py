"""Reader ``urls``: URL lists (parquet / csv / tsv / jsonl, optionally .gz) from any fsspec path.

``plan_url_list`` inspects the input at pipeline-construction time (files, format, columns, row
estimate) so user mistakes fail fast with one line; the splits are parquet row groups or whole text
files. ``--retry-from OUT`` reads OUT's rejected rows with a transient reason as the input.
"""
from __future__ import annotations

import csv
import gzip
import json
import logging
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clip_curate import records
from clip_curate import schemas as schema
from clip_curate.fields import ConfigError
from clip_curate.readers.base import (
    RESERVED,
    URL_LIST_FORMATS,
    InputPlan,
    Reader,
    ReaderConfig,
    ReadRejection,
    Split,
    as_text,
    register_reader,
)

log = logging.getLogger(__name__)

FORMATS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".tsv": "tsv",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")
_GLOB_CHARS = set("*?[")


def _strip_compression(path: str) -> str:
    for ext in COMPRESSIONS:
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def detect_format(path: str) -> str | None:
    base = _strip_compression(path.lower())
    for ext, fmt in FORMATS.items():
        if base.endswith(ext):
            return fmt
    return None


def expand_paths(path: str) -> list[str]:
    """Files named by a file, a glob or a directory (recursively), as fully qualified paths."""
    try:
        fs, fs_path = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot open input {path!r}: {exc}") from None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def qualify(p: str) -> str:
        return p if protocol in ("file", "local") else fs.unstrip_protocol(p)

    if any(c in fs_path for c in _GLOB_CHARS):
        found = sorted(p for p in fs.glob(fs_path) if fs.isfile(p))
    elif fs.isdir(fs_path):
        found = sorted(p for p in fs.find(fs_path) if not p.rsplit("/", 1)[-1].startswith((".", "_")))
        found = [p for p in found if detect_format(p)]
        if not found:
            raise ConfigError(f"input directory {path!r} holds no .parquet/.csv/.tsv/.jsonl files")
    elif fs.exists(fs_path):
        found = [fs_path]
    else:
        raise ConfigError(f"input not found: {path!r}")
    if not found:
        raise ConfigError(f"input glob {path!r} matched no files")
    return [qualify(p) for p in found]


def _open_text(path: str):
    return fsspec.open(path, "rt", compression="infer", encoding="utf-8", newline="").open()


def _peek_columns(path: str, fmt: str) -> tuple[list[pa.Field], int, int]:
    """(fields, rows in the peeked block, bytes in the peeked block) of a file's first block."""
    if fmt == "parquet":
        with fsspec.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            sch = meta.schema.to_arrow_schema()
        return list(sch), meta.num_rows, -1
    with _open_text(path) as f:
        if fmt in ("csv", "tsv"):
            reader = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
            header = next(reader, None)
            if header is None:
                return [], 0, 0
            n = sum(1 for _ in zip(range(1000), reader))
            return [pa.field(h, pa.string()) for h in header], n, max(f.tell(), 1) if n else 0
        fields: dict[str, pa.DataType] = {}
        n = bad = 0
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):  # rejected per row at read time (unreadable_source)
                bad += 1
                if bad >= 100 and n == 0:
                    break
                continue
            for k, v in obj.items():
                if k not in fields or fields[k] == pa.null():
                    fields[k] = pa.scalar(v).type if v is not None and not isinstance(v, (dict, list)) else (
                        pa.string() if v is not None else pa.null())
            n += 1
            if n >= 1000:
                break
        if n == 0 and bad:
            raise ConfigError(f"{path} is not JSON lines (no line parses as a JSON object)")
        return [pa.field(k, t if t != pa.null() else pa.string()) for k, t in fields.items()], n, -1


def _file_size(path: str) -> int:
    fs, p = fsspec.core.url_to_fs(path)
    try:
        return int(fs.size(p) or 0)
    except (OSError, NotImplementedError):
        return 0


def plan_url_list(cfg: ReaderConfig, fmt: str = "urls") -> InputPlan:
    """Plan a URL list (``--retry-from OUT``: OUT's transient rejections); ConfigError for every user mistake."""
    if cfg.retry_from:
        return plan_retry(cfg)
    files = expand_paths(cfg.input)
    fmts = {detect_format(p) if fmt in ("auto", "urls") else fmt for p in files}
    if None in fmts:
        bad = next(p for p in files if detect_format(p) is None)
        raise ConfigError(f"unknown input format for {bad!r}: use .parquet, .csv, .tsv or .jsonl "
                          "(optionally .gz), or pass --input-format")
    if len(fmts) > 1:
        raise ConfigError(f"input mixes formats {sorted(fmts)}; point --input at one format")
    fmt = fmts.pop()
    try:
        fields, peek_rows, peek_bytes = _peek_columns(files[0], fmt)
    except ConfigError:
        raise
    except (OSError, pa.ArrowException, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(f"cannot read {files[0]!r} as {fmt}: {exc}") from None
    names = [f.name for f in fields]
    for flag, col in (("--url-col", cfg.url_col), ("--caption-col", cfg.caption_col)):
        if col not in names:
            raise ConfigError(f"column {col!r} not found in {files[0]} (columns: {', '.join(names) or 'none'}); "
                              f"pass {flag} NAME")
    splits: list[Split] = []
    estimated = 0
    if fmt == "parquet":
        for path in files:
            try:
                with fsspec.open(path, "rb") as f:
                    meta = pq.ParquetFile(f).metadata
            except (OSError, pa.ArrowException) as exc:
                raise ConfigError(f"cannot read parquet {path!r}: {exc}") from None
            estimated += meta.num_rows
            splits.extend(Split(path, fmt, i) for i in range(meta.num_row_groups) if meta.row_group(i).num_rows)
    else:
        sizes = [_file_size(p) for p in files]
        per_row = (peek_bytes / peek_rows) if peek_rows and peek_bytes > 0 else 100.0
        estimated = max(peek_rows, int(sum(sizes) / max(per_row, 1.0)))
        if peek_rows == 0 and len(files) == 1:
            estimated = 0
        splits = [Split(p, fmt) for p in files]
    if estimated == 0:
        raise ConfigError(f"input {cfg.input!r} is empty (no rows)")
    uid_col = cfg.uid_col if cfg.uid_col in names else None
    core = {cfg.url_col, cfg.caption_col} | ({uid_col} if uid_col else set())
    extra, renames = [], []
    for f in fields:
        if f.name in core:
            continue
        out_name = f"input_{f.name}" if f.name in RESERVED else f.name
        if out_name != f.name:
            log.warning("input column %r clashes with an output field; carried through as %r", f.name, out_name)
        extra.append(pa.field(out_name, f.type))
        renames.append((f.name, out_name))
    log.info("input: %d %s file(s), %d split(s), ~%d rows, carried columns: %s",
             len(files), fmt, len(splits), estimated, ", ".join(n for _, n in renames) or "none")
    return InputPlan(fmt, tuple(files), tuple(splits), tuple(names), tuple(extra), tuple(renames),
                     estimated, cfg.url_col, cfg.caption_col, uid_col)


def plan_retry(cfg: ReaderConfig) -> InputPlan:
    """Plan ``--retry-from OUT``: OUT's rejected rows with a transient reason become the input."""
    out = cfg.retry_from.rstrip("/")
    files = expand_paths(out + "/rejected/*.parquet") if _exists(out + "/rejected") else []
    if not files:
        raise ConfigError(f"--retry-from {out!r}: no rejected/*.parquet there (is it a clip-curate output?)")
    estimated = 0
    splits = []
    sch = None
    for path in files:
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            sch = sch or pf.schema_arrow
            estimated += pf.metadata.num_rows
            splits.extend(Split(path, "parquet", i) for i in range(pf.metadata.num_row_groups))
    core_rejected = set(schema.field_names("rejected_row"))
    extra = tuple(f for f in sch if f.name not in core_rejected)
    return InputPlan("parquet", tuple(files), tuple(splits), tuple(sch.names), extra,
                     tuple((f.name, f.name) for f in extra), estimated, "url", "caption", "uid",
                     only_reasons=records.TRANSIENT_REASONS)


def _exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def _raw_records(split: Split) -> Iterator[dict[str, Any] | ReadRejection]:
    if split.fmt == "parquet":
        with fsspec.open(split.path, "rb") as f:
            pf = pq.ParquetFile(f)
            groups = None if split.row_group is None else [split.row_group]
            for batch in pf.iter_batches(batch_size=4096, row_groups=groups):
                yield from batch.to_pylist()
    elif split.fmt in ("csv", "tsv"):
        csv.field_size_limit(1 << 30)
        with _open_text(split.path) as f:
            yield from csv.DictReader(f, delimiter="," if split.fmt == "csv" else "\t")
    else:
        with _open_text(split.path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        yield _unreadable(f"{split.path}:{lineno}: not JSON")
                        continue
                    yield obj if isinstance(obj, dict) else _unreadable(f"{split.path}:{lineno}: not an object")


def _unreadable(where: str) -> ReadRejection:
    return ReadRejection({"uid": records.make_uid(where, None), "url": None, "caption": None},
                         "unreadable_source", where)


def to_row(raw: dict[str, Any], plan: InputPlan) -> dict[str, Any]:
    """Input record -> pipeline row (uid, url, caption, carried columns)."""
    url = as_text(raw.get(plan.url_col))
    caption = as_text(raw.get(plan.caption_col))
    uid = as_text(raw.get(plan.uid_col)) if plan.uid_col else None
    row = {"uid": uid or records.make_uid(url, caption), "url": url.strip() if url else url, "caption": caption}
    for src, dst in plan.extra_renames:
        row[dst] = raw.get(src)
    return row




def read_url_split(split: Split, plan: InputPlan) -> Iterator[dict[str, Any] | ReadRejection]:
    """Rows of one URL-list split; unparseable lines come out as ``read/unreadable_source`` rejections."""
    for raw in _raw_records(split):
        if isinstance(raw, ReadRejection):
            yield raw
        elif not plan.only_reasons or raw.get("reason") in plan.only_reasons:
            yield to_row(raw, plan)


register_reader(Reader("urls", ("urls",) + URL_LIST_FORMATS, detect=lambda cfg: "urls", plan=plan_url_list,
                       read=read_url_split, priority=1000))
