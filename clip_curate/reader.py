"""Read URL lists (parquet / csv / tsv / jsonl, optionally .gz) from any fsspec path.

``plan_input`` inspects the input at pipeline-construction time (files, format, columns, row
estimate) so user mistakes fail fast with one line; ``ReadUrlList`` reads the planned splits
(parquet row groups, whole text files) in parallel and reshuffles so downloads spread over workers.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clip_curate import records, schema
from clip_curate.options import ConfigError, opt

log = logging.getLogger(__name__)

FORMATS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".tsv": "tsv",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")
_GLOB_CHARS = set("*?[")
# Inputs that already hold images (never downloaded): see clip_curate.pools.
POOL_FORMATS = ("webdataset", "img2dataset-parquet", "hf-parquet", "curated")
# Names produced by the pipeline itself; input columns with these names are renamed input_<name>.
RESERVED = set(schema.field_names("curated_row")) | set(schema.field_names("rejected_row")) | {
    "image_bytes", "embed_model"}


@dataclass(frozen=True)
class ReaderConfig:
    """Where the rows come from."""

    input: str | None = opt(None, "URL list: a file, glob or directory on any fsspec path (gs://, s3://, ...)")
    input_format: str = opt("auto", "input format: auto (detected from the files) or one of "
                                    + "|".join(("parquet", "csv", "tsv", "jsonl") + POOL_FORMATS),
                            choices=("auto", "urls", "parquet", "csv", "tsv", "jsonl") + POOL_FORMATS)
    image_col: str | None = opt(None, "Parquet column holding image bytes (img2dataset: jpg; Hugging Face: "
                                      "image struct<bytes, path>); auto-detected when unset")
    include_rejected: bool = opt(False, "with a clip-curate output as input: also re-curate its rejected rows "
                                        "that still carry embeddings")
    url_col: str = opt("url", "input column holding the image URL")
    caption_col: str = opt("caption", "input column holding the caption")
    uid_col: str = opt("uid", "input column with a stable id; when absent uid = sha256(url, caption)")
    retry_from: str | None = opt(None, "re-run the rows of a previous output OUT rejected for transient "
                                       "reasons (timeout, http_5xx, connection_error, dns_error, host_unavailable)")

    def __post_init__(self):
        if self.input and self.retry_from:
            raise ConfigError("--input and --retry-from are exclusive: --retry-from OUT reads OUT/rejected itself")
        if not self.input and not self.retry_from:
            raise ConfigError("no input: pass --input URLS (or --retry-from OUT)")
        for name in ("url_col", "caption_col"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} may not be empty")


@dataclass(frozen=True)
class Split:
    """One unit of reading work: a whole file, or one parquet row group."""

    path: str
    fmt: str
    row_group: int | None = None


@dataclass(frozen=True)
class InputPlan:
    """What ``plan_input`` found: files, format, carried-through columns, and the work splits."""

    fmt: str
    files: tuple[str, ...]
    splits: tuple[Split, ...]
    columns: tuple[str, ...]
    extra_fields: tuple[pa.Field, ...]   # output names (after renaming clashes)
    extra_renames: tuple[tuple[str, str], ...]  # (input name, output name)
    estimated_rows: int
    url_col: str
    caption_col: str
    uid_col: str | None
    only_reasons: tuple[str, ...] = ()   # retry-from: keep rows rejected for these reasons
    has_images: bool = False             # rows carry image_bytes (pools): no download stage
    preprocessed: bool = False           # rows carry the processed image (curated input): no image stage
    options: tuple[tuple[str, Any], ...] = ()  # format-specific settings (pools)
    part: tuple[int, int] | None = None  # (k, n): read only rows whose uid hash is k mod n (--chunk-rows)


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


def plan_input(cfg: ReaderConfig) -> InputPlan:
    """Inspect the input: raise ConfigError (one line) for every user mistake."""
    if cfg.retry_from:
        return plan_retry(cfg)
    if cfg.input_format in POOL_FORMATS or cfg.input_format == "auto":
        from clip_curate import pools
        fmt = cfg.input_format if cfg.input_format != "auto" else pools.detect_pool_format(cfg.input, cfg)
        if fmt:
            plan = pools.plan_pool(cfg, fmt)
            log.info("input: detected %s (%d shard(s), ~%d rows)", fmt, len(plan.splits), plan.estimated_rows)
            return plan
    files = expand_paths(cfg.input)
    fmts = {detect_format(p) if cfg.input_format in ("auto", "urls") else cfg.input_format for p in files}
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


def _raw_records(split: Split) -> Iterator[dict[str, Any]]:
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
                        obj = {"__unreadable__": f"{split.path}:{lineno}: not JSON"}
                    yield obj if isinstance(obj, dict) else {"__unreadable__": f"{split.path}:{lineno}: not an object"}


def as_text(value: Any) -> str | None:
    """A cell as text (None stays None): ids and captions may be stored as numbers."""
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def to_row(raw: dict[str, Any], plan: InputPlan) -> dict[str, Any]:
    """Input record -> pipeline row (uid, url, caption, carried columns)."""
    url = as_text(raw.get(plan.url_col))
    caption = as_text(raw.get(plan.caption_col))
    uid = as_text(raw.get(plan.uid_col)) if plan.uid_col else None
    row = {"uid": uid or records.make_uid(url, caption), "url": url.strip() if url else url, "caption": caption}
    for src, dst in plan.extra_renames:
        row[dst] = raw.get(src)
    return row


def in_part(uid: str, part: tuple[int, int]) -> bool:
    """Whether a row belongs to pass ``part = (k, n)`` of a chunked run (every row is in exactly one)."""
    from clip_curate.dedup_core import uid_hash
    return uid_hash(uid) % part[1] == part[0]


def read_split(split: Split, plan: InputPlan) -> Iterator[dict[str, Any]]:
    """Rows of one split (of this pass, ``plan.part``). Unparseable lines come out as rows flagged for
    rejection (``__unreadable__``)."""
    rows = _split_rows(split, plan)
    if plan.part is not None:
        rows = (row for row in rows if in_part(row["uid"], plan.part))
    yield from rows


def _split_rows(split: Split, plan: InputPlan) -> Iterator[dict[str, Any]]:
    if split.fmt in POOL_FORMATS:
        from clip_curate import pools
        yield from pools.read_pool_split(split, plan)
        return
    for raw in _raw_records(split):
        if "__unreadable__" in raw:
            yield {"uid": records.make_uid(raw["__unreadable__"], None), "url": None, "caption": None,
                   "__unreadable__": raw["__unreadable__"]}
            continue
        if plan.only_reasons and raw.get("reason") not in plan.only_reasons:
            continue
        yield to_row(raw, plan)


class _ValidateRow(beam.DoFn):
    """Reject rows without a usable URL; count what was read."""

    def __init__(self):
        self._read = beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, "read_rows")

    def process(self, row):
        self._read.inc()
        if "__unreadable__" in row:
            detail = row.pop("__unreadable__")
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, records.reject(row, "read", "unreadable_source", detail))
        elif "__reject__" in row:  # (reason, detail) decided by a pool source, e.g. source_failed
            reason, detail = row.pop("__reject__")
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, records.reject(row, "read", reason, detail))
        elif (row.get("image_bytes") is not None or row.get("image") is not None
              or row.get("image_embedding") is not None):
            yield row  # pool rows hold their image (or, re-filtered, its embedding); a URL is optional
        elif not row.get("url"):
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, records.reject(row, "read", "missing_url", "empty url"))
        else:
            yield row


class ReadUrlList(beam.PTransform):
    """Read the planned input; returns ``(rows, rejected)``. Rows are reshuffled across workers."""

    def __init__(self, plan: InputPlan, reshuffle: bool = True):
        super().__init__()
        self._plan = plan
        self._reshuffle = reshuffle

    def expand(self, pbegin):
        plan = self._plan
        rows = (
            pbegin
            | "Splits" >> beam.Create([dataclasses.astuple(s) for s in plan.splits])
            | "SpreadSplits" >> beam.Reshuffle()
            | "ReadSplit" >> beam.FlatMap(lambda s, p: read_split(Split(*s), p), plan)
        )
        if self._reshuffle:
            rows = rows | "SpreadRows" >> beam.Reshuffle()
        out = rows | "Validate" >> beam.ParDo(_ValidateRow()).with_outputs(records.REJECTED_TAG, main="rows")
        return out.rows, out[records.REJECTED_TAG]
