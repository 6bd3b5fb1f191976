"""Reader ``curated``: a clip-curate output re-filtered (``stats.json`` + ``curated/*.parquet``, or its
``curated/`` folder).

Rows keep their processed ``image`` and embeddings, so the download and image stages are skipped and the
embed stage reuses the embeddings made by the same model. ``--include-rejected`` also reads ``rejected/``
rows that carry embeddings (except safety rejections: the image classifier would need the image, which
rejected tables do not keep). ``prepare_refilter`` refuses writing over the input and says whether the
stored embeddings are reused.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_curate import schemas as schema
from clip_curate.fields import ConfigError
from clip_curate.readers.base import InputPlan, Reader, ReaderConfig, Split, register_reader
from clip_curate.readers.pools import PoolOptions, carry, curated_root, detect_pool_format, fs_of, pool_plan
from clip_curate.stats import read_stats

log = logging.getLogger(__name__)

#: Rejected rows of a clip-curate output that a re-filter may take back (they carry embeddings and
#: every decision after the embedding can be made again from stored fields).
REFILTER_STAGES = ("clip", "dedup")


@dataclass(frozen=True)
class CuratedOptions(PoolOptions):
    """A clip-curate output re-filtered: which shards are rejected rows, which models made the embeddings."""

    rejected: tuple[str, ...] = ()
    embed_models: tuple[str, ...] = ()
    out_root: str = ""
    dedup_rows_taken_back: int = 0


def _output_parts(directory: str) -> list[str]:
    """The finished Parquet shards of an output table (not Beam temp folders)."""
    fs, d, qualify = fs_of(directory)
    if not fs.isdir(d):
        return []
    return sorted(qualify(p) for p in fs.glob(d.rstrip("/") + "/*.parquet"))


def _plan_curated(cfg: ReaderConfig) -> InputPlan:
    root = curated_root(cfg.input)
    if root is None:
        raise ConfigError(f"--input-format curated: {cfg.input!r} is not a clip-curate output "
                          "(a directory with stats.json and curated/*.parquet)")
    curated = _output_parts(root + "/curated")
    rejected = _output_parts(root + "/rejected") if cfg.include_rejected else []
    if not curated and not rejected:
        raise ConfigError(f"{root}: no curated/*.parquet to re-filter")
    declared = set(schema.field_names("curated_row"))
    rejected_only = set(schema.field_names("rejected_row")) - declared  # stage, reason, detail
    splits, estimated, sch, models = [], 0, None, set()
    taken_back = skipped = dedup_back = 0
    for path in curated + rejected:
        is_rejected = path in rejected
        try:
            with fsspec.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                meta = pf.metadata
                if not is_rejected:
                    sch = sch or pf.schema_arrow
                if "embed_model" in pf.schema_arrow.names and meta.num_row_groups:
                    models.update(v for v in pf.read_row_group(0, columns=["embed_model"]).column(0).to_pylist()
                                  if v)
                if is_rejected:
                    if "image_embedding" not in pf.schema_arrow.names:
                        skipped += meta.num_rows
                        continue
                    t = pf.read(columns=["stage", "image_embedding"])
                    ok = pc.and_(pc.is_in(t.column("stage"), pa.array(REFILTER_STAGES)),
                                         pc.is_valid(t.column("image_embedding")))
                    n_ok = pc.sum(ok).as_py() or 0
                    taken_back += n_ok
                    dedup_back += pc.sum(pc.and_(ok, pc.equal(t.column("stage"), "dedup"))).as_py() or 0
                    skipped += meta.num_rows - n_ok
                    estimated += n_ok
                else:
                    estimated += meta.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(f"cannot read {path!r}: {exc}") from None
        splits.extend(Split(path, "curated", i) for i in range(meta.num_row_groups) if meta.row_group(i).num_rows)
    if sch is None:
        with fsspec.open(rejected[0], "rb") as f:
            sch = pq.ParquetFile(f).schema_arrow
    extra, renames = carry(sch, declared | rejected_only, keep_names=True)
    has_emb = "image_embedding" in sch.names
    if cfg.include_rejected:
        log.info("input: --include-rejected: %d rejected row(s) with embeddings (stages %s) are re-curated; "
                 "%d other rejected row(s) stay in %s/rejected", taken_back, "/".join(REFILTER_STAGES), skipped,
                 root)
    log.info("input: clip-curate output %s: %d curated row(s)%s; stored embeddings: %s (model %s); "
             "download and image stages are skipped", root, estimated - taken_back,
             f" + {taken_back} rejected" if taken_back else "", "yes" if has_emb else "no",
             ", ".join(sorted(models)) or "none recorded")
    if estimated == 0:
        raise ConfigError(f"{root}: nothing to re-filter (no curated rows"
                          + (", no rejected rows with embeddings)" if cfg.include_rejected else ")"))
    return pool_plan(cfg, "curated", curated + rejected, splits, sch.names, extra, renames, estimated, "uid",
                 CuratedOptions, preprocessed=True, rejected=tuple(rejected),
                 embed_models=tuple(sorted(models)) if has_emb else (), out_root=root,
                 dedup_rows_taken_back=dedup_back)


def _read_curated(split: Split, plan: InputPlan, opts: PoolOptions) -> Iterator[dict[str, Any]]:
    from_rejected = split.path in opts.rejected
    with fsspec.open(split.path, "rb") as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=256, row_groups=[split.row_group]):
            for raw in batch.to_pylist():
                if from_rejected:
                    if raw.get("stage") not in REFILTER_STAGES or raw.get("image_embedding") is None:
                        continue
                    for k in ("stage", "reason", "detail"):
                        raw.pop(k, None)
                for k in ("image_embedding", "text_embedding"):
                    if raw.get(k) is not None:
                        raw[k] = np.asarray(raw[k], dtype=np.float32)
                raw["image"] = schema.image_bytes(raw.get("image"))  # the {bytes, path} struct, or older bytes
                raw.pop("duplicate_of", None)
                yield raw


# ---------------------------------------------------------------------------------------------
# Re-filtering a clip-curate output

def prepare_refilter(cfg, plan: InputPlan, enabled: tuple[str, ...], ident: dict[str, Any] | None):
    """The run's config for re-filtering a clip-curate output: refuse writing over the input, and say
    whether its stored embeddings are reused (same model, same preprocessing) or recomputed, and why.
    ``ident``: this run's embedding identity (None without an embedding model)."""
    opts: CuratedOptions = plan.options
    root = opts.out_root
    out = (cfg.output.output or "").rstrip("/")
    if root and out and out == str(root).rstrip("/"):
        raise ConfigError(f"--output {out!r} is the input being re-filtered; write to another directory")
    if opts.dedup_rows_taken_back and not ("dedup" in enabled and cfg.stages.dedup.dedup):
        raise ConfigError(f"--include-rejected takes back {opts.dedup_rows_taken_back} row(s) the dedup stage "
                          "rejected: run dedup (keep it in --stages, --dedup not none) or they come back as kept")
    if ident is None:
        log.info("re-filter: no embed stage; stored clip_score/embeddings are used as they are")
        return cfg
    embed_cfg = cfg.stages.embed
    stored = opts.embed_models
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
            cfg = dataclasses.replace(cfg, stages=dataclasses.replace(
                cfg.stages, embed=dataclasses.replace(embed_cfg, reuse_embeddings=False)))
        else:
            log.info("re-filter: stored embeddings made by %s are reused (no forward pass for those rows)", key)
    return cfg


