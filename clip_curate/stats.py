"""OUT/stats.json from start to end: the counts the pipeline writes, Beam metrics and timings added after
the run, counts merged across resumed runs and passes, and the summary table printed by the CLI."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Mapping

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from clip_curate import records

#: Transient key of a rejected record that stands for a damaged input source (set by the Read transform,
#: never written to Parquet); WriteStats lists these in stats.json ``damaged_sources``.
DAMAGE_KEY = "damaged_source"

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
    damaged = stats.get("damaged_sources", [])
    if damaged:
        lines.append(f"damaged input sources ({len(damaged)}; rows before the damage were read):")
        lines.extend(f"  {d}" for d in damaged[:MAX_SUMMARY_DAMAGE])
        if len(damaged) > MAX_SUMMARY_DAMAGE:
            lines.append(f"  ... and {len(damaged) - MAX_SUMMARY_DAMAGE} more (stats.json damaged_sources)")
    lines.extend(str(j) for j in stats.get("judgments", []))
    lines.extend(summary_hints(stats))
    return "\n".join(lines)


#: What usually causes a reason that dominates a run, and the flag that changes it (``(stage, reason)``).
HINTS = {
    ("download", "blocked_address"): "URLs resolve to loopback/private/link-local addresses, refused by the SSRF "
                                     "guard; if those hosts are yours, pass --allow-private-addresses or "
                                     "--allow-networks CIDR",
    ("download", "dns_error"): "host names did not resolve: check the network and DNS, or map names to addresses "
                               "with --resolve HOST:IP",
    ("download", "robots_unavailable"): "robots.txt could not be fetched (the rows were not downloaded): re-run "
                                        "those rows later with --retry-from OUT",
}

#: Share of the input rows one reason must reach before the summary explains it.
HINT_SHARE = 0.5


def summary_hints(stats: dict[str, Any]) -> list[str]:
    """One line per rejection reason that holds at least HINT_SHARE of the input rows and has a known cause:
    what usually causes it and the flag that changes it."""
    n_in = max(int(stats.get("input_rows") or 0), 1)
    out = []
    for stage, reasons in stats.get("rejected_by", {}).items():
        for reason, n in reasons.items():
            hint = HINTS.get((stage, reason))
            if hint and n / n_in >= HINT_SHARE:
                out.append(f"hint: {100 * n / n_in:.0f} % of rows are {stage}/{reason}: {hint}")
    return out


#: Damaged sources listed in the summary (stats.json lists every one).
MAX_SUMMARY_DAMAGE = 10


# ---------------------------------------------------------------------------------------------
# stats.json

def _join(base: str, *parts: str) -> str:
    return FileSystems.join(base.rstrip("/"), *parts)


def _stats_record(_, out_dir: str, input_rows: int, curated_rows: int, rejected_by: list, extra: dict,
                  damaged: list | None = None) -> None:
    by: dict[str, dict[str, int]] = {}
    for (stage, reason), n in sorted(rejected_by):
        by.setdefault(stage, {})[reason] = n
    rejected = sum(n for _, n in rejected_by)
    stats = {"input_rows": input_rows, "curated_rows": curated_rows, "rejected_rows": rejected,
             "rejected_by": by, "timings": {},
             **{k: dict(v) if isinstance(v, Mapping) else v for k, v in extra.items()}}  # e.g. EmbeddingIdentity
    # Sources that could not be read to their end: this job's, and those an earlier job over the same output
    # listed (a --resume, or the passes before this one of a --chunk-rows run, whose rows this job skips).
    damaged = set(damaged or ()) | set(_earlier_damage(out_dir))
    if damaged:
        stats["damaged_sources"] = sorted(damaged)
    with FileSystems.create(_join(out_dir, "stats.json")) as f:
        f.write(json.dumps(stats, indent=2, sort_keys=True).encode())


class WriteStats(beam.PTransform):
    """Count input, curated and rejected rows (by stage and reason) with combiners -> OUT/stats.json."""

    def __init__(self, out_dir: str, extra: dict[str, Any] | None = None):
        super().__init__()
        self._out_dir = out_dir
        self._extra = extra or {}

    def expand(self, pcolls):
        input_rows, curated, rejected = pcolls
        n_in = input_rows | "CountInput" >> beam.combiners.Count.Globally()
        n_cur = curated | "CountCurated" >> beam.combiners.Count.Globally()
        by = (rejected
              | "StageReason" >> beam.Map(lambda r: (r["stage"], r["reason"]))
              | "CountByReason" >> beam.combiners.Count.PerElement()
              | "AsList" >> beam.combiners.ToList())
        damaged = (rejected
                   | "Damaged" >> beam.FlatMap(lambda r: [r[DAMAGE_KEY]] if r.get(DAMAGE_KEY) else [])
                   | "DamagedList" >> beam.combiners.ToList())
        return (
            n_in.pipeline
            | "Once" >> beam.Create([None])
            | "WriteStatsJson" >> beam.Map(
                _stats_record, self._out_dir, beam.pvalue.AsSingleton(n_in), beam.pvalue.AsSingleton(n_cur),
                beam.pvalue.AsSingleton(by), self._extra, beam.pvalue.AsSingleton(damaged))
        )


def _earlier_damage(out_dir: str) -> list[str]:
    """``damaged_sources`` of the stats.json already in ``out_dir`` (none when there is none)."""
    try:
        return list(read_stats(out_dir).get("damaged_sources", []))
    except Exception:  # noqa: BLE001 - no (readable) stats.json: nothing listed before
        return []


def read_stats(out_dir: str) -> dict[str, Any]:
    with FileSystems.open(_join(out_dir, "stats.json")) as f:
        return json.loads(f.read().decode())


def update_stats(out_dir: str, **updates: Any) -> dict[str, Any]:
    """Merge ``updates`` into OUT/stats.json (used after the run for wall time and metrics)."""
    stats = read_stats(out_dir)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(stats.get(key), dict):
            stats[key].update(value)
        else:
            stats[key] = value
    with FileSystems.create(_join(out_dir, "stats.json")) as f:
        f.write(json.dumps(stats, indent=2, sort_keys=True).encode())
    return stats


def merge_counts(stats: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """stats of a resumed run + rows written by earlier runs = stats of the whole output."""
    merged = dict(stats)
    merged["curated_rows"] = stats["curated_rows"] + previous["curated_rows"]
    merged["rejected_rows"] = stats["rejected_rows"] + previous["rejected_rows"]
    merged["input_rows"] = stats["input_rows"] + previous["curated_rows"] + previous["rejected_rows"]
    by = {s: dict(r) for s, r in stats["rejected_by"].items()}
    for stage, reasons in previous["rejected_by"].items():
        for reason, n in reasons.items():
            by.setdefault(stage, {})[reason] = by.get(stage, {}).get(reason, 0) + n
    merged["rejected_by"] = by
    merged["resumed"] = {"previous_rows": previous["curated_rows"] + previous["rejected_rows"],
                         "new_rows": stats["input_rows"]}
    if "adopted" in previous:
        merged["resumed"]["adopted_from_killed_run"] = previous["adopted"]
    return merged


def collect_stage_stats(out_dir: str) -> dict[str, Any]:
    """What stages wrote to ``OUT/_stage_stats/<stage>.json`` during the run (e.g. ``balance``), by stage
    name; the files are removed once read."""
    found: dict[str, Any] = {}
    pattern = _join(out_dir, "_stage_stats", "*.json")
    paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    for path in sorted(paths):
        with FileSystems.open(path) as f:
            found[path.rsplit("/", 1)[-1][: -len(".json")]] = json.loads(f.read().decode())
    if paths:
        FileSystems.delete(paths)
    return found


def finish_stats(out_dir: str, results: list, wall_seconds: float, config: Any, previous: dict[str, Any] | None,
                 passes: int = 1, retried: bool = False) -> dict[str, Any]:
    """After the last job: the whole output's counts (``previous``: counts of the output before this run,
    when resuming), Beam metrics, timings and the run's config -> OUT/stats.json. Checks the row
    accounting (input == curated + rejected) and returns the final content."""
    counters = query_counters(results)
    stats = read_stats(out_dir)
    stats.update(collect_stage_stats(out_dir))
    if previous is not None:
        stats = merge_counts(stats, previous)
    if retried:
        stats["retried_rows"] = stats["input_rows"]
    stats.pop("timings", None)
    extra = {"passes": passes} if passes > 1 else {}
    stats = update_stats(out_dir, **stats, **extra,
                         timings={"wall_seconds": round(wall_seconds, 3), **stage_msecs(results)},
                         counters=counters, config=config_dict(config), slowest_hosts=slowest_hosts(results),
                         embedded_rows=counters.get("embedded_rows", 0))
    if stats["input_rows"] != stats["curated_rows"] + stats["rejected_rows"]:
        raise RuntimeError(f"row accounting broken: {stats['input_rows']} in != "
                           f"{stats['curated_rows']} curated + {stats['rejected_rows']} rejected")
    return stats
