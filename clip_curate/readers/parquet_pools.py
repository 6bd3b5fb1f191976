"""Reader ``img2dataset-parquet`` / ``hf-parquet``: Parquet pools with an image column.

``img2dataset-parquet``  Parquet with a binary image column (``jpg``) and img2dataset's ``status``: rows it
                         failed to download become ``read/source_failed`` rejections
``hf-parquet``           Parquet with an image column: ``struct<bytes: binary, path: string>`` (Hugging
                         Face ``Image`` feature) or plain binary; ``--image-col`` names it
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clip_curate.fields import ConfigError
from clip_curate.readers.base import DAMAGE_ERRORS, InputPlan, Reader, ReaderConfig, Split, as_text, register_reader
from clip_curate.readers.pools import (
    PEEK,
    SUCCESS,
    PoolOptions,
    carry,
    detect_pool_format,
    image_column,
    is_image_struct,
    list_files,
    make_row,
    parquet_schema,
    pool_plan,
    reject_read,
    rel_path,
    unify_schemas,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParquetPoolOptions(PoolOptions):
    """img2dataset / Hugging Face Parquet: where the image is."""

    image_col: str = "jpg"
    struct: bool = False              # the column is a Hugging Face image struct<bytes, path>
    status_col: Optional[str] = None  # img2dataset's status column, when present


def _plan_parquet(cfg: ReaderConfig, fmt: str, files: list[tuple[str, int]]) -> InputPlan:
    paths = [p for p, _ in files if p.endswith((".parquet", ".pq"))]
    if not paths:
        raise ConfigError(f"--input-format {fmt}: no .parquet files in {cfg.input!r}")
    sch = first_error = None
    for path in paths[:PEEK]:
        try:
            sch = parquet_schema(path)
            break
        except DAMAGE_ERRORS as exc:
            first_error = first_error or f"{path!r}: {exc}"
    if sch is None:
        raise ConfigError(f"cannot read parquet {first_error}")
    col = image_column(sch, cfg.image_col)
    if col is None:
        binaries = [f.name for f in sch if pa.types.is_binary(f.type) or is_image_struct(f.type)]
        if cfg.image_col:
            raise ConfigError(f"--image-col {cfg.image_col!r}: no such column in {paths[0]} "
                              f"(columns: {', '.join(sch.names)})")
        raise ConfigError(f"no image column found in {paths[0]} (binary or struct<bytes, path> columns: "
                          f"{', '.join(binaries) or 'none'}); pass --image-col NAME")
    t = sch.field(col).type
    if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or is_image_struct(t)):
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
    splits, estimated, schemas, read = [], 0, [], 0
    many = len(paths) > PEEK  # then one split per file, and no footer read per file at planning time
    for path in paths[:PEEK] if many else paths:
        try:
            with fsspec.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                meta, other = pf.metadata, pf.schema_arrow
        except DAMAGE_ERRORS as exc:
            log.warning("input: cannot read the footer of %s (%s: %s); it is recorded as read/unreadable_source",
                        path, type(exc).__name__, exc)
            if not many:
                splits.append(Split(path, fmt))
            continue
        if col not in other.names:
            raise ConfigError(f"{path}: no image column {col!r} (the first file has it); "
                              "point --input at files of one layout")
        schemas.append([f for f in other if f.name != col])
        estimated += meta.num_rows
        read += 1
        if not many:
            splits.extend(Split(path, fmt, i) for i in range(meta.num_row_groups) if meta.row_group(i).num_rows)
    if many:
        estimated = int(estimated / max(read, 1) * len(paths))
        splits = [Split(p, fmt) for p in paths]
    extra, renames = carry(unify_schemas(schemas, f"the files of {cfg.input!r}"), skip)
    if estimated == 0:
        raise ConfigError(f"input {cfg.input!r} is empty (no rows)")
    log.info("input: %s pool: image column %r (%s), caption %r, %d file(s), carried columns: %s",
             fmt, col, "struct" if is_image_struct(t) else "binary", cfg.caption_col, len(paths),
             ", ".join(n for _, n in renames) or "none")
    return pool_plan(cfg, fmt, paths, splits, sch.names, extra, renames, estimated, uid_col, ParquetPoolOptions,
                 image_col=col, struct=is_image_struct(t), status_col=status)


def _read_parquet_pool(split: Split, plan: InputPlan, opts: PoolOptions) -> Iterator[dict[str, Any]]:
    col, struct, status_col = opts.image_col, opts.struct, opts.status_col
    rel = rel_path(split.path, opts)
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
                row = make_row(plan, opts, raw, caption, f"{rel}#{index}")
                if status_col and raw.get(status_col) != SUCCESS:
                    yield reject_read(row, "source_failed", as_text(raw.get("error_message")) or
                                  f"img2dataset status {raw.get(status_col)!r}")
                elif not image:
                    yield reject_read(row, "missing_image", f"{rel} row {index}: column {col!r} holds no image bytes"
                                  + (f" (path {path!r}; images referenced by path are not read)" if path else ""))
                else:
                    row["image_bytes"] = bytes(image)
                    yield row
            offset += batch.num_rows




def _detect(cfg: ReaderConfig) -> str | None:
    fmt = detect_pool_format(cfg.input, cfg) if cfg.input else None
    return fmt if fmt in FORMATS else None


def _plan_parquet_pool(cfg: ReaderConfig, fmt: str) -> InputPlan:
    files = list_files(cfg.input)
    if not files:
        raise ConfigError(f"input {cfg.input!r} holds no files")
    plan = _plan_parquet(cfg, fmt, files)
    log.info("input: detected %s (%d shard(s), ~%d rows)", fmt, len(plan.splits), plan.estimated_rows)
    return plan


FORMATS = ("img2dataset-parquet", "hf-parquet")
register_reader(Reader("parquet-pools", FORMATS, detect=_detect, plan=_plan_parquet_pool,
                       read=lambda split, plan: _read_parquet_pool(split, plan, plan.options), priority=30))