def recorded_model(input_path: str | None, input_format: str = "auto") -> dict[str, Any] | None:
    """The CLIP model (``clip_model``, ``clip_pretrained``) recorded in a clip-curate output's stats.json,
    when ``input_path`` is one; None otherwise. A re-filter that names no model uses it, so that the
    stored embeddings are reused rather than recomputed with the default model."""
    if not input_path or input_format not in ("auto", "curated"):
        return None
    try:
        root = curated_root(input_path)
        if root is None:
            return None
        embed = (read_stats(root).get("config") or {}).get("stages", {}).get("embed") or {}
    except Exception:  # noqa: BLE001 - no readable stats.json: nothing recorded, the reader says the rest
        return None
    if str(embed.get("clip_model") or "none").strip().lower() == "none":
        return None
    return {"clip_model": embed["clip_model"], "clip_pretrained": embed.get("clip_pretrained")}


def _input_embedding(root: str) -> dict[str, Any] | None:
    try:
        return read_stats(root).get("embedding")
    except Exception:  # noqa: BLE001 - an output without (readable) stats.json: nothing recorded
        return None




def _plan(cfg: ReaderConfig, fmt: str = "curated") -> InputPlan:
    plan = _plan_curated(cfg)
    log.info("input: detected curated (%d shard(s), ~%d rows)", len(plan.splits), plan.estimated_rows)
    return plan


register_reader(Reader("curated", ("curated",),
                       detect=lambda cfg: "curated" if cfg.input and detect_pool_format(cfg.input, cfg) == "curated"
                       else None,
                       plan=_plan, read=lambda split, plan: _read_curated(split, plan, plan.options), priority=10,
                       prepare_run=prepare_refilter))
