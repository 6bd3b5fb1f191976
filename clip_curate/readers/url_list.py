"""Reader ``urls``: URL lists (parquet / csv / tsv / jsonl, optionally .gz) from any fsspec path.

``plan_url_list`` inspects the input at pipeline-construction time (files, format, columns, row
estimate) so user mistakes fail fast with one line; the splits are parquet row groups or whole text
files. ``--retry-from OUT`` reads OUT's rejected rows with a transient reason as the input.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clip_curate import records
from clip_curate import schemas as schema
from clip_curate.fields import ConfigError
from clip_curate.readers.base import (
    DAMAGE_ERRORS,
    RESERVED,
    URL_LIST_FORMATS,
    InputPlan,
    Reader,
    ReaderConfig,
    ReadRejection,
    Split,
    as_text,
    damaged,
    register_reader,
    split_where,
)
from clip_curate.readers.pools import PEEK, carried_values, json_type, unify_columns, unify_schemas

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


#: Characters a text decoder with ``surrogateescape`` makes of bytes not valid in the encoding.
_ESCAPED = re.compile("[\udc80-\udcff]")
PEEK_ROWS = 1000


def _codec(encoding: str) -> str:
    """UTF-8 is read as utf-8-sig: a leading byte-order mark is not part of the first column's name."""
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _open_text(path: str, encoding: str = "utf-8"):
    """``path`` (decompressed by its extension) as text; bytes not valid in ``encoding`` come out as
    surrogate escapes (U+DC80..U+DCFF), so one bad row never stops the file (see :func:`_bad_bytes`)."""
    raw = fsspec.open(path, "rb", compression="infer").open()
    return io.TextIOWrapper(raw, encoding=_codec(encoding), errors="surrogateescape", newline="")


def _bad_bytes(text: str, encoding: str) -> str | None:
    """Which bytes of a decoded line were not valid in ``encoding`` (None: all were)."""
    m = _ESCAPED.search(text)
    if m is None:
        return None
    n = len(_ESCAPED.findall(text))
    return (f"byte 0x{ord(m.group()) - 0xDC00:02X} at character {m.start()} is not valid {encoding}"
            + (f" ({n} bad bytes on the line)" if n > 1 else "") + "; pass --input-encoding if the file "
            "is in another encoding")


def _lines(f, counter: list[int]) -> Iterator[str]:
    for line in f:
        counter[0] += len(line)
        yield line


