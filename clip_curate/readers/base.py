"""What every reader shares: the ``--input`` config, the read plan, the reader registry and the Read transform.

A reader is one module that registers a :class:`Reader`: which formats it reads, how it detects them,
how it plans the work (files -> :class:`Split` s, carried columns, a row estimate; every user mistake a
one-line ConfigError) and how it reads one split into rows. ``plan_input`` asks the registered readers
in ``priority`` order; :class:`ReadUrlList` reads the planned splits in parallel.

A reader that finds a record it cannot turn into a row yields a :class:`ReadRejection` instead; the Read
transform turns it into a ``read/<reason>`` rejected row, so no record is ever silently lost.

Bad input never stops the Read (see docs/bad-input.md): a split that cannot be read to its end yields the
rows read before the damage and one ``read/unreadable_source`` row naming the file and the position
(``read_split``); captions holding NUL or lone surrogates are rejected ``caption/invalid_text``, URLs
``read/invalid_url``, and other text values are repaired to U+FFFD (``clean_item``).
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import logging
import lzma
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import apache_beam as beam
import pyarrow as pa

from clip_curate import records
from clip_curate import schemas as schema
from clip_curate.fields import ConfigError, opt
from clip_curate.stages.base import IMAGE, RAW_IMAGE
from clip_curate.stats import DAMAGE_KEY

log = logging.getLogger(__name__)

URL_LIST_FORMATS = ("parquet", "csv", "tsv", "jsonl")
#: Inputs that already hold images (never downloaded): see ``clip_curate.readers.pools``.
POOL_FORMATS = ("webdataset", "img2dataset-parquet", "hf-parquet", "curated")
#: Names produced by the pipeline itself; input columns with these names are renamed ``input_<name>``.
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
                                       f"reasons ({', '.join(records.TRANSIENT_REASONS)})")
    input_encoding: str = opt("utf-8", "text encoding of CSV/TSV/JSONL inputs (any Python codec: utf-8, latin-1, "
                                       "cp1252, utf-16 ...); rows not valid in it are rejected read/bad_encoding")
    strict_input: bool = opt(False, "refuse the run (exit 2) when any input file cannot be read to its end, "
                                    "after reading every split once before any work; off: the rows before the "
                                    "damage are kept and the damage is a read/unreadable_source row")

    def __post_init__(self):
        if self.input and self.retry_from:
            raise ConfigError("--input and --retry-from are exclusive: --retry-from OUT reads OUT/rejected itself")
        if not self.input and not self.retry_from:
            raise ConfigError("no input: pass --input URLS (or --retry-from OUT)")
        for name in ("url_col", "caption_col"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} may not be empty")
        try:
            codecs.lookup(self.input_encoding)
        except LookupError:
            raise ConfigError(f"--input-encoding: unknown encoding {self.input_encoding!r}; name a Python codec "
                              "such as utf-8, latin-1, cp1252 or utf-16") from None


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
    options: Any = None                  # the format's own typed settings (e.g. readers.pools.ParquetPoolOptions)
    part: tuple[int, int] | None = None  # (k, n): read only rows whose uid hash is k mod n (--chunk-rows)

    @property
    def supplies(self) -> frozenset[str]:
        """Capabilities the rows already have (see ``clip_curate.stages.base``): stages that only make
        these are skipped."""
        if self.preprocessed:
            return frozenset({RAW_IMAGE, IMAGE})
        return frozenset({RAW_IMAGE}) if self.has_images else frozenset()


@dataclass(frozen=True)
class ReadRejection:
    """A record a reader could not turn into a row: becomes a rejected row ``<stage>/<reason>`` (stage
    ``read``, or ``caption`` for ``invalid_text``). ``damage``: set when the record stands for a part of a
    source that could not be read (listed in stats.json ``damaged_sources``; ``--strict-input`` refuses)."""

    row: dict[str, Any]   # uid, url, caption (and whatever else is known)
    reason: str
    detail: str
    stage: str = "read"
    damage: Optional[str] = None

    @property
    def uid(self) -> str:
        return self.row["uid"]


def _no_prepare(cfg, plan, enabled, identity):
    return cfg


@dataclass(frozen=True)
class Reader:
    """One registered input reader.

    ``detect(cfg)`` returns the format it recognises at ``cfg.input`` (None: not its input); ``plan(cfg,
    fmt)`` inspects the input and returns the :class:`InputPlan`; ``read(split, plan)`` yields the rows (or
    :class:`ReadRejection` s) of one split. ``prepare_run(cfg, plan, enabled, embedding)`` may adjust the
    run's config for this input (default: unchanged)."""

    name: str
    formats: tuple[str, ...]
    detect: Callable[[Any], Optional[str]]
    plan: Callable[[Any, str], "InputPlan"]
    read: Callable[[Split, "InputPlan"], Iterator[Any]]
    priority: int = 100
    prepare_run: Callable[..., Any] = _no_prepare


_READERS: dict[str, Reader] = {}


def register_reader(reader: Reader) -> Reader:
    """Add ``reader`` to the registry (its module calls this once, at import)."""
    _READERS[reader.name] = reader
    return reader


def readers() -> tuple[Reader, ...]:
    """Registered readers, in detection order (importing ``clip_curate.readers`` registers the built-in ones)."""
    return tuple(sorted(_READERS.values(), key=lambda r: r.priority))


def reader_for(plan_or_fmt: Any) -> Reader:
    """The reader of a plan (or a format name)."""
    fmt = getattr(plan_or_fmt, "fmt", plan_or_fmt)
    for r in readers():
        if fmt in r.formats:
            return r
    raise ConfigError(f"no reader for input format {fmt!r}")


