"""Reader ``webdataset``: ``*.tar`` shards, samples grouped by key (``{key}.jpg`` / ``.txt`` / ``.json``, the
img2dataset and open_clip layout).

img2dataset writes ``{shard}.parquet`` beside each tar with every sample it tried, failures included:
those become ``read/source_failed`` rejections, and samples it lists as written but the tar lacks become
``read/corrupt_shard`` rejections. A damaged tar never stops the run and never loses rows silently: a
sample whose members can be named (from the tar, or from img2dataset's metadata Parquet) is rejected
``read/corrupt_shard`` with the shard and byte offset in ``detail``; a stretch of unreadable bytes whose
samples cannot be named (no metadata Parquet) becomes one ``read/corrupt_shard`` row for that stretch.
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clip_curate import records
from clip_curate.fields import ConfigError
from clip_curate.readers.base import (
    DAMAGE_ERRORS,
    InputPlan,
    Reader,
    ReaderConfig,
    ReadRejection,
    Split,
    as_text,
    register_reader,
)
from clip_curate.readers.pools import (
    PEEK,
    SUCCESS,
    PoolOptions,
    carry,
    detect_pool_format,
    json_type,
    list_files,
    make_row,
    parquet_schema,
    pool_plan,
    reject_read,
    rel_path,
    unify_columns,
    unify_schemas,
)

log = logging.getLogger(__name__)

#: Tar member extensions taken as the image of a sample, in priority order.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "img", "image")
_BLOCK = 512
_CORRUPT_HEADER = "unreadable bytes (corrupt tar header)"
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")   # webdataset's key / extension split


@dataclass(frozen=True)
class WebDatasetOptions(PoolOptions):
    """WebDataset tars: img2dataset's metadata Parquet per shard, and which member is the image."""

    metadata: tuple[tuple[str, str], ...] = ()   # (tar path, its metadata parquet)
    image_ext: Optional[str] = None              # --image-col: the member extension taken as the image


def _sample_meta_fields(tar_path: str, limit: int = 64) -> tuple[list[pa.Field], int, int]:
    """(json fields, samples seen, bytes they span) from the first samples of a shard."""
    types: dict[str, list[pa.DataType]] = {}
    n = span = 0
    try:
        for sample in _iter_tar(tar_path, report=lambda *a: None):
            n += 1
            span = sample["end"]
            meta = sample["meta"] or {}
            for k, v in meta.items():
                kinds = types.setdefault(k, [])
                if v is not None and json_type(v) not in kinds:
                    kinds.append(json_type(v))
            if n >= limit:
                break
    except DAMAGE_ERRORS:
        pass
    return unify_columns(types, f"the samples' .json of {tar_path}"), n, span


def _plan_webdataset(cfg: ReaderConfig, files: list[tuple[str, int]]) -> InputPlan:
    tars = [(p, s) for p, s in files if p.endswith(".tar")]
    if not tars:
        raise ConfigError(f"--input-format webdataset: no .tar shards in {cfg.input!r}")
    names = {p for p, _ in files}
    meta_of = {p: p[:-4] + ".parquet" for p, _ in tars if p[:-4] + ".parquet" in names}
    if meta_of:
        metas = [meta_of[p] for p, _ in tars if p in meta_of][:PEEK]
        schemas = []
        for path in metas:
            try:
                schemas.append(list(parquet_schema(path)))
            except DAMAGE_ERRORS as exc:
                raise ConfigError(f"cannot read img2dataset metadata {path!r}: {exc}") from None
        fields = unify_schemas(schemas, f"the metadata parquet files of {cfg.input!r}")
    else:
        fields, _, _ = _sample_meta_fields(tars[0][0])
    names_ = [f.name for f in fields]
    uid_col = cfg.uid_col if cfg.uid_col in names_ else None
    skip = {cfg.url_col, cfg.caption_col} | ({uid_col} if uid_col else set())
    if "key" not in names_:
        fields.append(pa.field("key", pa.string()))
    extra, renames = carry(fields, skip)
    # Row estimate (it only sizes output shards): metadata row counts of up to PEEK shards, scaled.
    estimated = 0
    with_meta = [p for p, _ in tars if p in meta_of]
    counts = []
    for p in with_meta[:PEEK]:
        try:
            with fsspec.open(meta_of[p], "rb") as f:
                counts.append(pq.ParquetFile(f).metadata.num_rows)
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(f"cannot read img2dataset metadata {meta_of[p]!r}: {exc}") from None
    if counts:
        estimated = sum(counts) if len(with_meta) <= PEEK else int(sum(counts) / len(counts) * len(with_meta))
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
    return pool_plan(cfg, "webdataset", [p for p, _ in tars], [Split(p, "webdataset") for p, _ in tars], names_,
                 extra, renames, max(estimated, len(tars)), uid_col, WebDatasetOptions,
                 metadata=tuple(sorted(meta_of.items())), image_ext=cfg.image_col)


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


