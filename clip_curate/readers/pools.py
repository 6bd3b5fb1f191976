"""What the pool readers share: listing (globs, brace notation, hidden files), format detection, the image
column, carried columns, typed options and the plan they build. Inputs that already hold images:

    detect_pool_format(input)  ─► "webdataset" | "img2dataset-parquet" | "hf-parquet" | "curated" | None

Each format is its own reader module: ``webdataset``, ``parquet_pools`` (img2dataset and Hugging Face
Parquet) and ``curated`` (a clip-curate output, re-filtered from stored embeddings).
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Iterable

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clip_curate import records
from clip_curate.fields import ConfigError
from clip_curate.readers.base import RESERVED, InputPlan, ReaderConfig, ReadRejection, as_text

log = logging.getLogger(__name__)

#: Parquet columns that may hold image bytes (binary) or a Hugging Face image struct.
IMAGE_COLS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes")
#: img2dataset's status of a sample it wrote.
SUCCESS = "success"
PEEK = 64  # files whose footers planning reads when there are more (the rest is extrapolated)
_CURATED_MARKERS = {"uid", "image", "embed_model", "clip_score"}
_DOC_EXTS = (".json", ".txt", ".md", ".yaml", ".yml")  # beside pool files (stats, dataset cards): ignored


# ---------------------------------------------------------------------------------------------
# Listing and detection

def fs_of(path: str):
    try:
        fs, p = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot open input {path!r}: {exc}") from None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    qualify = (lambda q: q) if protocol in ("file", "local") else fs.unstrip_protocol
    return fs, p, qualify


def _brace_expand(path: str) -> list[str] | None:
    """``shards-{00000..00099}.tar`` (the WebDataset notation) -> file names; None without braces."""
    if not re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", path):
        return None
    try:
        from braceexpand import braceexpand
    except ImportError:  # webdataset installs it
        raise ConfigError(f"--input {path!r}: brace patterns need the braceexpand package "
                          "(pip install braceexpand)") from None
    return list(braceexpand(path))


def list_files(path: str) -> list[tuple[str, int]]:
    """(qualified path, size) of the files named by a file, glob, brace pattern or directory.
    Hidden files and names starting with ``_`` (``_SUCCESS``, img2dataset's ``_tmp``) are skipped."""
    expanded = _brace_expand(path)
    if expanded is not None:
        out = []
        for p in expanded:
            fs, fp, qualify = fs_of(p)
            if not fs.exists(fp):
                raise ConfigError(f"input shard not found: {p!r} (from {path!r})")
            out.append((qualify(fp), int(fs.size(fp) or 0)))
        return out
    fs, fp, qualify = fs_of(path)
    if any(c in fp for c in "*?["):
        found = fs.glob(fp, detail=True)
    elif fs.isdir(fp):
        found = fs.find(fp, detail=True)
    elif fs.exists(fp):
        found = {fp: fs.info(fp)}
    else:
        raise ConfigError(f"input not found: {path!r}")
    out = []
    for p, info in sorted(found.items()):
        if info.get("type", "file") != "file":
            continue
        rel = p[len(fp):] if p.startswith(fp) else posixpath.basename(p)
        if any(part.startswith((".", "_")) for part in rel.split("/") if part):
            continue
        out.append((qualify(p), int(info.get("size") or 0)))
    return out


def curated_root(path: str) -> str | None:
    """The output directory when ``path`` is a clip-curate output (or its curated/ folder)."""
    if _brace_expand(path) is not None or any(c in path for c in "*?["):
        return None
    fs, fp, qualify = fs_of(path)
    try:
        if not fs.isdir(fp):
            return None
        base = fp.rstrip("/")
        if fs.isdir(base + "/curated") and fs.exists(base + "/stats.json"):
            return path.rstrip("/")
        if posixpath.basename(base) == "curated" and fs.exists(posixpath.dirname(base) + "/stats.json"):
            return path.rstrip("/")[: -len("/curated")]
    except OSError:
        return None
    return None


def parquet_schema(path: str) -> pa.Schema:
    with fsspec.open(path, "rb") as f:
        return pq.ParquetFile(f).schema_arrow


def is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and any(t.field(i).name == "bytes" and pa.types.is_binary(t.field(i).type)
                                         for i in range(t.num_fields))


def image_column(sch: pa.Schema, wanted: str | None) -> str | None:
    """The column holding image bytes: ``wanted`` when given, else a binary or image-struct column
    named like an image (``jpg``, ``image`` ...)."""
    if wanted:
        return wanted if wanted in sch.names else None
    for name in IMAGE_COLS:
        if name in sch.names:
            t = sch.field(name).type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t) or is_image_struct(t):
                return name
    for f in sch:
        if is_image_struct(f.type):
            return f.name
    return None


