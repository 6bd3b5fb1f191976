"""The whole curation pipeline, composed from the stage registry.

    read ─► [each enabled stage, in registry order] ─► curated Parquet + rejected Parquet + stats.json (+ audit)

Each stage is a PTransform returning ``(kept, rejected)``; every rejected PCollection flows into the
one rejected sink, so input rows == curated rows + rejected rows. This module names no stage: which
stages run, which a reader makes unnecessary and what each contributes come from ``clip_curate.stages``
and ``clip_curate.readers``.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import apache_beam as beam

from clip_curate import records
from clip_curate.audit.assemble import BiasAudit
from clip_curate.config import CurateConfig
from clip_curate.models.clip import embedding_identity
from clip_curate.readers.base import InputPlan, ReadUrlList, reader_for
from clip_curate.resume import SkipExisting
from clip_curate.schemas import curated_schema, rejected_schema
from clip_curate.stages.base import StageContext, get, plan_stages, registered
from clip_curate.stats import WriteStats
from clip_curate.writers import WriteParquetTable, embedding_dim, join

log = logging.getLogger(__name__)


#: Rows each step has passed in this worker process (kept and rejected rows of a stage count together);
#: progress display only, never part of a result.
_PROGRESS: dict[str, list] = {}
_PROGRESS_LOCK = threading.Lock()


def progress_line(label: str, n: int, elapsed_s: float, total: int | None = None, workers: int | None = None) -> str:
    """``progress <step>  <n> rows [of ~T]  <rate> rows/s [ETA]`` for one worker process. With the run's row
    estimate ``total`` and the number of worker processes, the ETA assumes the workers share the rows evenly."""
    rate = n / max(elapsed_s, 1e-9)
    line = f"progress {label:<9} {n:>8} rows"
    if total:
        share = total / max(workers or 1, 1)
        line += f" of ~{share:.0f}" + (f" (this worker, 1 of {workers}; ~{total} in all)" if (workers or 1) > 1 else "")
    line += f"  {rate:7.1f} rows/s"
    if total and workers and rate > 0:
        left = max(total / workers - n, 0) / rate
        line += f"  ETA {_duration(left)}"
    elif not total or (workers or 1) > 1:
        line += " (this worker)" if not total else ""
    return line


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLog(beam.DoFn):
    """Pass-through that logs the rows a step has passed in this worker process (and rows/s) every few
    seconds; with the run's row estimate, the total and an ETA. The kept and rejected outputs of a stage
    are counted together when both are wrapped with the same ``label``."""

    def __init__(self, label: str, every_s: float, total: int | None = None, workers: int | None = None,
                 count_only: bool = False):
        self._label = label
        self._every = every_s
        self._total = total
        self._workers = workers
        self._count_only = count_only
        self._seen = beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, f"progress_{label}")

    def setup(self):
        with _PROGRESS_LOCK:
            _PROGRESS.setdefault(self._label, [0, time.monotonic(), time.monotonic()])

    def process(self, row):
        if not self._count_only:
            self._seen.inc()
        now = time.monotonic()
        line = None
        with _PROGRESS_LOCK:
            state = _PROGRESS[self._label]
            state[0] += 1
            if self._every and now - state[2] >= self._every:
                state[2] = now
                line = progress_line(self._label, state[0], now - state[1], self._total, self._workers)
        if line:
            log.info("%s", line)
        yield row


def _worker_processes(p: beam.Pipeline) -> int | None:
    """Worker processes of a local (DirectRunner) run; None where the runner decides (Dataflow, Flink...)."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    opts = p.options
    runner = str(opts.view_as(StandardOptions).runner or "DirectRunner").split(".")[-1]
    if runner not in ("DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", "FnApiRunner"):
        return None
    direct = opts.view_as(DirectOptions)
    return max(int(direct.direct_num_workers or 1), 1)


