"""Write curated and rejected Parquet shards through Beam file sinks, and OUT/stats.json.

Beam's file sinks finalise files exactly once (temp files renamed at the end), so a retried bundle never
duplicates rows. Each bundle writes its own shards where its rows are made (no shuffle of the rows before
writing), starting a new shard after ``--shard-rows`` rows; rows are turned into Arrow record batches 256 at
a time and written as row groups of about 32 MB.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from clip_curate import records, schemas as schema
from clip_curate.fields import ConfigError, opt

log = logging.getLogger(__name__)


#: pyarrow's Parquet codecs (``none`` writes uncompressed pages).
PARQUET_CODECS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")

#: What a run writes into its output directory (what ``--overwrite`` removes).
OUTPUT_PARTS = ("curated", "rejected", "audit", "stats.json", "_stage_stats")


def check_compression(codec: str, flag: str = "--parquet-compression") -> str:
    """``codec`` when pyarrow can write it, else a one-line ConfigError naming the choices."""
    if codec not in PARQUET_CODECS:
        raise ConfigError(f"{flag} {codec!r} is not a Parquet codec; choose one of {', '.join(PARQUET_CODECS)}")
    if codec != "none" and not pa.Codec.is_available(codec):
        raise ConfigError(f"{flag} {codec!r} is not available in this pyarrow build; choose one of "
                          + ", ".join(c for c in PARQUET_CODECS if c == "none" or pa.Codec.is_available(c)))
    return codec


def _entries(out: str) -> list[str]:
    """Names directly under ``out`` (none when it does not exist); write probes are not counted."""
    import os

    if FileSystems.get_scheme(out) is None:
        return sorted(e for e in os.listdir(out) if not e.startswith(".clip-curate-write-probe-")) \
            if os.path.isdir(out) else []
    base = out.rstrip("/") + "/"
    found = FileSystems.match([base + "*"])[0].metadata_list
    return sorted({m.path[len(base):].split("/", 1)[0] for m in found if m.path.startswith(base)})


def _same_place(a: str, b: str) -> bool:
    """Whether path ``b`` is ``a`` or lies under it."""
    import os

    if FileSystems.get_scheme(a) is None and FileSystems.get_scheme(b) is None:
        a, b = os.path.abspath(a), os.path.abspath(b)
        return a == b or b.startswith(a.rstrip("/") + "/")
    return a.rstrip("/") == b.rstrip("/") or b.startswith(a.rstrip("/") + "/")


def claim_output(out: str, *, resume: bool = False, overwrite: bool = False, flag: str = "--output",
                 parts: tuple[str, ...] = OUTPUT_PARTS, command: str = "run", inputs=()) -> list[str]:
    """Make ``out`` ready for a new run: a non-empty directory is refused (ConfigError, one line) unless
    ``resume`` (write beside the old shards) or ``overwrite`` (remove ``parts`` first). ``inputs``: paths the
    run reads, never removed by ``overwrite``. Returns what was removed."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume keeps the earlier rows, "
                          "--overwrite removes them; pass one")
    if overwrite:  # the input is OUT itself (--retry-from OUT, a re-filter of OUT) or in a part it removes
        for src in inputs:
            if src and "*" not in src and (_same_place(src, out) or any(_same_place(join(out, p), src) for p in parts)):
                raise ConfigError(f"--overwrite would remove this run's own input {src!r} (it lies in {flag} "
                                  f"{out!r}); write to another {flag}")
    entries = _entries(out)
    if not entries or resume:
        return []
    if not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        more = "--resume to continue it, " if command == "run" else ""
        raise ConfigError(f"{flag} {out!r} is not empty ({shown}); pass {more}--overwrite to replace it, or "
                          "an empty directory")
    removed = [join(out, e) for e in entries if e in parts]
    if removed:
        FileSystems.delete(removed)
        log.info("--overwrite: removed %s", ", ".join(e for e in entries if e in parts))
    return removed


@dataclass(frozen=True)
class OutputConfig:
    """Where and how outputs are written."""

    output: str | None = opt(None, "output directory (local or any Beam filesystem: gs://, s3://)")
    shard_rows: int = opt(10_000, "most rows per output Parquet shard (each worker bundle writes its own shards "
                                  "where its rows are made, a new one after this many rows)")
    store_embeddings: bool = opt(True, "write image_embedding/text_embedding columns")
    overwrite: bool = opt(False, "replace the outputs of an earlier run in --output (curated/, rejected/, audit/, "
                                 "stats.json); without it (or --resume) a non-empty --output is refused")
    parquet_compression: str = opt("zstd", "Parquet compression codec of the output shards",
                                   choices=PARQUET_CODECS)

    def __post_init__(self):
        if not self.output:
            raise ConfigError("no output: pass --output DIR")
        if self.shard_rows < 1:
            raise ConfigError(f"--shard-rows must be >= 1, got {self.shard_rows}")
        check_compression(self.parquet_compression)


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base.rstrip("/"), *parts)


def shard_count(estimated_rows: int, shard_rows: int) -> int:
    return max(1, math.ceil(estimated_rows / shard_rows))


