"""The whole curation pipeline, composed from the stage registry.

    read ─► [each enabled stage, in registry order] ─► curated Parquet + rejected Parquet + stats.json (+ audit)

Each stage is a PTransform returning ``(kept, rejected)``; every rejected PCollection flows into the
one rejected sink, so input rows == curated rows + rejected rows. This module names no stage: which
stages run, which a reader makes unnecessary and what each contributes come from ``clip_curate.stages``
and ``clip_curate.readers``.
"""
from __future__ import annotations

import logging
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
from clip_curate.writers import WriteParquetTable, embedding_dim, join, shard_count

log = logging.getLogger(__name__)


class ProgressLog(beam.DoFn):
    """Pass-through that logs rows seen (and rows/s) by this worker process every few seconds."""

    def __init__(self, label: str, every_s: float):
        self._label = label
        self._every = every_s
        self._seen = beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, f"progress_{label}")

    def setup(self):
        self._n = 0
        self._t0 = self._last = time.monotonic()

    def process(self, row):
        self._n += 1
        self._seen.inc()
        now = time.monotonic()
        if self._every and now - self._last >= self._every:
            self._last = now
            log.info("progress %-9s %8d rows  %7.1f rows/s (this worker)", self._label, self._n,
                     self._n / max(now - self._t0, 1e-9))
        yield row


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
        rows = rows | f"Progress{label}" >> beam.ParDo(ProgressLog(name, every))
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
    n_cur = shard_count(plan.estimated_rows, cfg.output.shard_rows)
    # embeddings: fixed_size_list<float32>[d], d from the model's config; no model, no embedding columns
    dim = embedding_dim(cfg.model) if cfg.model is not None and store else None
    shapes = dict(store_embeddings=store, embed_dim=dim, embeddings=cfg.model is not None)
    codec = cfg.output.parquet_compression
    rows | "WriteCurated" >> WriteParquetTable(join(out, "curated"), curated_schema(extra_fields, **shapes), n_cur,
                                               shard_prefix, "curated_rows", codec)
    all_rejected | "WriteRejected" >> WriteParquetTable(join(out, "rejected"), rejected_schema(extra_fields, **shapes),
                                                        n_cur, shard_prefix, "rejected_rows", codec)
    stats_extra: dict[str, Any] = {"stages": list(enabled), "input_format": plan.fmt}
    if identity is not None:
        stats_extra["embedding"] = identity
    if cfg.judgments:  # what the model's card switched on and off (config.resolve_judgments)
        stats_extra["judgments"] = list(cfg.judgments)
    (input_rows, rows, all_rejected) | "Stats" >> WriteStats(out, stats_extra)
    if cfg.run.audit:
        (rows, all_rejected) | "Audit" >> BiasAudit(join(out, "audit"), cfg.audit, model_config=cfg.model)
    return {"input": input_rows, "curated": rows, "rejected": all_rejected}
