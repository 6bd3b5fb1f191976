"""The pipeline's stages, one module each; importing this package registers them (see ``base``).

Pipeline order is each stage's ``position``, not the order of the imports below.
"""
from clip_curate.stages import balance, caption, clip_score, dedup, download, embed, image, safety  # noqa: F401 - registers

from clip_curate.stages.base import Stage, StageContext, get, register, registered, stage_names  # noqa: E402

__all__ = ["Stage", "StageContext", "get", "register", "registered", "stage_names"]
