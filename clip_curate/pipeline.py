"""The whole curation pipeline, composed in one place.

    read ─► caption rules ─► download ─► decode/resize ─► CLIP embed ─► CLIP score filters
         ─► dedup ─► safety ─► curated Parquet + rejected Parquet + stats.json (+ audit)

Each stage is a PTransform returning ``(kept, rejected)``; every rejected PCollection flows into the
one rejected sink, so input rows == curated rows + rejected rows.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam

from clip_curate import records
from clip_curate.options import ConfigError, opt
from clip_curate.reader import InputPlan, ReadUrlList, ReaderConfig
from clip_curate.resume import SkipExisting as _SkipExisting, existing_output_uids, resume_prefix  # noqa: F401
from clip_curate.writer import OutputConfig, WriteParquetTable, WriteStats, join, shard_count

log = logging.getLogger(__name__)

# Pipeline stages in order. Each name maps to (module, config class, transform class).
STAGES: dict[str, tuple[str, str, str]] = {
    "caption": ("clip_curate.filters", "CaptionConfig", "CaptionFilter"),
    "download": ("clip_curate.download", "DownloadConfig", "Download"),
    "image": ("clip_curate.image", "ImageConfig", "DecodeResize"),
    "embed": ("clip_curate.clip_model", "ModelConfig", None),
    "clip": ("clip_curate.filters", "ClipFilterConfig", "ClipScoreFilter"),
    "dedup": ("clip_curate.dedup", "DedupConfig", "Dedup"),
    "safety": ("clip_curate.safety", "SafetyConfig", "SafetyCheck"),
}
NEEDS_EMBEDDINGS = ("clip",)
#: Stages whose rejected rows had reached dedup: with earlier outputs (--resume, --chunk-rows) those rows
#: and every curated row take part in this run's dedup keys.
DEDUP_ONWARD = tuple(list(STAGES)[list(STAGES).index("dedup"):])


@dataclass(frozen=True)
class RunConfig:
    """Which stages run and how the run behaves."""

    stages: tuple[str, ...] = opt(("all",), "stages to run: all, none, or a subset of "
                                            + ",".join(STAGES) + " (read and write always run)")
    audit: bool = opt(False, "also compute the bias audit into OUT/audit/ at the end of the run")
    resume: bool = opt(False, "skip input rows already accounted for in OUT (curated or rejected), dedup the "
                              "new rows against OUT's rows, and write new shards beside the old ones")
    log_level: str = opt("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    progress_seconds: float = opt(10.0, "seconds between progress lines (0 = off)")
    chunk_rows: int = opt(0, "run the input in passes of about this many rows (picked by uid hash), one Beam "
                             "job each, so a local run's memory stays flat however large the input; dedup "
                             "spans the passes; 0 = one pass")

    def __post_init__(self):
        if not isinstance(self.chunk_rows, int) or self.chunk_rows < 0:
            raise ConfigError(f"--chunk-rows must be an integer >= 0 (0 = one pass), got {self.chunk_rows!r}")
        unknown = [s for s in self.stages if s not in ("all", "none") and s not in STAGES]
        if unknown:
            raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from all,none,{','.join(STAGES)}")

    def enabled(self) -> tuple[str, ...]:
        if "all" in self.stages:
            return tuple(STAGES)
        return tuple(s for s in STAGES if s in self.stages)


def stage_config_classes() -> dict[str, type]:
    """Config class of every stage whose module is importable (name -> class)."""
    out = {}
    for name, (module, cfg_cls, _) in STAGES.items():
        try:
            out[name] = getattr(importlib.import_module(module), cfg_cls)
        except (ModuleNotFoundError, AttributeError) as exc:  # stage not built in this checkout
            if getattr(exc, "name", module) not in (module, None) and not isinstance(exc, AttributeError):
                raise
            log.debug("stage %s unavailable: %s", name, exc)
    return out


def plan_passes(cfg: "CurateConfig", estimated_rows: int) -> int:
    """How many passes ``--chunk-rows`` makes of an input of ``estimated_rows`` (1 without it).

    Raises ConfigError for settings that need every row in one job."""
    if not cfg.run.chunk_rows or estimated_rows <= cfg.run.chunk_rows:
        return 1
    clip = cfg.stages.get("clip")
    if "clip" in cfg.run.enabled() and getattr(clip, "clip_top_fraction", None) is not None:
        raise ConfigError("--clip-top-fraction ranks every row of the input in one job, so it cannot run in "
                          "--chunk-rows passes: use --min-clip-score, or drop --chunk-rows (a distributed runner "
                          "keeps memory flat without it)")
    dedup = cfg.stages.get("dedup")
    if ("dedup" in cfg.run.enabled() and "semantic" in getattr(dedup, "dedup", ())
            and not cfg.output.store_embeddings):
        raise ConfigError("--dedup semantic across --chunk-rows passes compares rows with the earlier passes' "
                          "stored image_embedding: drop --no-store-embeddings (or --chunk-rows)")
    return -(-estimated_rows // cfg.run.chunk_rows)


@dataclass(frozen=True)
class CurateConfig:
    reader: ReaderConfig
    output: OutputConfig
    run: RunConfig
    stages: dict[str, Any] = field(default_factory=dict)  # stage name -> its config
    audit: Any = None  # clip_curate.audit.AuditConfig when --audit


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


def _stage_transform(name: str, cfg: Any, ctx: dict[str, Any]):
    module, _, transform_cls = STAGES[name]
    mod = importlib.import_module(module)
    if name == "embed":
        from clip_curate.embed import Embed
        return Embed(cfg)
    if name == "safety":
        return getattr(mod, transform_cls)(cfg, model_config=ctx.get("embed"))
    if name == "dedup":
        if not cfg.active:
            return None
        return getattr(mod, transform_cls)(cfg, estimated_rows=ctx.get("_estimated_rows", 100_000),
                                           prior_shards=ctx.get("_prior_shards", ()), prior_stages=DEDUP_ONWARD,
                                           embed_model=ctx.get("_embed_model"))
    if name == "clip" and not cfg.active:
        return None
    return getattr(mod, transform_cls)(cfg)


def build_pipeline(p: beam.Pipeline, cfg: CurateConfig, plan: InputPlan, shard_prefix: str = "part",
                   existing_uids=None, prior_shards: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """Add the curation graph to ``p``; returns its main PCollections (for tests and the audit).

    ``existing_uids``: uids already in the output (skipped); ``prior_shards``: ``(sub, path)`` of the
    output's earlier shards, whose rows take part in dedup as already-decided rows."""
    out = cfg.output.output
    rows, read_rejected = p | "Read" >> ReadUrlList(plan)
    input_rows = (rows, read_rejected) | "AllInputRows" >> beam.Flatten()
    if existing_uids is not None:
        rows = rows | "SkipDone" >> _SkipExisting(existing_uids)
        read_rejected = read_rejected | "SkipDoneRejected" >> _SkipExisting(existing_uids)
        input_rows = (rows, read_rejected) | "NewInputRows" >> beam.Flatten()
    rejected = [read_rejected]
    enabled = cfg.run.enabled()
    every = cfg.run.progress_seconds
    skip = set()
    if plan.has_images or plan.preprocessed:
        skip.add("download")  # rows carry their image: the downloader is never constructed
    if plan.preprocessed:
        skip.add("image")
    elif plan.has_images and "image" not in enabled and set(enabled) & {"embed", "dedup", "safety"}:
        # Pool rows carry raw image bytes; later stages read the decoded, validated, resized image.
        log.info("stages: image stage added: the pool's rows carry raw image bytes that embed/dedup/safety "
                 "read only after decode and resize")
        enabled = tuple(s for s in STAGES if s in enabled or s == "image")
    embed_cfg = cfg.stages.get("embed")
    identity = embedding_identity(embed_cfg) if "embed" in enabled and _has_model(embed_cfg) else None
    stage_cfgs = _refilter_model(cfg, plan, enabled, identity)
    for name in enabled:
        stage_cfg = stage_cfgs.get(name)
        if stage_cfg is None or name in skip:
            continue
        if name == "embed" and not _has_model(stage_cfg):
            continue
        transform = _stage_transform(name, stage_cfg, {**stage_cfgs, "_estimated_rows": plan.estimated_rows,
                                                       "_prior_shards": prior_shards,
                                                       "_embed_model": identity and identity["embed_model"]})
        if transform is None:
            continue
        rows, stage_rejected = rows | name.capitalize() >> transform
        rows = rows | f"Progress{name.capitalize()}" >> beam.ParDo(ProgressLog(name, every))
        rejected.append(stage_rejected)
        if name == "caption" and _early_caption_safety(cfg):
            # Unsafe captions under the drop policy are rejected before any image is downloaded.
            rows, early = rows | "CaptionSafety" >> beam.ParDo(
                _CaptionSafety(cfg.stages["safety"])).with_outputs(records.REJECTED_TAG, main="rows")
            rejected.append(early)
    all_rejected = (tuple(rejected) | "AllRejected" >> beam.Flatten()
                    | "ProgressRejected" >> beam.ParDo(ProgressLog("rejected", every)))
    store = cfg.output.store_embeddings
    extra = plan.extra_fields
    from clip_curate.schema import curated_schema, rejected_schema
    n_cur = shard_count(plan.estimated_rows, cfg.output.shard_rows)
    rows | "WriteCurated" >> WriteParquetTable(join(out, "curated"), curated_schema(extra, store), n_cur,
                                               shard_prefix, "curated_rows")
    all_rejected | "WriteRejected" >> WriteParquetTable(join(out, "rejected"), rejected_schema(extra, store),
                                                        n_cur, shard_prefix, "rejected_rows")
    stats_extra: dict[str, Any] = {"stages": list(enabled), "input_format": plan.fmt}
    if identity is not None:
        stats_extra["embedding"] = identity
    (input_rows, rows, all_rejected) | "Stats" >> WriteStats(out, stats_extra)
    if cfg.run.audit:
        from clip_curate.audit import BiasAudit
        embed_cfg = cfg.stages.get("embed") if "embed" in enabled else None
        (rows, all_rejected) | "Audit" >> BiasAudit(join(out, "audit"), cfg.audit, model_config=embed_cfg)
    return {"input": input_rows, "curated": rows, "rejected": all_rejected}


