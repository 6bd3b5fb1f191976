"""Write curated and rejected Parquet shards through Beam file sinks, and OUT/stats.json.

Beam's ``WriteToParquet`` finalises files exactly once (temp files renamed at the end), so a retried
bundle never duplicates rows. Shard count = estimated rows / ``--shard-rows``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from clip_curate import records, schemas as schema
from clip_curate.fields import ConfigError, opt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputConfig:
    """Where and how outputs are written."""

    output: str | None = opt(None, "output directory (local or any Beam filesystem: gs://, s3://)")
    shard_rows: int = opt(10_000, "target rows per output Parquet shard")
    store_embeddings: bool = opt(True, "write image_embedding/text_embedding columns")

    def __post_init__(self):
        if not self.output:
            raise ConfigError("no output: pass --output DIR")
        if self.shard_rows < 1:
            raise ConfigError(f"--shard-rows must be >= 1, got {self.shard_rows}")


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base.rstrip("/"), *parts)


def shard_count(estimated_rows: int, shard_rows: int) -> int:
    return max(1, math.ceil(estimated_rows / shard_rows))


class _Project(beam.DoFn):
    def __init__(self, arrow_schema: pa.Schema, counter: str):
        self._schema = arrow_schema
        self._counter = beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, counter)

    def process(self, row):
        self._counter.inc()
        yield schema.project(row, self._schema)


class WriteParquetTable(beam.PTransform):
    """Project rows onto ``arrow_schema`` and write ``<directory>/<prefix>-SSSSS-of-NNNNN.parquet``."""

    def __init__(self, directory: str, arrow_schema: pa.Schema, num_shards: int, prefix: str = "part",
                 counter: str = "written_rows"):
        super().__init__()
        self._directory = directory
        self._schema = arrow_schema
        self._num_shards = num_shards
        self._prefix = prefix
        self._counter = counter

    def expand(self, rows):
        return (
            rows
            | "Project" >> beam.ParDo(_Project(self._schema, self._counter))
            | "Write" >> beam.io.WriteToParquet(
                join(self._directory, self._prefix), self._schema, num_shards=self._num_shards,
                file_name_suffix=".parquet", record_batch_size=256, row_group_buffer_size=32 * 1024 * 1024)
        )