def _text_records(path: str, fmt: str, encoding: str) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` of a text file: a dict per row, or a ReadRejection for a row not valid in
    ``encoding`` (``read/bad_encoding``) or not a JSON object (``read/unreadable_source``). Damage (a
    truncated or corrupt compressed stream) raises :class:`_Damaged` after the rows read before it."""
    lineno = 0
    try:
        with _open_text(path, encoding) as f:
            if fmt in ("csv", "tsv"):
                reader = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
                header = next(reader, None)
                lineno = reader.line_num
                if header is None:
                    return
                bad = next((b for b in map(lambda h: _bad_bytes(h, encoding), header) if b), None)
                if bad:
                    yield lineno, _rejected(path, lineno, "bad_encoding", f"header line: {bad}")
                    header = [records.repair_text(h) for h in header]
                for rec in reader:
                    first, lineno = lineno + 1, reader.line_num
                    bad = next((f"column {name!r}: {b}" for name, b in
                                zip(header + [f"#{i}" for i in range(len(header), len(rec))],
                                    (_bad_bytes(v, encoding) for v in rec)) if b), None)
                    if bad:
                        yield first, _rejected(path, first, "bad_encoding", bad)
                    elif rec:
                        yield first, dict(zip(header, rec))
            else:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    bad = _bad_bytes(line, encoding)
                    if bad:
                        yield lineno, _rejected(path, lineno, "bad_encoding", bad)
                        continue
                    try:
                        obj = json.loads(line)
                    except (json.JSONDecodeError, RecursionError):
                        yield lineno, _rejected(path, lineno, "unreadable_source", "not JSON")
                        continue
                    yield lineno, obj if isinstance(obj, dict) else _rejected(path, lineno, "unreadable_source",
                                                                             "not an object")
    except DAMAGE_ERRORS as exc:
        raise _Damaged(lineno + 1, exc) from exc


class _Damaged(Exception):
    """A text source that cannot be read past ``line``."""

    def __init__(self, line: int, cause: BaseException):
        super().__init__(f"line {line}: {type(cause).__name__}: {cause}")
        self.line, self.cause = line, cause


def _rejected(path: str, lineno: int, reason: str, what: str) -> ReadRejection:
    detail = f"{path}:{lineno}: {what}"
    return ReadRejection({"uid": records.make_uid(detail, None), "url": None, "caption": None}, reason, detail)


def _peek_text(path: str, fmt: str, encoding: str, limit: int | None = None
               ) -> tuple[dict[str, list[pa.DataType]], int, int]:
    """(column -> the types its values have, rows peeked, characters they span) of a text file's first rows.
    CSV columns are text; JSON values give their own types (nested values and integers beyond int64: text).
    A file damaged after some rows gives what was read before the damage."""
    limit = limit or PEEK_ROWS
    types: dict[str, list[pa.DataType]] = {}
    chars = [0]
    count = [0, 0]  # rows, lines that are no JSON object
    try:
        with _open_text(path, encoding) as f:
            lines = _lines(f, chars)
            if fmt in ("csv", "tsv"):
                reader = csv.reader(lines, delimiter="," if fmt == "csv" else "\t")
                header = next(reader, None)
                if header is None:
                    return {}, 0, 0
                if any(_bad_bytes(h, encoding) for h in header):
                    raise ConfigError(f"{path}: the header line is not valid {encoding}; pass --input-encoding "
                                      "(e.g. latin-1, cp1252)")
                types.update((h, [pa.string()]) for h in header)
                for _ in zip(range(limit), reader):
                    count[0] += 1
            else:
                _peek_json(lines, encoding, limit, types, count)
    except DAMAGE_ERRORS:
        if not types:
            raise
    if fmt not in ("csv", "tsv") and count[0] == 0 and count[1]:
        raise ConfigError(f"{path} is not JSON lines (no line parses as a JSON object in {encoding})")
    return types, count[0], chars[0] if count[0] else 0


def _peek_json(lines: Iterator[str], encoding: str, limit: int, types: dict[str, list[pa.DataType]],
               count: list[int]) -> None:
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = None if _bad_bytes(line, encoding) else json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            obj = None
        if not isinstance(obj, dict):  # rejected per row at read time
            count[1] += 1
            if count[1] >= 100 and count[0] == 0:
                return
            continue
        for k, v in obj.items():
            if records.text_problem(k):
                continue  # a key no column can be named by: its values are not carried
            kinds = types.setdefault(k, [])
            if v is not None:
                t = json_type(v)
                if t not in kinds:
                    kinds.append(t)
        count[0] += 1
        if count[0] >= limit:
            return


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
    if fmt == "parquet":
        fields, first, splits, estimated = _plan_parquet_files(files, cfg.input)
        peek_names = [f.name for f in fields if f.name in first]
    else:
        fields, first, peek_names, splits, estimated = _plan_text_files(files, fmt, cfg)
    for flag, col in (("--url-col", cfg.url_col), ("--caption-col", cfg.caption_col)):
        if col not in peek_names:
            raise ConfigError(f"column {col!r} not found in {first} (columns: {', '.join(peek_names) or 'none'}); "
                              f"pass {flag} NAME")
    if estimated == 0:
        raise ConfigError(f"input {cfg.input!r} is empty (no rows)")
    names = [f.name for f in fields]
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
             len(files), fmt, len(splits), estimated,
             ", ".join(f"{f.name} ({f.type})" for f in extra) or "none")
    return InputPlan(fmt, tuple(files), tuple(splits), tuple(names), tuple(extra), tuple(renames),
                     estimated, cfg.url_col, cfg.caption_col, uid_col,
                     options=UrlListOptions(encoding=cfg.input_encoding))


@dataclass(frozen=True)
class UrlListOptions:
    """How a URL list is read: the text encoding of CSV/TSV/JSONL files."""

    encoding: str = "utf-8"


def _plan_parquet_files(files: list[str], where: str) -> tuple[list[pa.Field], dict, list[Split], int]:
    """(unified columns, the first readable file's column names, splits, rows) of Parquet files. Every footer
    is read: the columns' types are unified across files. A file whose footer cannot be read becomes one
    split that reads as a ``read/unreadable_source`` row (``--strict-input`` refuses the run instead)."""
    schemas, splits, estimated, first = [], [], 0, None
    for path in files:
        try:
            with fsspec.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                meta, sch = pf.metadata, pf.schema_arrow
        except DAMAGE_ERRORS as exc:
            log.warning("input: cannot read the footer of %s (%s: %s); it is recorded as read/unreadable_source",
                        path, type(exc).__name__, exc)
            splits.append(Split(path, "parquet"))
            continue
        if first is None:
            first = path
            first_names = set(sch.names)
        schemas.append(list(sch))
        estimated += meta.num_rows
        splits.extend(Split(path, "parquet", i) for i in range(meta.num_row_groups) if meta.row_group(i).num_rows)
    if first is None:
        raise ConfigError(f"cannot read parquet {files[0]!r}: no file of {where!r} has a readable footer")
    return unify_schemas(schemas, f"the files of {where!r}"), first_names, splits, estimated


def _plan_text_files(files: list[str], fmt: str, cfg: ReaderConfig):
    """(unified columns, first readable file, its column names, splits, rows estimate) of CSV/TSV/JSONL files.
    The first rows of up to PEEK files are read; a value later in a file that does not fit the planned type
    is written as null and counted (see ``pools.fit_value``)."""
    types: dict[str, list[pa.DataType]] = {}
    first = first_names = None
    peek_rows = peek_chars = 0
    for path in files[:PEEK]:
        try:
            peeked, n, chars = _peek_text(path, fmt, cfg.input_encoding)
        except DAMAGE_ERRORS as exc:
            log.warning("input: cannot read %s as %s (%s: %s); its damage is recorded at read time",
                        path, fmt, type(exc).__name__, exc)
            continue
        if first is None:
            first, first_names, peek_rows, peek_chars = path, list(peeked), n, chars
        for name, kinds in peeked.items():
            types.setdefault(name, []).extend(kinds)
    if first is None:
        raise ConfigError(f"cannot read {files[0]!r} as {fmt}: no file of {cfg.input!r} is readable")
    fields = unify_columns(types, f"the rows of {cfg.input!r}")
    sizes = [_file_size(p) for p in files]
    per_row = (peek_chars / peek_rows) if peek_rows and peek_chars > 0 else 100.0
    estimated = max(peek_rows, int(sum(sizes) / max(per_row, 1.0)))
    if peek_rows == 0 and len(files) == 1:
        estimated = 0
    return fields, first, first_names, [Split(p, fmt) for p in files], estimated


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


def _parquet_records(split: Split) -> Iterator[dict[str, Any] | ReadRejection]:
    """Rows of one Parquet split; a row group that cannot be read to its end (corrupt page) yields the rows
    before the damage and one ``read/unreadable_source`` row naming the row group (and how many rows are lost)."""
    done = total = 0
    try:
        with fsspec.open(split.path, "rb") as f:
            pf = pq.ParquetFile(f)
            groups = range(pf.metadata.num_row_groups) if split.row_group is None else [split.row_group]
            for g in groups:
                done, total = 0, pf.metadata.row_group(g).num_rows
                for batch in pf.iter_batches(batch_size=4096, row_groups=[g]):
                    rows = batch.to_pylist()
                    yield from rows
                    done += len(rows)
    except DAMAGE_ERRORS as exc:
        lost = f"rows {done}..{total - 1} ({total - done} row(s)) not read; " if total > done else ""
        what = f"{lost}{type(exc).__name__}: {exc}"
        if not total:
            what = f"footer unreadable ({type(exc).__name__}: {exc})"
        log.warning("input: %s is damaged: %s", split_where(split), what)
        yield damaged(split_where(split), what)


def _raw_records(split: Split, encoding: str) -> Iterator[dict[str, Any] | ReadRejection]:
    if split.fmt == "parquet":
        yield from _parquet_records(split)
        return
    csv.field_size_limit(1 << 30)
    rows = 0
    try:
        for _, rec in _text_records(split.path, split.fmt, encoding):
            rows += isinstance(rec, dict)
            yield rec
    except _Damaged as exc:
        what = f"unreadable from line {exc.line} on, after {rows} row(s) ({type(exc.cause).__name__}: {exc.cause})"
        log.warning("input: %s is damaged: %s", split.path, what)
        yield damaged(f"{split.path}:{exc.line}", what)


def to_row(raw: dict[str, Any], plan: InputPlan, types: dict[str, pa.DataType] | None = None) -> dict[str, Any]:
    """Input record -> pipeline row (uid, url, caption, carried columns fitted to their planned types)."""
    url = as_text(raw.get(plan.url_col))
    caption = as_text(raw.get(plan.caption_col))
    uid = as_text(raw.get(plan.uid_col)) if plan.uid_col else None
    row = {"uid": uid or records.make_uid(url, caption), "url": url.strip() if url else url, "caption": caption}
    row.update(carried_values(raw, plan.extra_renames, types or {f.name: f.type for f in plan.extra_fields}))
    return row


def read_url_split(split: Split, plan: InputPlan) -> Iterator[dict[str, Any] | ReadRejection]:
    """Rows of one URL-list split; unparseable lines come out as ``read/unreadable_source`` rejections,
    undecodable ones as ``read/bad_encoding``, damage as one ``read/unreadable_source`` row."""
    types = {f.name: f.type for f in plan.extra_fields}
    encoding = plan.options.encoding if isinstance(plan.options, UrlListOptions) else "utf-8"
    for raw in _raw_records(split, encoding):
        if isinstance(raw, ReadRejection):
            yield raw
        elif not plan.only_reasons or raw.get("reason") in plan.only_reasons:
            yield to_row(raw, plan, types)


register_reader(Reader("urls", ("urls",) + URL_LIST_FORMATS, detect=lambda cfg: "urls", plan=plan_url_list,
                       read=read_url_split, priority=1000))
