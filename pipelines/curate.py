"""Curate an image-caption URL list with Apache Beam, in the style of Beam's example pipelines.

    python -m pipelines.curate --input urls.parquet --output out/ [--runner DataflowRunner ...]

Same flags as ``clip-curate run``; the work is done by :func:`clip_curate.run.run`.
"""
from __future__ import annotations

import logging

from clip_curate.run import run
from clip_curate.stats import format_summary

__all__ = ["run"]

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(format_summary(run()))