def embedding_dim(model_config) -> int | None:
    """The embedding width of the run's model, read from its config without loading weights (the writers'
    ``fixed_size_list<float32>[d]``); None when it cannot be known before the run (the columns are then
    variable lists)."""
    import json
    import os

    from clip_curate.models import clip

    try:
        spec = clip.resolve_model(model_config)
        if spec.kind == "test":
            cfg = clip.TEST_TINY_MODEL_CFG
        elif spec.kind in ("synthetic", "dir"):
            with open(os.path.join(spec.name, clip.CONFIG_FILE), encoding="utf-8") as f:
                cfg = json.load(f)["model_cfg"]
        elif spec.kind == "hf":
            from open_clip.factory import _get_hf_config

            cfg = _get_hf_config(spec.name)["model_cfg"]
        else:
            cfg = clip.open_clip_catalogue().model_config(spec.name) or {}
        return int(cfg["embed_dim"])
    except Exception as exc:  # noqa: BLE001 - e.g. a hub config unreachable now: variable-length lists
        log.info("embedding width of %s unknown before the run (%s): embeddings stored as list<float32>",
                 getattr(model_config, "clip_model", model_config), exc)
        return None


class _Project(beam.DoFn):
    def __init__(self, arrow_schema: pa.Schema, counter: str):
        self._schema = arrow_schema
        self._counter = beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, counter)

    def process(self, row):
        self._counter.inc()
        yield schema.project(row, self._schema)


#: Rows per Arrow record batch, and bytes of record batches per Parquet row group.
BATCH_ROWS = 256
ROW_GROUP_BYTES = 32 * 1024 * 1024


class _RowFile:
    """One open shard: projected rows are buffered per column, made into a record batch every
    :data:`BATCH_ROWS` rows, and written as a row group once ~:data:`ROW_GROUP_BYTES` are buffered."""

    def __init__(self, file, arrow_schema: pa.Schema, codec: str):
        import pyarrow.parquet as pq

        self.file = file
        self._schema = arrow_schema
        self._names = arrow_schema.names
        self._columns: list[list] = [[] for _ in self._names]
        self._batches: list[pa.RecordBatch] = []
        self._bytes = 0
        self._writer = pq.ParquetWriter(file, arrow_schema, compression=codec, use_compliant_nested_type=False)

    def add(self, row: dict) -> None:
        for column, name in zip(self._columns, self._names):
            column.append(row.get(name))
        if len(self._columns[0]) >= BATCH_ROWS:
            self._batch()

    def _batch(self) -> None:
        if self._columns[0]:
            batch = pa.RecordBatch.from_arrays(
                [pa.array(c, type=t) for c, t in zip(self._columns, self._schema.types)], schema=self._schema)
            self._columns = [[] for _ in self._names]
            self._batches.append(batch)
            self._bytes += batch.nbytes
        if self._bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._batches:
            self._writer.write_table(pa.Table.from_batches(self._batches, schema=self._schema))
            self._batches, self._bytes = [], 0

    def close(self) -> None:
        self._batch()
        self._flush()
        self._writer.close()


class _ParquetRowSink(filebasedsink.FileBasedSink):
    """Row dicts (already projected) -> Parquet shards; a writer starts a new shard after ``max_rows``."""

    def __init__(self, prefix: str, arrow_schema: pa.Schema, codec: str, num_shards: int, max_rows: int | None):
        super().__init__(prefix, coder=None, file_name_suffix=".parquet", num_shards=num_shards,
                         mime_type="application/x-parquet", compression_type=CompressionTypes.UNCOMPRESSED,
                         max_records_per_shard=max_rows)
        self._schema = arrow_schema
        self._codec = codec

    def open(self, temp_path: str) -> _RowFile:
        return _RowFile(super().open(temp_path), self._schema, self._codec)

    def write_record(self, handle: _RowFile, value: dict) -> None:
        handle.add(value)

    def write_encoded_record(self, handle, encoded_value):  # pragma: no cover - rows are never pre-encoded
        raise NotImplementedError

    def close(self, handle: _RowFile) -> None:
        handle.close()
        handle.file.close()

    def display_data(self):
        return {**super().display_data(), "codec": self._codec}


class WriteParquetTable(beam.PTransform):
    """Project rows onto ``arrow_schema`` and write ``<directory>/<prefix>-SSSSS-of-NNNNN.parquet``.

    ``max_rows`` (default): each bundle writes its own shards where its rows are, a new shard after
    ``max_rows`` rows, with no shuffle of the rows; the shard count follows the bundles. ``num_shards`` > 0
    instead: exactly that many shards, the rows shuffled to them first."""

    def __init__(self, directory: str, arrow_schema: pa.Schema, num_shards: int = 0, prefix: str = "part",
                 counter: str = "written_rows", compression: str = "zstd", max_rows: int | None = None):
        super().__init__()
        self._codec = check_compression(compression)
        self._directory = directory
        self._schema = arrow_schema
        self._num_shards = num_shards
        self._max_rows = None if num_shards else max_rows
        self._prefix = prefix
        self._counter = counter

    def expand(self, rows):
        sink = _ParquetRowSink(join(self._directory, self._prefix), self._schema, self._codec, self._num_shards,
                               self._max_rows)
        return (
            rows
            | "Project" >> beam.ParDo(_Project(self._schema, self._counter))
            | "Write" >> beam.io.Write(sink)
        )
