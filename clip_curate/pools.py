"""Inputs that already hold images: img2dataset WebDataset tars / Parquet, Hugging Face image Parquet,
and clip-curate's own output (re-filtering from stored embeddings). (Stub: being implemented.)"""
from __future__ import annotations


def detect_pool_format(path, cfg):
    """Pool format of ``path`` or None when it is a plain URL list."""
    return None


def plan_pool(cfg, fmt):
    raise NotImplementedError(fmt)


def read_pool_split(split, plan):
    raise NotImplementedError(split.fmt)
