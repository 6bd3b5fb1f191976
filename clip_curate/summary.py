"""End-of-run reporting: Beam metrics -> stats.json fields, and the summary table printed by the CLI."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from clip_curate import records

log = logging.getLogger(__name__)


def _query(result, kind: str, warn: bool = False) -> list:
    """``kind`` ("counters"/"distributions") metrics of our namespace from one result or a list of
    results (the passes of a ``--chunk-rows`` run)."""
    from apache_beam.metrics.metric import MetricsFilter

    out = []
    for r in result if isinstance(result, (list, tuple)) else [result]:
        try:
            out.extend(r.metrics().query(MetricsFilter().with_namespace(records.METRICS_NAMESPACE)).get(kind, []))
        except Exception as exc:  # some runners expose no metrics; the counts in stats.json still hold
            if warn:
                log.warning("metrics unavailable from this runner: %s", exc)
    return out


def query_counters(result) -> dict[str, int]:
    """Committed (or attempted, where the runner has no committed values) counters of our namespace."""
    out: dict[str, int] = {}
    for c in _query(result, "counters", warn=True):
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return dict(sorted(out.items()))


def stage_msecs(result) -> dict[str, float]:
    """Total busy milliseconds per stage from ``<stage>_msecs`` distributions."""
    out: dict[str, float] = {}
    for d in _query(result, "distributions"):
        name = d.key.metric.name
        value = d.committed if d.committed is not None else d.attempted
        if name.endswith("_msecs") and value is not None:
            out[name] = out.get(name, 0.0) + float(value.sum)
    return out


def slowest_hosts(result, top: int = 10) -> list[str]:
    """Hosts the downloader found slow (``download_slow_host_msecs/<host>``), slowest mean first."""
    means: dict[str, tuple[float, int]] = {}
    for d in _query(result, "distributions"):
        name = d.key.metric.name
        value = d.committed if d.committed is not None else d.attempted
        if name.startswith("download_slow_host_msecs/") and value is not None and value.count:
            host = name.split("/", 1)[1]
            total, count = means.get(host, (0.0, 0))
            means[host] = (total + value.sum, count + value.count)
    ranked = sorted(means.items(), key=lambda kv: -kv[1][0] / kv[1][1])
    return [f"{h} ({t / c / 1000:.1f} s avg, {c} req)" for h, (t, c) in ranked[:top]]


def config_dict(cfg) -> dict[str, Any]:
    def plain(obj):
        if dataclasses.is_dataclass(obj):
            return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj
    return plain(cfg)


def format_summary(stats: dict[str, Any]) -> str:
    """Human-readable end-of-run table."""
    n_in = stats["input_rows"]
    wall = stats.get("timings", {}).get("wall_seconds")
    lines = [
        f"{'input rows':<34}{n_in:>10}",
        f"{'curated rows':<34}{stats['curated_rows']:>10}  {100 * stats['curated_rows'] / max(n_in, 1):5.1f} %",
        f"{'rejected rows':<34}{stats['rejected_rows']:>10}  {100 * stats['rejected_rows'] / max(n_in, 1):5.1f} %",
    ]
    for stage, reasons in stats.get("rejected_by", {}).items():
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {stage + ' / ' + reason:<32}{n:>10}  {100 * n / max(n_in, 1):5.1f} %")
    counters = stats.get("counters", {})
    extras = [("bytes downloaded", "download_bytes"), ("DNS failures", "dns_failures"),
              ("DNS cache hits", "dns_cache_hits"), ("politeness deferrals", "politeness_deferred"),
              ("rows embedded", "embedded_rows")]
    for label, key in extras:
        if key in counters:
            lines.append(f"{label:<34}{counters[key]:>10}")
    if stats.get("slowest_hosts"):
        lines.append("slowest hosts: " + ", ".join(stats["slowest_hosts"][:5]))
    if wall:
        lines.append(f"{'wall time':<34}{wall:>9.1f}s  {n_in / max(wall, 1e-9):7.1f} rows/s")
    if "retried_rows" in stats:
        lines.append(f"{'retried rows recovered':<34}{stats['curated_rows']:>10} of {stats['retried_rows']}")
    return "\n".join(lines)