def _has_model(embed_cfg: Any) -> bool:
    return embed_cfg is not None and getattr(embed_cfg, "clip_model", "none") not in ("none", "")


def embedding_identity(embed_cfg: Any) -> dict[str, Any]:
    """What made a run's embeddings (recorded in stats.json ``embedding``): the ``embed_model`` key
    rows carry (model id + precision) and the model's image preprocessing."""
    from clip_curate.clip_model import embed_model_key, load_preprocess

    try:
        preprocess = " ".join(repr(load_preprocess(embed_cfg)[0]).split())
    except Exception as exc:  # noqa: BLE001 - e.g. a hub config that cannot be fetched now
        log.debug("preprocess of %s not recorded: %s", embed_cfg.clip_model, exc)
        preprocess = None
    return {"embed_model": embed_model_key(embed_cfg), "preprocess": preprocess}


def _refilter_model(cfg: CurateConfig, plan: InputPlan, enabled: tuple[str, ...],
                    ident: dict[str, Any] | None) -> dict[str, Any]:
    """Stage configs for this run; with a clip-curate output as input, say whether its stored embeddings
    are reused (same model, same preprocessing) or recomputed, and why. ``ident``: this run's
    :func:`embedding_identity` (None without an embedding model)."""
    stages = dict(cfg.stages)
    if plan.fmt != "curated":
        return stages
    opts = dict(plan.options)
    root = opts.get("out_root")
    out = (cfg.output.output or "").rstrip("/")
    if root and out and out == str(root).rstrip("/"):
        raise ConfigError(f"--output {out!r} is the input being re-filtered; write to another directory")
    dedup_cfg = stages.get("dedup")
    if opts.get("dedup_rows_taken_back") and not ("dedup" in enabled and getattr(dedup_cfg, "dedup", ())):
        raise ConfigError(f"--include-rejected takes back {opts['dedup_rows_taken_back']} row(s) the dedup stage "
                          "rejected: run dedup (keep it in --stages, --dedup not none) or they come back as kept")
    if ident is None:
        log.info("re-filter: no embed stage; stored clip_score/embeddings are used as they are")
        return stages
    embed_cfg = stages["embed"]
    stored = tuple(opts.get("embed_models") or ())
    key = ident["embed_model"]
    if not embed_cfg.reuse_embeddings:
        log.info("re-filter: --no-reuse-embeddings: every row is embedded again with %s", key)
    elif not stored:
        log.info("re-filter: the input holds no stored embeddings: every row is embedded with %s from its "
                 "stored image", key)
    elif key not in stored:
        log.warning("re-filter: stored embeddings were made by %s, this run uses %s: they are recomputed from "
                    "the stored images (rows without an image are rejected embed/embed_error)",
                    ", ".join(stored), key)
    else:
        previous = _input_embedding(root)
        if previous and previous.get("embed_model") == key and previous.get("preprocess") and \
                ident["preprocess"] and previous["preprocess"] != ident["preprocess"]:
            log.warning("re-filter: %s preprocessed images differently when the input was made (%s; now %s): "
                        "embeddings are recomputed", key, previous["preprocess"], ident["preprocess"])
            stages["embed"] = dataclasses.replace(embed_cfg, reuse_embeddings=False)
        else:
            log.info("re-filter: stored embeddings made by %s are reused (no forward pass for those rows)", key)
    return stages


