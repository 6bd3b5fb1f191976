"""Checks of the run's input and output made before any work starts (after planning, before any download).

``preflight(cfg, plan)`` raises ConfigError (one line, exit 2) for what would otherwise fail mid-run.
"""
from __future__ import annotations

from typing import Any


def preflight(cfg: Any, plan: Any) -> None:
    """Check the output can be written and (with ``--strict-input``) that every split can be read."""
