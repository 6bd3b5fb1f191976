"""Run a curation: parse flags, plan the input, build the pipeline, run it (in passes), finish stats.json.

    python -m clip_curate.run --input urls.parquet --output out/ [--runner DataflowRunner ...]

Same flags as ``clip-curate run`` (``pipelines/curate.py`` is the Beam-examples style entry point).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, TypeOptions

from clip_curate import readers as _readers  # noqa: F401 - registers the built-in readers
from clip_curate.audit.assemble import run_audit
from clip_curate.config import check_environment, parse_run_args, plan_passes
from clip_curate.fork_workers import ForkingFnApiRunner, ForkServer, fork_server_for
from clip_curate.pipeline import build_pipeline
from clip_curate.preflight import preflight
from clip_curate.readers.base import plan_input
from clip_curate.resume import SUBDIRS, existing_output_uids, final_shards, prepare_resume
from clip_curate.stats import finish_stats, format_summary
from clip_curate.writers import claim_output

log = logging.getLogger("clip_curate")


def run(argv: Sequence[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Parse flags, build the pipeline, run it to completion; returns the final stats.json content.

    With ``--chunk-rows N`` the input runs as ``ceil(rows / N)`` passes, one Beam job each: pass k reads
    the rows whose uid hash is k mod passes, and runs like a ``--resume`` of the passes before it (their
    rows are skipped, and take part in dedup as already-decided rows)."""
    cfg, beam_args = parse_run_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger().setLevel(cfg.run.log_level)
    if cfg.run.log_level != "DEBUG":  # one line per type hint it converts: noise unless debugging
        logging.getLogger("apache_beam.typehints.native_type_compatibility").setLevel(logging.WARNING)
    plan = plan_input(cfg.reader)                 # fails fast on bad input
    preflight(cfg, plan)                          # the output can be written; the input can be read
    check_environment(cfg)                        # e.g. model exists, before any download work
    options = _ViewCachingOptions(beam_args)
    if _is_direct(options):
        check_direct_mode(cfg, options)
    passes = plan_passes(cfg, plan.estimated_rows)
    claim_output(cfg.output.output, resume=cfg.run.resume, overwrite=cfg.output.overwrite,  # empty, or cleared
                 inputs=(cfg.reader.input, cfg.reader.retry_from))
    if passes > 1 and test_pipeline is not None:
        raise ValueError("--chunk-rows runs one pipeline per pass; it cannot use a given test pipeline")
    options.view_as(SetupOptions).save_main_session = False
    if _is_direct(options):
        # Beam's DirectRunner first tries Prism (downloading a binary from GitHub); we want its
        # FnApiRunner path, which honours --direct_num_workers/--direct_running_mode. The DirectRunner
        # skips Prism for pipelines that allow unsafe triggers (we use no triggers at all).
        options.view_as(TypeOptions).allow_unsafe_triggers = True
    t0 = time.time()
    results = []
    with fork_server_for(options if test_pipeline is None else PipelineOptions([])) as fork_server:
        for k in range(passes):
            pass_plan = plan
            if passes > 1:
                pass_plan = dataclasses.replace(plan, part=(k, passes),
                                                estimated_rows=max(1, -(-plan.estimated_rows // passes)))
                log.info("pass %d/%d: rows whose uid hash is %d mod %d (~%d rows)", k + 1, passes, k, passes,
                         pass_plan.estimated_rows)
            pass_cfg = cfg if passes == 1 else dataclasses.replace(
                cfg, run=dataclasses.replace(cfg.run, audit=False, resume=cfg.run.resume or k > 0))
            # stats.json counts the last job's rows; ``previous`` (its resume state) counts everything before it
            result, previous = _run_pass(pass_cfg, pass_plan, options, test_pipeline, fork_server)
            results.append(result)
    wall = time.time() - t0
    if passes > 1 and cfg.run.audit:
        run_audit(cfg.output.output, beam_args=beam_args, config=cfg.audit)
    return finish_stats(cfg.output.output, results, wall, cfg, previous, passes=passes,
                        retried=bool(cfg.reader.retry_from))


def _run_pass(cfg, plan, options: PipelineOptions, test_pipeline: beam.Pipeline | None = None,
              fork_server: ForkServer | None = None):
    """Build and run one pipeline over ``plan``; returns (result, counts of the output before it ran or
    None when not resuming). ``fork_server``: the run's, where its workers are forked."""
    p = test_pipeline or beam.Pipeline(runner=_runner(options, fork_server), options=options)
    prefix, done_uids, previous, prior = "part", None, None, ()
    if cfg.run.resume:
        state = prepare_resume(cfg.output.output)   # adopts a killed run's complete temp shards first
        prefix, previous = state.prefix, state.previous
        done_uids = existing_output_uids(p, cfg.output.output)
        prior = tuple((sub, path) for sub in SUBDIRS for path in final_shards(cfg.output.output, sub))
    build_pipeline(p, cfg, plan, shard_prefix=prefix, existing_uids=done_uids, prior_shards=prior)
    result = p.run()
    result.wait_until_finish()
    return result, previous


class _ViewCachingOptions(PipelineOptions):
    """PipelineOptions whose ``view_as`` returns one view per options class. Beam's builds a new view (a
    parser of every Beam flag) on each call, ~500 times while a download,image pipeline is built (~0.4 CPU s);
    views share one option store, so a kept view sees every later change as a new one would."""

    def view_as(self, cls):
        views = self.__dict__.setdefault("_cached_views", {})
        view = views.get(cls)
        if view is None:
            view = views[cls] = super().view_as(cls)
        return view

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_cached_views", None)
        return state


def _runner(options: PipelineOptions, fork_server: ForkServer | None):
    """None (Beam picks from ``--runner``), or with a fork server the FnApiRunner the DirectRunner would
    pick, its workers forked from the main process (``fork_workers``)."""
    if fork_server is None:
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    # as the DirectRunner builds it (direct_runner.py): the workers read the options from provision_info
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return ForkingFnApiRunner(fork_server, provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def check_direct_mode(cfg, options: PipelineOptions) -> None:
    """Each enabled stage's ``check_direct`` for the DirectRunner's running mode and worker count (e.g. a
    mode known to lose a stage's rows): a one-line ConfigError before any work."""
    from apache_beam.options.pipeline_options import DirectOptions

    from clip_curate.stages.base import registered

    direct = options.view_as(DirectOptions)
    mode, workers = str(direct.direct_running_mode or "in_memory"), int(direct.direct_num_workers or 1)
    for stage in registered():
        if stage.name in cfg.run.enabled() and stage.check_direct is not None:
            stage.check_direct(cfg.stage(stage.name), cfg, mode, workers)


def _is_direct(options: PipelineOptions) -> bool:
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    return runner is None or str(runner).split(".")[-1] in ("DirectRunner", "BundleBasedDirectRunner")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(format_summary(run()))