def detect_pool_format(path: str, cfg: ReaderConfig | None = None) -> str | None:
    """Pool format of ``path``, or None when it is a plain URL list (see the module docstring)."""
    if curated_root(path):
        return "curated"
    try:
        files = list_files(path)
    except ConfigError:
        return None  # the URL-list reader reports missing inputs with its own message
    names = [p for p, _ in files]
    if any(p.endswith(".tar") for p in names):
        return "webdataset"
    parquets = [p for p in names if p.endswith((".parquet", ".pq"))]
    others = [p for p in names if not p.endswith((".parquet", ".pq") + _DOC_EXTS)]
    if not parquets or others:
        return None
    try:
        sch = parquet_schema(parquets[0])
    except (OSError, pa.ArrowException):
        return None  # the URL-list reader says what is wrong with it
    col = image_column(sch, cfg.image_col if cfg else None)
    if col is None:
        return None
    if _CURATED_MARKERS <= set(sch.names):
        return "curated"
    if "status" in sch.names and not is_image_struct(sch.field(col).type):
        return "img2dataset-parquet"
    return "hf-parquet"


# ---------------------------------------------------------------------------------------------
# Carried-through columns

def carry(fields: Iterable[pa.Field], skip: set[str], keep_names: bool = False
           ) -> tuple[tuple[pa.Field, ...], tuple[tuple[str, str], ...]]:
    """(output fields, (input name, output name)) for carried columns; clashes -> ``input_<name>``."""
    extra, renames = [], []
    for f in fields:
        if f.name in skip or f.name.startswith("__"):
            continue
        out = f.name if keep_names or f.name not in RESERVED else f"input_{f.name}"
        extra.append(pa.field(out, column_type(f.type)))
        renames.append((f.name, out))
    return tuple(extra), tuple(renames)


_INT64 = (-(1 << 63), (1 << 63) - 1)


def _nested(t: pa.DataType) -> bool:
    return (pa.types.is_struct(t) or pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t)
            or pa.types.is_fixed_size_list(t))


def column_type(t: pa.DataType) -> pa.DataType:
    """The type a carried column is written as: nested values and nulls as (JSON) text, dictionary columns as
    their values' type."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.string() if _nested(t) or pa.types.is_null(t) else t


def json_type(v: Any) -> pa.DataType:
    """Arrow type of one JSON value: integers beyond int64 and nested values are carried as text."""
    if isinstance(v, bool):
        return pa.bool_()
    if isinstance(v, int):
        return pa.int64() if _INT64[0] <= v <= _INT64[1] else pa.string()
    if isinstance(v, float):
        return pa.float64()
    return pa.string()


def unify_types(types: Iterable[pa.DataType]) -> tuple[pa.DataType, bool]:
    """(the one type of a column whose files or rows hold ``types``, whether they disagreed so that the column
    falls back to string). Types merge by pyarrow's permissive promotion (int32 + int64 -> int64, int64 +
    double -> double); a merge that fails, or one that would squeeze uint64 into int64, gives string."""
    seen = list(dict.fromkeys(column_type(t) for t in types if not pa.types.is_null(t)))
    if not seen:
        return pa.string(), False
    if len(seen) == 1:
        return seen[0], False
    try:
        t = pa.unify_schemas([pa.schema([("v", t)]) for t in seen], promote_options="permissive").field("v").type
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.string(), True
    if pa.types.is_integer(t) and any(pa.types.is_uint64(x) for x in seen) and not pa.types.is_uint64(t):
        return pa.string(), True
    return column_type(t), False


def unify_columns(types_by_name: dict[str, Iterable[pa.DataType]], where: str) -> list[pa.Field]:
    """One field per column (in first-seen order) from the types each file or row gave it; a column whose
    types disagree is carried as string, and the log names it."""
    out = []
    for name, types in types_by_name.items():
        types = list(types)
        t, fell_back = unify_types(types)
        if fell_back:
            log.warning("input: column %r holds values of types %s across %s; carried as string (JSON text for "
                        "nested values, decimal text for integers beyond int64)", name,
                        ", ".join(sorted({str(column_type(x)) for x in types if not pa.types.is_null(x)})), where)
        out.append(pa.field(name, t))
    return out


def unify_schemas(schemas: Iterable[Iterable[pa.Field]], where: str) -> list[pa.Field]:
    """:func:`unify_columns` over the fields of several files' schemas."""
    types: dict[str, list[pa.DataType]] = {}
    for fields in schemas:
        for f in fields:
            types.setdefault(f.name, []).append(f.type)
    return unify_columns(types, where)


