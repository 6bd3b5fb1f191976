"""Inputs that already hold images: img2dataset / WebDataset tars, img2dataset Parquet, Hugging Face
image Parquet, and clip-curate's own output (re-filtering from stored embeddings).

    detect_pool_format(input)  ─► "webdataset" | "img2dataset-parquet" | "hf-parquet" | "curated" | None
    plan_pool(cfg, fmt)        ─► InputPlan: one split per tar shard / Parquet row group (Beam spreads them)
    read_pool_split(split)     ─► rows: uid, url, caption, image_bytes (or image), carried columns

Formats (what ``--input-format auto`` looks for, in this order):

``curated``              a clip-curate output directory (``stats.json`` + ``curated/*.parquet``), or its
                         ``curated/`` folder; rows keep their processed ``image`` and embeddings, so the
                         download and image stages are skipped and the embed stage reuses the embeddings
                         made by the same model. ``--include-rejected`` also reads ``rejected/`` rows that
                         carry embeddings (except safety rejections: the image classifier would need the
                         image, which rejected tables do not keep).
``webdataset``           ``*.tar`` shards, samples grouped by key (``{key}.jpg`` / ``.txt`` / ``.json``, the
                         img2dataset and open_clip layout). img2dataset writes ``{shard}.parquet`` beside
                         each tar with every sample it tried, failures included: those become
                         ``read/source_failed`` rejections, and samples it lists as written but the tar
                         lacks become ``read/corrupt_shard`` rejections.
``img2dataset-parquet``  Parquet with a binary image column (``jpg``) and img2dataset's ``status``
``hf-parquet``           Parquet with an image column: ``struct<bytes: binary, path: string>`` (Hugging
                         Face ``Image`` feature) or plain binary; ``--image-col`` names it

A damaged tar never stops the run and never loses rows silently: a sample whose members can be named
(from the tar, or from img2dataset's metadata Parquet) is rejected ``read/corrupt_shard`` with the
shard and byte offset in ``detail``; a stretch of unreadable bytes whose samples cannot be named (no
metadata Parquet) becomes one ``read/corrupt_shard`` row for that stretch.
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_curate import records, schema
from clip_curate.options import ConfigError
from clip_curate.reader import RESERVED, InputPlan, ReaderConfig, Split, as_text

log = logging.getLogger(__name__)

#: Tar member extensions taken as the image of a sample, in priority order.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "img", "image")
#: Parquet columns that may hold image bytes (binary) or a Hugging Face image struct.
IMAGE_COLS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes")
#: img2dataset's status of a sample it wrote.
SUCCESS = "success"
#: Rejected rows of a clip-curate output that a re-filter may take back (they carry embeddings and
#: every decision after the embedding can be made again from stored fields).
REFILTER_STAGES = ("clip", "dedup")
_BLOCK = 512
_PEEK = 64  # files whose footers planning reads when there are more (the rest is extrapolated)
_CORRUPT_HEADER = "unreadable bytes (corrupt tar header)"
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")   # webdataset's key / extension split
_CURATED_MARKERS = {"uid", "image", "embed_model", "clip_score"}
_DOC_EXTS = (".json", ".txt", ".md", ".yaml", ".yml")  # beside pool files (stats, dataset cards): ignored


# ---------------------------------------------------------------------------------------------
# Listing and detection

def _fs(path: str):
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


def _list(path: str) -> list[tuple[str, int]]:
    """(qualified path, size) of the files named by a file, glob, brace pattern or directory.
    Hidden files and names starting with ``_`` (``_SUCCESS``, img2dataset's ``_tmp``) are skipped."""
    expanded = _brace_expand(path)
    if expanded is not None:
        out = []
        for p in expanded:
            fs, fp, qualify = _fs(p)
            if not fs.exists(fp):
                raise ConfigError(f"input shard not found: {p!r} (from {path!r})")
            out.append((qualify(fp), int(fs.size(fp) or 0)))
        return out
    fs, fp, qualify = _fs(path)
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


def _curated_root(path: str) -> str | None:
    """The output directory when ``path`` is a clip-curate output (or its curated/ folder)."""
    if _brace_expand(path) is not None or any(c in path for c in "*?["):
        return None
    fs, fp, qualify = _fs(path)
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


def _parquet_schema(path: str) -> pa.Schema:
    with fsspec.open(path, "rb") as f:
        return pq.ParquetFile(f).schema_arrow


def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and any(t.field(i).name == "bytes" and pa.types.is_binary(t.field(i).type)
                                         for i in range(t.num_fields))


def _image_column(sch: pa.Schema, wanted: str | None) -> str | None:
    """The column holding image bytes: ``wanted`` when given, else a binary or image-struct column
    named like an image (``jpg``, ``image`` ...)."""
    if wanted:
        return wanted if wanted in sch.names else None
    for name in IMAGE_COLS:
        if name in sch.names:
            t = sch.field(name).type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_image_struct(t):
                return name
    for f in sch:
        if _is_image_struct(f.type):
            return f.name
    return None


def detect_pool_format(path: str, cfg: ReaderConfig | None = None) -> str | None:
    """Pool format of ``path``, or None when it is a plain URL list (see the module docstring)."""
    if _curated_root(path):
        return "curated"
    try:
        files = _list(path)
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
        sch = _parquet_schema(parquets[0])
    except (OSError, pa.ArrowException):
        return None  # the URL-list reader says what is wrong with it
    col = _image_column(sch, cfg.image_col if cfg else None)
    if col is None:
        return None
    if _CURATED_MARKERS <= set(sch.names):
        return "curated"
    if "status" in sch.names and not _is_image_struct(sch.field(col).type):
        return "img2dataset-parquet"
    return "hf-parquet"


# ---------------------------------------------------------------------------------------------
# Carried-through columns

def _carry(fields: Iterable[pa.Field], skip: set[str], keep_names: bool = False
           ) -> tuple[tuple[pa.Field, ...], tuple[tuple[str, str], ...]]:
    """(output fields, (input name, output name)) for carried columns; clashes -> ``input_<name>``."""
    extra, renames = [], []
    for f in fields:
        if f.name in skip or f.name.startswith("__"):
            continue
        out = f.name if keep_names or f.name not in RESERVED else f"input_{f.name}"
        t = f.type
        if pa.types.is_struct(t) or pa.types.is_list(t) or pa.types.is_map(t) or pa.types.is_null(t):
            t = pa.string()  # nested values are carried as JSON text
        extra.append(pa.field(out, t))
        renames.append((f.name, out))
    return tuple(extra), tuple(renames)


def _json_type(v: Any) -> pa.DataType:
    if isinstance(v, bool):
        return pa.bool_()
    if isinstance(v, int):
        return pa.int64()
    if isinstance(v, float):
        return pa.float64()
    return pa.string()


def _coerce(value: Any, t: pa.DataType) -> Any:
    """A carried value fitted to its declared column type (None when it cannot be)."""
    if value is None:
        return None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if isinstance(value, str):
            return value
        if isinstance(value, (dict, list)):
            return json.dumps(value, sort_keys=True, default=str)
        return str(value)
    try:
        if pa.types.is_boolean(t):
            return bool(value)
        if pa.types.is_integer(t):
            return int(value)
        if pa.types.is_floating(t):
            return float(value)
    except (TypeError, ValueError):
        return None
    if isinstance(value, (dict, list)):  # a nested column declared as string above
        return json.dumps(value, sort_keys=True, default=str)
    return value


def _make_row(plan: InputPlan, opts: dict, meta: dict[str, Any], caption: str | None, where: str) -> dict[str, Any]:
    """uid / url / caption / carried columns of one pool sample. ``where`` names the sample when it
    has no URL (uid = hash(where, caption)), e.g. ``00012.tar/000120034``."""
    url = as_text(meta.get(plan.url_col))
    uid = as_text(meta.get(plan.uid_col)) if plan.uid_col else None
    row = {"uid": uid or records.make_uid(url if url else where, caption),
           "url": url.strip() if url else None, "caption": caption}
    types = opts["types"]
    for src, dst in plan.extra_renames:
        row[dst] = _coerce(meta.get(src), types[dst])
    return row


# ---------------------------------------------------------------------------------------------
# Planning

def plan_pool(cfg: ReaderConfig, fmt: str) -> InputPlan:
    """Inspect the pool (listing, schemas, one sample) and return the read plan; ConfigError (one
    line) for every user mistake."""
    if fmt == "curated":
        return _plan_curated(cfg)
    files = _list(cfg.input)
    if not files:
        raise ConfigError(f"input {cfg.input!r} holds no files")
    if fmt == "webdataset":
        return _plan_webdataset(cfg, files)
    return _plan_parquet(cfg, fmt, files)


def _plan(cfg, fmt, files, splits, fields, extra, renames, estimated, uid_col, options,
          preprocessed=False) -> InputPlan:
    types = {f.name: f.type for f in extra}
    opts = dict(options, types=types, root=cfg.input.rstrip("/"))
    return InputPlan(fmt, tuple(files), tuple(splits), tuple(fields), extra, renames, estimated,
                     cfg.url_col, cfg.caption_col, uid_col, has_images=True, preprocessed=preprocessed,
                     options=tuple(sorted(opts.items())))


def _plan_parquet(cfg: ReaderConfig, fmt: str, files: list[tuple[str, int]]) -> InputPlan:
    paths = [p for p, _ in files if p.endswith((".parquet", ".pq"))]
    if not paths:
        raise ConfigError(f"--input-format {fmt}: no .parquet files in {cfg.input!r}")
    try:
        sch = _parquet_schema(paths[0])
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"cannot read parquet {paths[0]!r}: {exc}") from None
    col = _image_column(sch, cfg.image_col)
    if col is None:
        binaries = [f.name for f in sch if pa.types.is_binary(f.type) or _is_image_struct(f.type)]
        if cfg.image_col:
            raise ConfigError(f"--image-col {cfg.image_col!r}: no such column in {paths[0]} "
                              f"(columns: {', '.join(sch.names)})")
        raise ConfigError(f"no image column found in {paths[0]} (binary or struct<bytes, path> columns: "
                          f"{', '.join(binaries) or 'none'}); pass --image-col NAME")
    t = sch.field(col).type
    if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_image_struct(t)):
        raise ConfigError(f"--image-col {col!r} in {paths[0]} is {t}, not binary image bytes or "
                          "struct<bytes: binary, path: string>")
    if cfg.caption_col not in sch.names:
        texts = [f.name for f in sch if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        raise ConfigError(f"caption column {cfg.caption_col!r} not found in {paths[0]} (text columns: "
                          f"{', '.join(texts) or 'none'}); pass --caption-col NAME")
    status = "status" if fmt == "img2dataset-parquet" and "status" in sch.names else None
    uid_col = cfg.uid_col if cfg.uid_col in sch.names else None
    skip = {cfg.url_col, cfg.caption_col, col} | ({uid_col} if uid_col else set())
    if fmt == "img2dataset-parquet" and "txt" in sch.names and cfg.caption_col != "txt":
        skip.add("txt")  # img2dataset's copy of the caption
    extra, renames = _carry(sch, skip)
    splits, estimated = [], 0
    many = len(paths) > _PEEK  # then one split per file, and no footer read per file at planning time
    for path in paths[:_PEEK] if many else paths:
        try:
            with fsspec.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                meta, other = pf.metadata, pf.schema_arrow
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(f"cannot read parquet {path!r}: {exc}") from None
        if col not in other.names:
            raise ConfigError(f"{path}: no image column {col!r} (the first file has it); "
                              "point --input at files of one layout")
        estimated += meta.num_rows
        if not many:
            splits.extend(Split(path, fmt, i) for i in range(meta.num_row_groups) if meta.row_group(i).num_rows)
    if many:
        estimated = int(estimated / _PEEK * len(paths))
        splits = [Split(p, fmt) for p in paths]
    if estimated == 0:
        raise ConfigError(f"input {cfg.input!r} is empty (no rows)")
    log.info("input: %s pool: image column %r (%s), caption %r, %d file(s), carried columns: %s",
             fmt, col, "struct" if _is_image_struct(t) else "binary", cfg.caption_col, len(paths),
             ", ".join(n for _, n in renames) or "none")
    return _plan(cfg, fmt, paths, splits, sch.names, extra, renames, estimated, uid_col,
                 {"image_col": col, "struct": _is_image_struct(t), "status_col": status})


def _sample_meta_fields(tar_path: str, limit: int = 64) -> tuple[list[pa.Field], int, int]:
    """(json fields, samples seen, bytes they span) from the first samples of a shard."""
    fields: dict[str, pa.DataType] = {}
    n = span = 0
    try:
        for sample in _iter_tar(tar_path, report=lambda *a: None):
            n += 1
            span = sample["end"]
            meta = sample["meta"] or {}
            for k, v in meta.items():
                if k not in fields or fields[k] == pa.null():
                    fields[k] = _json_type(v) if v is not None else pa.null()
            if n >= limit:
                break
    except (OSError, tarfile.TarError):
        pass
    return [pa.field(k, t if t != pa.null() else pa.string()) for k, t in fields.items()], n, span


def _plan_webdataset(cfg: ReaderConfig, files: list[tuple[str, int]]) -> InputPlan:
    tars = [(p, s) for p, s in files if p.endswith(".tar")]
    if not tars:
        raise ConfigError(f"--input-format webdataset: no .tar shards in {cfg.input!r}")
    names = {p for p, _ in files}
    meta_of = {p: p[:-4] + ".parquet" for p, _ in tars if p[:-4] + ".parquet" in names}
    if meta_of:
        first_meta = meta_of[tars[0][0]] if tars[0][0] in meta_of else next(iter(meta_of.values()))
        try:
            sch = _parquet_schema(first_meta)
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(f"cannot read img2dataset metadata {first_meta!r}: {exc}") from None
        fields = list(sch)
    else:
        fields, _, _ = _sample_meta_fields(tars[0][0])
    names_ = [f.name for f in fields]
    uid_col = cfg.uid_col if cfg.uid_col in names_ else None
    skip = {cfg.url_col, cfg.caption_col} | ({uid_col} if uid_col else set())
    if "key" not in names_:
        fields.append(pa.field("key", pa.string()))
    extra, renames = _carry(fields, skip)
    # Row estimate (it only sizes output shards): metadata row counts of up to _PEEK shards, scaled.
    estimated = 0
    with_meta = [p for p, _ in tars if p in meta_of]
    counts = []
    for p in with_meta[:_PEEK]:
        try:
            with fsspec.open(meta_of[p], "rb") as f:
                counts.append(pq.ParquetFile(f).metadata.num_rows)
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(f"cannot read img2dataset metadata {meta_of[p]!r}: {exc}") from None
    if counts:
        estimated = sum(counts) if len(with_meta) <= _PEEK else int(sum(counts) / len(counts) * len(with_meta))
    rest = [(p, s) for p, s in tars if p not in meta_of]
    if rest:
        _, n, span = _sample_meta_fields(rest[0][0])
        per = span / n if n else 0
        estimated += int(sum(s for _, s in rest) / per) if per else 0
    suspect = [p for p, s in tars if s % _BLOCK]
    if suspect:
        log.warning("input: %d shard(s) are not a whole number of 512-byte tar blocks (truncated?), e.g. %s; "
                    "their unreadable samples are recorded as read/corrupt_shard", len(suspect), suspect[0])
    log.info("input: webdataset pool: %d shard(s), %d with img2dataset metadata parquet (failed downloads "
             "become read/source_failed rejections), carried columns: %s", len(tars), len(meta_of),
             ", ".join(n for _, n in renames) or "none")
    return _plan(cfg, "webdataset", [p for p, _ in tars], [Split(p, "webdataset") for p, _ in tars], names_,
                 extra, renames, max(estimated, len(tars)), uid_col,
                 {"metadata": tuple(sorted(meta_of.items())), "image_ext": cfg.image_col})


def _output_parts(directory: str) -> list[str]:
    """The finished Parquet shards of an output table (not Beam temp folders)."""
    fs, d, qualify = _fs(directory)
    if not fs.isdir(d):
        return []
    return sorted(qualify(p) for p in fs.glob(d.rstrip("/") + "/*.parquet"))


def _plan_curated(cfg: ReaderConfig) -> InputPlan:
    root = _curated_root(cfg.input)
    if root is None:
        raise ConfigError(f"--input-format curated: {cfg.input!r} is not a clip-curate output "
                          "(a directory with stats.json and curated/*.parquet)")
    curated = _output_parts(root + "/curated")
    rejected = _output_parts(root + "/rejected") if cfg.include_rejected else []
    if not curated and not rejected:
        raise ConfigError(f"{root}: no curated/*.parquet to re-filter")
    declared = set(schema.field_names("curated_row"))
    rejected_only = set(schema.field_names("rejected_row")) - declared  # stage, reason, detail
    splits, estimated, sch, models = [], 0, None, set()
    taken_back = skipped = dedup_back = 0
    for path in curated + rejected:
        is_rejected = path in rejected
        try:
            with fsspec.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                meta = pf.metadata
                if not is_rejected:
                    sch = sch or pf.schema_arrow
                if "embed_model" in pf.schema_arrow.names and meta.num_row_groups:
                    models.update(v for v in pf.read_row_group(0, columns=["embed_model"]).column(0).to_pylist()
                                  if v)
                if is_rejected:
                    if "image_embedding" not in pf.schema_arrow.names:
                        skipped += meta.num_rows
                        continue
                    t = pf.read(columns=["stage", "image_embedding"])
                    ok = pc.and_(pc.is_in(t.column("stage"), pa.array(REFILTER_STAGES)),
                                         pc.is_valid(t.column("image_embedding")))
                    n_ok = pc.sum(ok).as_py() or 0
                    taken_back += n_ok
                    dedup_back += pc.sum(pc.and_(ok, pc.equal(t.column("stage"), "dedup"))).as_py() or 0
                    skipped += meta.num_rows - n_ok
                    estimated += n_ok
                else:
                    estimated += meta.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(f"cannot read {path!r}: {exc}") from None
        splits.extend(Split(path, "curated", i) for i in range(meta.num_row_groups) if meta.row_group(i).num_rows)
    if sch is None:
        with fsspec.open(rejected[0], "rb") as f:
            sch = pq.ParquetFile(f).schema_arrow
    extra, renames = _carry(sch, declared | rejected_only, keep_names=True)
    has_emb = "image_embedding" in sch.names
    if cfg.include_rejected:
        log.info("input: --include-rejected: %d rejected row(s) with embeddings (stages %s) are re-curated; "
                 "%d other rejected row(s) stay in %s/rejected", taken_back, "/".join(REFILTER_STAGES), skipped,
                 root)
    log.info("input: clip-curate output %s: %d curated row(s)%s; stored embeddings: %s (model %s); "
             "download and image stages are skipped", root, estimated - taken_back,
             f" + {taken_back} rejected" if taken_back else "", "yes" if has_emb else "no",
             ", ".join(sorted(models)) or "none recorded")
    if estimated == 0:
        raise ConfigError(f"{root}: nothing to re-filter (no curated rows"
                          + (", no rejected rows with embeddings)" if cfg.include_rejected else ")"))
    return _plan(cfg, "curated", curated + rejected, splits, sch.names, extra, renames, estimated, "uid",
                 {"rejected": tuple(rejected), "embed_models": tuple(sorted(models)) if has_emb else (),
                  "out_root": root,
                  "dedup_rows_taken_back": dedup_back},
                 preprocessed=True)


# ---------------------------------------------------------------------------------------------
# Reading

def read_pool_split(split: Split, plan: InputPlan) -> Iterator[dict[str, Any]]:
    """Rows of one split (a tar shard or a Parquet row group)."""
    opts = dict(plan.options)
    if split.fmt == "webdataset":
        yield from _read_tar_split(split.path, plan, opts)
    elif split.fmt == "curated":
        yield from _read_curated(split, plan, opts)
    else:
        yield from _read_parquet_pool(split, plan, opts)


def _rel(path: str, opts: dict) -> str:
    root = opts.get("root") or ""
    return path[len(root):].lstrip("/") if root and path.startswith(root) else posixpath.basename(path)


def _reject(row: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    row["__reject__"] = (reason, detail)
    return row


def _read_parquet_pool(split: Split, plan: InputPlan, opts: dict) -> Iterator[dict[str, Any]]:
    col, struct, status_col = opts["image_col"], opts["struct"], opts.get("status_col")
    rel = _rel(split.path, opts)
    with fsspec.open(split.path, "rb") as f:
        pf = pq.ParquetFile(f)
        groups = list(range(pf.metadata.num_row_groups)) if split.row_group is None else [split.row_group]
        offset = sum(pf.metadata.row_group(i).num_rows for i in range(groups[0])) if groups else 0
        for batch in pf.iter_batches(batch_size=256, row_groups=groups):
            for i, raw in enumerate(batch.to_pylist()):
                index = offset + i
                image = raw.get(col)
                path = None
                if struct and isinstance(image, dict):
                    path, image = image.get("path"), image.get("bytes")
                caption = as_text(raw.get(plan.caption_col))
                row = _make_row(plan, opts, raw, caption, f"{rel}#{index}")
                if status_col and raw.get(status_col) != SUCCESS:
                    yield _reject(row, "source_failed", as_text(raw.get("error_message")) or
                                  f"img2dataset status {raw.get(status_col)!r}")
                elif not image:
                    yield _reject(row, "missing_image", f"{rel} row {index}: column {col!r} holds no image bytes"
                                  + (f" (path {path!r}; images referenced by path are not read)" if path else ""))
                else:
                    row["image_bytes"] = bytes(image)
                    yield row
            offset += batch.num_rows


def _read_curated(split: Split, plan: InputPlan, opts: dict) -> Iterator[dict[str, Any]]:
    from_rejected = split.path in opts.get("rejected", ())
    with fsspec.open(split.path, "rb") as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=256, row_groups=[split.row_group]):
            for raw in batch.to_pylist():
                if from_rejected:
                    if raw.get("stage") not in REFILTER_STAGES or raw.get("image_embedding") is None:
                        continue
                    for k in ("stage", "reason", "detail"):
                        raw.pop(k, None)
                for k in ("image_embedding", "text_embedding"):
                    if raw.get(k) is not None:
                        raw[k] = np.asarray(raw[k], dtype=np.float32)
                yield raw


# ---------------------------------------------------------------------------------------------
# Tar shards

def _split_name(name: str) -> tuple[str, str] | None:
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def _zeros(f, start: int, end: int) -> bool:
    """Whether bytes [start, end) of ``f`` are all zero (tar padding / end-of-archive blocks)."""
    f.seek(start)
    left = end - start
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        left -= len(chunk)
    return True


def _iter_tar(path: str, report) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard: ``{"key", "files": {ext: bytes}, "meta", "start", "end", "damaged"}``.

    Members are read with tarfile (``ignore_zeros`` so that reading resumes after a damaged header);
    every stretch of bytes that is neither a member nor zero padding is passed to
    ``report(start, end, why)``, and a sample touched by one is marked ``damaged``.
    """
    with fsspec.open(path, "rb") as f:
        size = f.size if hasattr(f, "size") and f.size is not None else None
        if size is None:
            f.seek(0, 2)
            size = f.tell()
            f.seek(0)
        try:
            tf = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
        except tarfile.TarError as exc:
            report(0, size, f"not a readable tar ({exc})")
            return
        expected = 0     # where the next header should start
        current = None
        pending_gap = False
        while True:
            try:
                m = tf.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                if expected >= size:
                    report(size, size, "the shard ends inside a member (truncated)")
                else:
                    report(expected, size, f"{type(exc).__name__}: {exc}")
                pending_gap = True
                if current is not None:
                    current["damaged"] = True
                m = None
            if m is None:
                break
            tf.members.clear()  # no index: a shard may hold many members
            if m.offset > expected and not _zeros(f, expected, m.offset):
                report(expected, m.offset, _CORRUPT_HEADER)
                pending_gap = True   # the lost members belong to the sample before or the one after
                if current is not None:
                    current["damaged"] = True
            data_end = m.offset_data + -(-m.size // _BLOCK) * _BLOCK
            expected = data_end
            if not m.isfile():
                continue
            parts = _split_name(m.name)
            if parts is None:
                continue
            key, ext = parts
            if current is None or current["key"] != key:
                if current is not None:
                    yield current
                current = {"key": key, "files": {}, "meta": None, "start": m.offset, "end": data_end,
                           "damaged": pending_gap}
            pending_gap = False
            current["end"] = data_end
            try:
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError("unexpected end of data")
            except (tarfile.TarError, OSError, EOFError) as exc:
                current["damaged"] = True
                report(m.offset, min(data_end, size), f"member {m.name}: {type(exc).__name__}: {exc}")
                continue
            current["files"][ext] = data
            if ext == "json":
                try:
                    meta = json.loads(data)
                    current["meta"] = meta if isinstance(meta, dict) else None
                except (ValueError, UnicodeDecodeError):
                    current["meta"] = None
        if current is not None:
            if pending_gap:
                current["damaged"] = True
            yield current
        if expected < size and not _zeros(f, expected, size):
            report(expected, size, "unreadable bytes after the last member" if expected else
                   "not a readable tar (no valid member header)")
        elif expected >= size and size and not pending_gap:
            report(size, size, "the shard ends without tar's end-of-archive blocks (truncated?)")


def _read_tar_split(path: str, plan: InputPlan, opts: dict) -> Iterator[dict[str, Any]]:
    rel = _rel(path, opts)
    metadata = dict(opts.get("metadata") or ())
    expected: dict[str, dict] = {}
    if path in metadata:
        try:
            with fsspec.open(metadata[path], "rb") as f:
                for raw in pq.read_table(f).to_pylist():
                    expected[str(raw.get("key"))] = raw
        except (OSError, pa.ArrowException) as exc:
            raise OSError(f"cannot read img2dataset metadata {metadata[path]}: {exc}") from exc
    # Failures img2dataset recorded: never in the tar.
    for key, raw in list(expected.items()):
        if raw.get("status") != SUCCESS:
            expected.pop(key)
            row = _make_row(plan, opts, raw, as_text(raw.get(plan.caption_col)), f"{rel}/{key}")
            yield _reject(row, "source_failed", as_text(raw.get("error_message")) or f"img2dataset status "
                                                                                     f"{raw.get('status')!r}")
    regions: list[tuple[int, int, str]] = []
    want = opts.get("image_ext")
    usual: set[str] | None = None  # members of an intact sample of this shard
    explained: set[int] = set()    # regions whose lost members belong to a sample rejected by name
    for sample in _iter_tar(path, lambda a, b, why: regions.append((a, b, why))):
        key = sample["key"]
        base_key = posixpath.basename(key)
        known = expected.pop(base_key, None) or expected.pop(key, None)
        meta = dict(known or {})
        meta.update(sample["meta"] or {})
        meta.setdefault("key", base_key)
        files = sample["files"]
        caption = as_text(meta.get(plan.caption_col)) if plan.caption_col in meta else None
        if caption is None and "txt" in files:
            caption = files["txt"].decode("utf-8", "replace")
        row = _make_row(plan, opts, meta, caption, f"{rel}/{key}")
        ext = want if want else next((e for e in IMAGE_EXTS if e in files), None)
        image = files.get(ext) if ext else None
        if not sample["damaged"] and usual is None and image:
            usual = set(files)
        lost = sorted((usual or set()) - set(files)) if sample["damaged"] else []
        if image and not lost:
            row["image_bytes"] = image
            yield row
        elif sample["damaged"]:
            # The unreadable stretch next to this sample held its lost members: it is accounted by this row.
            explained.update(i for i, (a, b, why) in enumerate(regions)
                             if why == _CORRUPT_HEADER and (b == sample["start"] or a == sample["end"]))
            yield _reject(row, "corrupt_shard", f"{rel}: sample {key} at byte {sample['start']} is damaged "
                                                f"({_describe(regions)}); members read: {sorted(files) or 'none'}"
                                                + (f", lost: {lost}" if lost else ""))
        else:
            yield _reject(row, "missing_image", f"{rel}: sample {key} has no image member "
                                                f"(.{want or '/.'.join(IMAGE_EXTS[:4])}); members: {sorted(files)}")
    if regions:
        log.warning("input: shard %s is damaged: %s", path, _describe(regions))
    # Samples img2dataset wrote that the tar no longer holds: named by the metadata parquet.
    for key, raw in expected.items():
        row = _make_row(plan, opts, raw, as_text(raw.get(plan.caption_col)), f"{rel}/{key}")
        yield _reject(row, "corrupt_shard", f"{rel}: sample {key} is listed as written in "
                                            f"{posixpath.basename(metadata[path])} but is not readable from the "
                                            f"tar ({_describe(regions) or 'missing'})")
    if not metadata.get(path):
        # Without metadata the samples inside an unreadable stretch cannot be named: one row per stretch.
        for i, (start, end, why) in enumerate(regions):
            if why.startswith("member ") or i in explained:
                continue  # that sample was rejected above by name
            where = f"{rel}@{start}"
            yield {"uid": records.make_uid(where, None), "url": None, "caption": None,
                   "__reject__": ("corrupt_shard", f"{rel}: bytes {start}..{end} unreadable ({why}); the samples "
                                                   "stored there (count unknown) are lost")}


def _describe(regions: list[tuple[int, int, str]]) -> str:
    if not regions:
        return ""
    parts = [f"bytes {a}..{b}: {why}" for a, b, why in regions[:3]]
    more = f" and {len(regions) - 3} more" if len(regions) > 3 else ""
    return "; ".join(parts) + more