def build_pipeline(p: beam.Pipeline, cfg: CurateConfig, plan: InputPlan, shard_prefix: str = "part",
                   existing_uids=None, prior_shards: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """Add the curation graph to ``p``; returns its main PCollections (for tests and the audit).

    ``existing_uids``: uids already in the output (skipped); ``prior_shards``: ``(sub, path)`` of the
    output's earlier shards, whose rows take part in dedup as already-decided rows."""
    out = cfg.output.output
    rows, read_rejected = p | "Read" >> ReadUrlList(plan)
    input_rows = (rows, read_rejected) | "AllInputRows" >> beam.Flatten()
    if existing_uids is not None:
        rows = rows | "SkipDone" >> SkipExisting(existing_uids)
        read_rejected = read_rejected | "SkipDoneRejected" >> SkipExisting(existing_uids)
        input_rows = (rows, read_rejected) | "NewInputRows" >> beam.Flatten()
    rejected = [read_rejected]
    every = cfg.run.progress_seconds
    total, workers = plan.estimated_rows or None, _worker_processes(p)   # progress lines: total and ETA
    enabled, skipped, added = plan_stages(cfg.run.enabled(), plan.supplies)
    for name in added:
        log.info("stages: %s stage added: the input's rows need it before %s", name,
                 ", ".join(s for s in enabled if get(s).needs & get(name).provides))
    identity = embedding_identity(cfg.model) if cfg.model is not None else None
    cfg = reader_for(plan).prepare_run(cfg, plan, enabled, identity)
    ctx = StageContext(configs=cfg.stages, estimated_rows=plan.estimated_rows, prior_shards=prior_shards,
                       embed_model=identity and identity["embed_model"], enabled=enabled, output=out)
    addons = [(stage, addon) for stage in registered() if stage.name in enabled for addon in stage.addons]
    for name in enabled:
        if name in skipped:
            continue
        transform = get(name).build(cfg.stage(name), ctx)
        if transform is None:
            continue
        label = name.capitalize()
        rows, stage_rejected = rows | label >> transform
        rows = rows | f"Progress{label}" >> beam.ParDo(ProgressLog(name, every, total, workers))
        stage_rejected = stage_rejected | f"Progress{label}Rejected" >> beam.ParDo(
            ProgressLog(name, every, total, workers, count_only=True))
        rejected.append(stage_rejected)
        for owner, addon in addons:
            if addon.after != name:
                continue
            extra = addon.build(cfg.stage(owner.name), ctx)
            if extra is not None:
                rows, extra_rejected = rows | addon.label >> extra
                rejected.append(extra_rejected)
    all_rejected = (tuple(rejected) | "AllRejected" >> beam.Flatten()
                    | "ProgressRejected" >> beam.ParDo(ProgressLog("rejected", every)))
    store = cfg.output.store_embeddings
    extra_fields = plan.extra_fields
    max_rows = cfg.output.shard_rows  # each bundle writes its own shards: no shuffle of the rows before writing
    # embeddings: fixed_size_list<float32>[d], d from the model's config; no model, no embedding columns
    dim = embedding_dim(cfg.model) if cfg.model is not None and store else None
    shapes = dict(store_embeddings=store, embed_dim=dim, embeddings=cfg.model is not None)
    codec = cfg.output.parquet_compression
    rows | "WriteCurated" >> WriteParquetTable(join(out, "curated"), curated_schema(extra_fields, **shapes), 0,
                                               shard_prefix, "curated_rows", codec, max_rows=max_rows)
    all_rejected | "WriteRejected" >> WriteParquetTable(join(out, "rejected"), rejected_schema(extra_fields, **shapes),
                                                        0, shard_prefix, "rejected_rows", codec, max_rows=max_rows)
    stats_extra: dict[str, Any] = {"stages": list(enabled), "input_format": plan.fmt}
    if identity is not None:
        stats_extra["embedding"] = identity
    if cfg.judgments:  # what the model's card switched on and off (config.resolve_judgments)
        stats_extra["judgments"] = list(cfg.judgments)
    (input_rows, rows, all_rejected) | "Stats" >> WriteStats(out, stats_extra)
    if cfg.run.audit:
        (rows, all_rejected) | "Audit" >> BiasAudit(join(out, "audit"), cfg.audit, model_config=cfg.model)
    return {"input": input_rows, "curated": rows, "rejected": all_rejected}