def _read_tar_split(path: str, plan: InputPlan, opts: PoolOptions) -> Iterator[dict[str, Any]]:
    rel = rel_path(path, opts)
    metadata = dict(opts.metadata)
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
            row = make_row(plan, opts, raw, as_text(raw.get(plan.caption_col)), f"{rel}/{key}")
            yield reject_read(row, "source_failed", as_text(raw.get("error_message")) or f"img2dataset status "
                                                                                     f"{raw.get('status')!r}")
    regions: list[tuple[int, int, str]] = []
    # One damaged_sources entry per damaged shard (its corrupt_shard rows give each sample and byte range).
    damage = f"{path}: damaged tar shard (see its read/corrupt_shard rows)"
    want = opts.image_ext
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
        row = make_row(plan, opts, meta, caption, f"{rel}/{key}")
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
            yield ReadRejection(row, "corrupt_shard", f"{rel}: sample {key} at byte {sample['start']} is damaged "
                                                f"({_describe(regions)}); members read: {sorted(files) or 'none'}"
                                                + (f", lost: {lost}" if lost else ""), damage=damage)
        else:
            yield reject_read(row, "missing_image", f"{rel}: sample {key} has no image member "
                                                f"(.{want or '/.'.join(IMAGE_EXTS[:4])}); members: {sorted(files)}")
    if regions:
        log.warning("input: shard %s is damaged: %s", path, _describe(regions))
    # Samples img2dataset wrote that the tar no longer holds: named by the metadata parquet.
    for key, raw in expected.items():
        row = make_row(plan, opts, raw, as_text(raw.get(plan.caption_col)), f"{rel}/{key}")
        yield ReadRejection(row, "corrupt_shard", f"{rel}: sample {key} is listed as written in "
                                                f"{posixpath.basename(metadata[path])} but is not readable from the "
                                                f"tar ({_describe(regions) or 'missing'})",
                            damage=damage if regions else None)
    if not metadata.get(path):
        # Without metadata the samples inside an unreadable stretch cannot be named: one row per stretch.
        for i, (start, end, why) in enumerate(regions):
            if why.startswith("member ") or i in explained:
                continue  # that sample was rejected above by name
            where = f"{rel}@{start}"
            yield ReadRejection({"uid": records.make_uid(where, None), "url": None, "caption": None},
                                "corrupt_shard", f"{rel}: bytes {start}..{end} unreadable ({why}); the samples "
                                                 "stored there (count unknown) are lost", damage=damage)


def _describe(regions: list[tuple[int, int, str]]) -> str:
    if not regions:
        return ""
    parts = [f"bytes {a}..{b}: {why}" for a, b, why in regions[:3]]
    more = f" and {len(regions) - 3} more" if len(regions) > 3 else ""
    return "; ".join(parts) + more




def _plan(cfg: ReaderConfig, fmt: str = "webdataset") -> InputPlan:
    files = list_files(cfg.input)
    if not files:
        raise ConfigError(f"input {cfg.input!r} holds no files")
    plan = _plan_webdataset(cfg, files)
    log.info("input: detected webdataset (%d shard(s), ~%d rows)", len(plan.splits), plan.estimated_rows)
    return plan


register_reader(Reader("webdataset", ("webdataset",),
                       detect=lambda cfg: "webdataset" if cfg.input and detect_pool_format(cfg.input, cfg) == "webdataset"
                       else None,
                       plan=_plan, read=lambda split, plan: _read_tar_split(split.path, plan, plan.options), priority=20))