def plan_input(cfg: ReaderConfig) -> InputPlan:
    """Inspect the input: raise ConfigError (one line) for every user mistake."""
    if cfg.input_format != "auto":
        return reader_for(cfg.input_format).plan(cfg, cfg.input_format)
    for r in readers():
        fmt = r.detect(cfg)
        if fmt is not None:
            return r.plan(cfg, fmt)
    raise ConfigError(f"cannot tell the format of {cfg.input!r}; pass --input-format")


def as_text(value: Any) -> str | None:
    """A cell as text (None stays None): ids and captions may be stored as numbers."""
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def in_part(uid: str, part: tuple[int, int]) -> bool:
    """Whether a row belongs to pass ``part = (k, n)`` of a chunked run (every row is in exactly one)."""
    return records.uid_hash(uid) % part[1] == part[0]


def damage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a source's bytes are damaged (truncated compression, corrupt pages or blocks)."""
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error, lzma.LZMAError, pa.ArrowException,
                                         tarfile.TarError, csv.Error, UnicodeError]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:  # fsspec reads .zst only with it
        pass
    return tuple(errors)


DAMAGE_ERRORS = damage_errors()


def split_where(split: Split) -> str:
    """How a split is named in details: ``path`` or ``path row group N``."""
    return split.path if split.row_group is None else f"{split.path} row group {split.row_group}"


def damaged(where: str, what: str) -> ReadRejection:
    """The rejection standing for the unreadable rest of a source: ``where`` names the file and position
    (``file line 12``, ``file row group 1``), ``what`` says what went wrong."""
    detail = " ".join(f"{where}: {what}".split())  # one line (parquet errors span several)
    return ReadRejection({"uid": records.make_uid(where, None), "url": None, "caption": None},
                         "unreadable_source", detail, damage=detail)


def _guarded(split: Split, plan: InputPlan) -> Iterator[Any]:
    """The reader's items of ``split``; damage a reader did not handle itself ends the split with a
    :func:`damaged` record after the rows read before it."""
    rows = 0
    try:
        for item in reader_for(split.fmt).read(split, plan):
            rows += not isinstance(item, ReadRejection)
            yield item
    except DAMAGE_ERRORS as exc:
        log.warning("input: %s cannot be read to its end after %d row(s): %s: %s; the rest is recorded as "
                    "read/unreadable_source", split_where(split), rows, type(exc).__name__, exc)
        yield damaged(split_where(split), f"unreadable after {rows} row(s) ({type(exc).__name__}: {exc})")


def _repaired(row: dict[str, Any], counter=None) -> dict[str, Any]:
    """``row`` with every text value holding NUL or a lone surrogate repaired to U+FFFD."""
    out = row
    for key, value in row.items():
        if isinstance(value, str) and records.text_problem(value):
            if out is row:
                out = dict(row)
            out[key] = records.repair_text(value)
            if counter is not None:
                counter.inc()
    return out


def clean_item(item: Any, counter=None) -> Any:
    """Text no row may carry (NUL, lone surrogates: Beam's coders and Parquet refuse them) handled
    before the row leaves the reader: a caption holding it -> ``caption/invalid_text``, a URL ->
    ``read/invalid_url`` (both stored repaired, the problem in ``detail``); any other text value (carried
    columns, ids) is repaired to U+FFFD and counted (``read_repaired_values``). The uid is computed from
    the text as read, so valid text keeps its uid."""
    if isinstance(item, ReadRejection):
        row = _repaired(item.row)
        detail = records.repair_text(item.detail)
        return item if row is item.row and detail == item.detail else dataclasses.replace(
            item, row=row, detail=detail)
    for col, reason, stage in (("caption", "invalid_text", "caption"), ("url", "invalid_url", "read")):
        value = item.get(col)
        problem = records.text_problem(value) if isinstance(value, str) else None
        if problem:
            return ReadRejection(_repaired(item), reason, f"{col}: {problem} (stored with U+FFFD)", stage=stage)
    return _repaired(item, counter)


def read_split(split: Split, plan: InputPlan) -> Iterator[Any]:
    """Rows (and :class:`ReadRejection` s) of one split, of this pass (``plan.part``); never raises for
    damaged bytes or invalid text (see the module docstring)."""
    counter = beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, "read_repaired_values")
    items = (clean_item(item, counter) for item in _guarded(split, plan))
    if plan.part is not None:
        items = (item for item in items if in_part(item.uid if isinstance(item, ReadRejection) else item["uid"],
                                                   plan.part))
    yield from items


class _ValidateRow(beam.DoFn):
    """Reject rows without a usable URL (and records a reader could not read); count what was read."""

    def __init__(self):
        self._read = beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, "read_rows")

    def process(self, row):
        self._read.inc()
        if isinstance(row, ReadRejection):
            rejected = records.reject(row.row, row.stage, row.reason, row.detail)
            if row.damage:
                rejected[DAMAGE_KEY] = row.damage  # transient: listed in stats.json damaged_sources
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, rejected)
        elif (row.get("image_bytes") is not None or row.get("image") is not None
              or row.get("image_embedding") is not None):
            yield row  # pool rows hold their image (or, re-filtered, its embedding); a URL is optional
        elif not row.get("url"):
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, records.reject(row, "read", "missing_url", "empty url"))
        else:
            yield row


class ReadUrlList(beam.PTransform):
    """Read the planned input (a URL list or a pool); returns ``(rows, rejected)``. Rows are reshuffled
    across workers."""

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
