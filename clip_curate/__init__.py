"""clip-curate: Apache Beam transforms that curate web image-caption pairs for CLIP pretraining.

The public API, imported on first use (so ``import clip_curate`` stays cheap for workers and the CLI)::

    from clip_curate.run import run          # the whole run: flags -> pipeline -> stats.json
    stats = run(["--input", "urls.parquet", "--output", "out/"])

    from clip_curate import CurateConfig, build_pipeline, CaptionFilter, Dedup  # compose your own

(``run`` is reached through its module: ``clip_curate.run`` names the module once it is imported.)
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "build_pipeline": "clip_curate.pipeline",
    "CurateConfig": "clip_curate.config",
    "RunConfig": "clip_curate.config",
    "parse_run_args": "clip_curate.config",
    "ConfigError": "clip_curate.fields",
    "ReaderConfig": "clip_curate.readers.base",
    "ReadUrlList": "clip_curate.readers.base",
    "plan_input": "clip_curate.readers.base",
    "OutputConfig": "clip_curate.writers",
    "CaptionFilter": "clip_curate.stages.caption",
    "Download": "clip_curate.stages.download",
    "DecodeResize": "clip_curate.stages.image",
    "Embed": "clip_curate.stages.embed",
    "ClipScoreFilter": "clip_curate.stages.clip_score",
    "Dedup": "clip_curate.stages.dedup",
    "SafetyCheck": "clip_curate.stages.safety",
    "BiasAudit": "clip_curate.audit.assemble",
    "ModelConfig": "clip_curate.models.clip",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'clip_curate' has no attribute {name!r}")
    module = importlib.import_module(_API[name])
    value = getattr(module, name)
    globals()[name] = value
    return value
