"""What every reader shares: the ``--input`` config, the read plan, the reader registry and the Read transform.

A reader is one module that registers a :class:`Reader`: which formats it reads, how it detects them,
how it plans the work (files -> :class:`Split` s, carried columns, a row estimate; every user mistake a
one-line ConfigError) and how it reads one split into rows. ``plan_input`` asks the registered readers
in ``priority`` order; :class:`ReadUrlList` reads the planned splits in parallel.

A reader that finds a record it cannot turn into a row yields a :class:`ReadRejection` instead; the Read
transform turns it into a ``read/<reason>`` rejected row, so no record is ever silently lost.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import apache_beam as beam
import pyarrow as pa

from clip_curate import records
from clip_curate import schemas as schema
from clip_curate.fields import ConfigError, opt
from clip_curate.stages.base import IMAGE, RAW_IMAGE

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
    """A record a reader could not turn into a row: becomes a rejected row ``read/<reason>``."""

    row: dict[str, Any]   # uid, url, caption (and whatever else is known)
    reason: str
    detail: str

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


def read_split(split: Split, plan: InputPlan) -> Iterator[Any]:
    """Rows (and :class:`ReadRejection` s) of one split, of this pass (``plan.part``)."""
    items = reader_for(split.fmt).read(split, plan)
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
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG,
                                           records.reject(row.row, "read", row.reason, row.detail))
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