def _int_range(t: pa.DataType) -> tuple[int, int]:
    bits = t.bit_width
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if pa.types.is_signed_integer(t) else (0, (1 << bits) - 1)


_UNFIT = (None, False)


def fit_value(value: Any, t: pa.DataType) -> tuple[Any, bool]:
    """``(value fitted to the planned column type t, True)``, or ``(None, False)`` when it cannot be one
    (the value is then written as null and counted): the writer never fails on a value this returns.

    To string: text as is, nested values as JSON text, integers as decimal text, booleans as true/false.
    To integer: integers in range, integral floats, decimal text. To float: numbers, numeric text."""
    if value is None:
        return None, True
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if isinstance(value, str):
            return value, True
        if isinstance(value, (dict, list, tuple, bool)):
            return json.dumps(value, sort_keys=True, default=str), True
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace"), True
        return str(value), True
    try:
        if pa.types.is_boolean(t):
            return (value, True) if isinstance(value, bool) else _UNFIT
        if pa.types.is_integer(t):
            if isinstance(value, bool):
                return _UNFIT
            if isinstance(value, float):
                if not value.is_integer():
                    return _UNFIT
                value = int(value)
            elif isinstance(value, str):
                value = int(value.strip())
            elif not isinstance(value, int):
                return _UNFIT
            lo, hi = _int_range(t)
            return (value, True) if lo <= value <= hi else _UNFIT
        if pa.types.is_floating(t):
            if isinstance(value, bool):
                return _UNFIT
            if isinstance(value, (int, float, str)):
                return float(value), True
            return _UNFIT
        if _nested(t) and isinstance(value, (dict, list)):  # declared nested elsewhere: written as JSON text
            return json.dumps(value, sort_keys=True, default=str), True
        pa.scalar(value, type=t)
        return value, True
    except (TypeError, ValueError, OverflowError, pa.ArrowException):
        return _UNFIT


def carried_values(raw: dict[str, Any], renames: Iterable[tuple[str, str]], types: dict[str, pa.DataType]
                   ) -> dict[str, Any]:
    """The carried columns of one input record, each value fitted to its planned type; a value that does
    not fit is written as null and counted (counter ``read_unfit_values/<column>``)."""
    out = {}
    for src, dst in renames:
        value, ok = fit_value(raw.get(src), types[dst])
        if not ok:
            beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, f"read_unfit_values/{dst}").inc()
        out[dst] = value
    return out


def make_row(plan: InputPlan, opts: PoolOptions, meta: dict[str, Any], caption: str | None, where: str) -> dict[str, Any]:
    """uid / url / caption / carried columns of one pool sample. ``where`` names the sample when it
    has no URL (uid = hash(where, caption)), e.g. ``00012.tar/000120034``."""
    url = as_text(meta.get(plan.url_col))
    uid = as_text(meta.get(plan.uid_col)) if plan.uid_col else None
    row = {"uid": uid or records.make_uid(url if url else where, caption),
           "url": url.strip() if url else None, "caption": caption}
    row.update(carried_values(meta, plan.extra_renames, dict(opts.types)))
    return row


@dataclass(frozen=True)
class PoolOptions:
    """Settings every pool format's reading needs (``InputPlan.options``)."""

    root: str = ""                                      # the --input directory (paths in details are relative)
    types: tuple[tuple[str, pa.DataType], ...] = ()     # carried column -> declared type

    def type_of(self, name: str) -> pa.DataType:
        return dict(self.types)[name]


def pool_plan(cfg, fmt, files, splits, fields, extra, renames, estimated, uid_col, options_cls, preprocessed=False,
          **options) -> InputPlan:
    types = tuple((f.name, f.type) for f in extra)
    opts = options_cls(root=cfg.input.rstrip("/"), types=types, **options)
    return InputPlan(fmt, tuple(files), tuple(splits), tuple(fields), extra, renames, estimated,
                     cfg.url_col, cfg.caption_col, uid_col, has_images=True, preprocessed=preprocessed,
                     options=opts)


def rel_path(path: str, opts: PoolOptions) -> str:
    root = opts.root
    return path[len(root):].lstrip("/") if root and path.startswith(root) else posixpath.basename(path)


def reject_read(row: dict[str, Any], reason: str, detail: str) -> ReadRejection:
    return ReadRejection(row, reason, detail)
