"""Curate an image-caption URL list with Apache Beam.

    python -m pipelines.curate --input urls.parquet --output out/ [--runner DataflowRunner ...]

Same flags as ``clip-curate run``.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, TypeOptions

from clip_curate import records, summary
from clip_curate.config import parse_run_args
from clip_curate.pipeline import build_pipeline, validate_stage_configs
from clip_curate.reader import plan_input
from clip_curate.resume import existing_output_uids, merge_counts, prepare_resume
from clip_curate.writer import read_stats, update_stats

log = logging.getLogger("clip_curate")


def run(argv: Sequence[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Parse flags, build the pipeline, run it to completion; returns the final stats.json content."""
    cfg, beam_args = parse_run_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger().setLevel(cfg.run.log_level)
    if cfg.run.log_level != "DEBUG":  # one line per type hint it converts: noise unless debugging
        logging.getLogger("apache_beam.typehints.native_type_compatibility").setLevel(logging.WARNING)
    plan = plan_input(cfg.reader)                 # fails fast on bad input
    validate_stage_configs(cfg)                   # e.g. model exists, before any download work
    options = PipelineOptions(beam_args)
    options.view_as(SetupOptions).save_main_session = False
    prefix, done_uids, previous = "part", None, None
    t0 = time.time()
    if _is_direct(options):
        # Beam's DirectRunner first tries Prism (downloading a binary from GitHub); we want its
        # FnApiRunner path, which honours --direct_num_workers/--direct_running_mode. The DirectRunner
        # skips Prism for pipelines that allow unsafe triggers (we use no triggers at all).
        options.view_as(TypeOptions).allow_unsafe_triggers = True
    p = test_pipeline or beam.Pipeline(options=options)
    if cfg.run.resume:
        state = prepare_resume(cfg.output.output)   # adopts a killed run's complete temp shards first
        prefix, previous = state.prefix, state.previous
        done_uids = existing_output_uids(p, cfg.output.output)
    build_pipeline(p, cfg, plan, shard_prefix=prefix, existing_uids=done_uids)
    result = p.run()
    result.wait_until_finish()
    wall = time.time() - t0
    counters = summary.query_counters(result)
    stats = read_stats(cfg.output.output)
    if previous is not None:
        stats = merge_counts(stats, previous)
    if cfg.reader.retry_from:
        stats["retried_rows"] = stats["input_rows"]
    stats.pop("timings", None)
    stats = update_stats(cfg.output.output, **stats, timings={"wall_seconds": round(wall, 3),
                                                               **summary.stage_msecs(result)},
                         counters=counters, config=summary.config_dict(cfg),
                         slowest_hosts=summary.slowest_hosts(result),
                         embedded_rows=counters.get("embedded_rows", 0))
    if stats["input_rows"] != stats["curated_rows"] + stats["rejected_rows"]:
        raise RuntimeError(f"row accounting broken: {stats['input_rows']} in != "
                           f"{stats['curated_rows']} curated + {stats['rejected_rows']} rejected")
    return stats


def _is_direct(options: PipelineOptions) -> bool:
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    return runner is None or str(runner).split(".")[-1] in ("DirectRunner", "BundleBasedDirectRunner")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(summary.format_summary(run()))