def _input_embedding(root: str) -> dict[str, Any] | None:
    from clip_curate.writer import read_stats

    try:
        return read_stats(root).get("embedding")
    except Exception:  # noqa: BLE001 - an output without (readable) stats.json: nothing recorded
        return None


def _early_caption_safety(cfg: CurateConfig) -> bool:
    safety = cfg.stages.get("safety")
    return (safety is not None and "safety" in cfg.run.enabled() and safety.nsfw_policy == "drop"
            and safety.caption_safety)


class _CaptionSafety(beam.DoFn):
    """Reject captions matching the unsafe word list (``caption/unsafe_caption``), before download."""

    def __init__(self, safety_cfg):
        self._cfg = safety_cfg
        self._dropped = beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, "caption_unsafe_caption")

    def setup(self):
        from clip_curate.safety import load_wordlist
        self._words = load_wordlist(self._cfg.unsafe_words)

    def process(self, row):
        from clip_curate.safety import caption_unsafe_term
        term = caption_unsafe_term(row.get("caption"), self._words)
        if term:
            self._dropped.inc()
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG,
                                           records.reject(row, "caption", "unsafe_caption", f"term={term!r}"))
        else:
            yield row


def validate_stage_configs(cfg: CurateConfig) -> None:
    """Checks that need more than a config's own fields (files, models), run before any work starts."""
    for name in cfg.run.enabled():
        stage_cfg = cfg.stages.get(name)
        check = getattr(stage_cfg, "validate_environment", None)
        if callable(check):
            check()
    if "embed" in cfg.stages and "embed" in cfg.run.enabled():
        from clip_curate.clip_model import validate_model_config
        if getattr(cfg.stages["embed"], "clip_model", "none") not in ("none", ""):
            validate_model_config(cfg.stages["embed"])
