"""Write curated and rejected Parquet shards through Beam file sinks, and OUT/stats.json.

Beam's ``WriteToParquet`` finalises files exactly once (temp files renamed at the end), so a retried
bundle never duplicates rows. Shard count = estimated rows / ``--shard-rows``.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from clip_curate import records, schema
from clip_curate.options import ConfigError, opt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputConfig:
    """Where and how outputs are written."""

    output: str | None = opt(None, "output directory (local or any Beam filesystem: gs://, s3://)")
    shard_rows: int = opt(10_000, "target rows per output Parquet shard")
    store_embeddings: bool = opt(True, "write image_embedding/text_embedding columns")
    shard_prefix: str = opt("part", "file name prefix of output shards", cli=False)

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


def _stats_record(_, out_dir: str, input_rows: int, curated_rows: int, rejected_by: list, extra: dict) -> None:
    by: dict[str, dict[str, int]] = {}
    for (stage, reason), n in sorted(rejected_by):
        by.setdefault(stage, {})[reason] = n
    rejected = sum(n for _, n in rejected_by)
    stats = {"input_rows": input_rows, "curated_rows": curated_rows, "rejected_rows": rejected,
             "rejected_by": by, "timings": {}, **extra}
    with FileSystems.create(join(out_dir, "stats.json")) as f:
        f.write(json.dumps(stats, indent=2, sort_keys=True).encode())


class WriteStats(beam.PTransform):
    """Count input, curated and rejected rows (by stage and reason) with combiners -> OUT/stats.json."""

    def __init__(self, out_dir: str, extra: dict[str, Any] | None = None):
        super().__init__()
        self._out_dir = out_dir
        self._extra = extra or {}

    def expand(self, pcolls):
        input_rows, curated, rejected = pcolls
        n_in = input_rows | "CountInput" >> beam.combiners.Count.Globally()
        n_cur = curated | "CountCurated" >> beam.combiners.Count.Globally()
        by = (rejected
              | "StageReason" >> beam.Map(lambda r: (r["stage"], r["reason"]))
              | "CountByReason" >> beam.combiners.Count.PerElement()
              | "AsList" >> beam.combiners.ToList())
        return (
            n_in.pipeline
            | "Once" >> beam.Create([None])
            | "WriteStatsJson" >> beam.Map(
                _stats_record, self._out_dir, beam.pvalue.AsSingleton(n_in), beam.pvalue.AsSingleton(n_cur),
                beam.pvalue.AsSingleton(by), self._extra)
        )


def read_stats(out_dir: str) -> dict[str, Any]:
    with FileSystems.open(join(out_dir, "stats.json")) as f:
        return json.loads(f.read().decode())


def update_stats(out_dir: str, **updates: Any) -> dict[str, Any]:
    """Merge ``updates`` into OUT/stats.json (used after the run for wall time and metrics)."""
    stats = read_stats(out_dir)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(stats.get(key), dict):
            stats[key].update(value)
        else:
            stats[key] = value
    with FileSystems.create(join(out_dir, "stats.json")) as f:
        f.write(json.dumps(stats, indent=2, sort_keys=True).encode())
    return stats


from clip_curate.resume import merge_counts, output_counts  # noqa: E402,F401  (moved; kept importable here)
