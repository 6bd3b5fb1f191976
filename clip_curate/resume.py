"""``--resume``: finish a run that died (killed, preempted, out of memory) without losing or repeating rows.

What a resumed run does, before building its pipeline (``prepare_resume``):

1. **Adopt what the dead run finished.** Beam's file sinks write each bundle to a temporary file under
   ``OUT/curated/beam-temp-*/`` and ``OUT/rejected/beam-temp-*/`` and rename them into final shards only
   when the whole run succeeds, so a killed run leaves no final shards. Every temporary Parquet file with
   a valid footer is complete (the footer is written last); its rows, minus uids already in a final
   shard or in an earlier adopted file, are rewritten as final shards ``<sub>/part-a<ms>-NNNNN.parquet``
   (written under a ``_``-prefixed name, then renamed). Incomplete temporary files (cut off mid-write)
   are ignored: their rows were never accounted for and run again. The temporary directories are then
   deleted. A uid found in both a curated and a rejected temporary file (a retried bundle whose
   download succeeded only once) is adopted as curated.
2. **Skip rows already accounted for.** The uids of every final shard in ``OUT/curated`` and
   ``OUT/rejected`` are joined against the input (``SkipExisting``, a keyed CoGroupByKey, so it scales
   like the input); only the rest run through the stages.
3. **Write beside, never over.** New shards get a prefix no earlier run used (``part-r<ms>``), so
   nothing earlier is deleted or renamed, and ``stats.json`` is the earlier rows (counted from the
   Parquet files, ``output_counts``) plus this run's (``merge_counts``).

Guarantees, when every run reads the same input: each input uid ends up exactly once in
``curated ∪ rejected``; ``stats.json`` totals equal the rows in the files; a resume that is itself
killed can be resumed again (adoption is idempotent: a file adopted twice contributes nothing new).
Rows of the dead run that were in flight are processed again from scratch (downloads repeat).

Dedup spans the runs: the output's earlier rows take part in the resumed run's dedup keys as
already-decided rows (see docs/resume.md).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

log = logging.getLogger(__name__)

SUBDIRS = ("curated", "rejected")
TEMP_DIR_PATTERNS = ("beam-temp-*", ".temp-beam-*")  # Beam >= 2.x names, and older ones


def _join(base: str, *parts: str) -> str:
    return FileSystems.join(base.rstrip("/"), *parts)


def _match(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def final_shards(out_dir: str, sub: str) -> list[str]:
    """Final Parquet shards of ``OUT/<sub>`` (not the sinks' temporary files)."""
    return [p for p in _match(_join(out_dir, sub, "*.parquet")) if not os.path.basename(p).startswith(("_", "."))]


def temp_files(out_dir: str, sub: str) -> tuple[list[str], list[str]]:
    """(temporary directories, files in them) that Beam's sinks left under ``OUT/<sub>``."""
    dirs: set[str] = set()
    files: list[str] = []
    for pattern in TEMP_DIR_PATTERNS:
        for path in _match(_join(out_dir, sub, pattern, "*")):
            dirs.add(path.rsplit("/", 1)[0])
            files.append(path)
        dirs.update(_matching_dirs(_join(out_dir, sub, pattern)))
    return sorted(dirs), sorted(files)


def _matching_dirs(pattern: str) -> list[str]:
    """Directories matching ``pattern``, empty ones included (Beam's match lists files only; a run killed
    before its first bundle finished leaves empty temporary directories on local disk and HDFS-like
    file systems)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(pattern)
        return [fs.unstrip_protocol(p) if "://" in pattern else p for p in fs.glob(path) if fs.isdir(p)]
    except (OSError, ValueError, ImportError):
        return []


def _read_uids(path: str) -> list[str]:
    import pyarrow.parquet as pq

    with FileSystems.open(path) as f:
        return pq.read_table(f, columns=["uid"]).column("uid").to_pylist()


def _read_complete(path: str):
    """The table in ``path``, or None when the file is not a complete Parquet file."""
    import pyarrow.parquet as pq

    try:
        with FileSystems.open(path) as f:
            return pq.read_table(f)
    except Exception as exc:  # no footer / cut-off pages: a writer killed mid-file
        log.info("resume: ignoring incomplete temporary file %s (%s)", path, str(exc).splitlines()[0][:120])
        return None


@dataclass
class AdoptReport:
    """What ``adopt_incomplete_outputs`` did."""

    adopted_rows: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SUBDIRS})
    duplicate_rows: int = 0        # rows of temp files already present (final shards or another temp file)
    complete_files: int = 0
    incomplete_files: int = 0
    written: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"adopted_rows": dict(self.adopted_rows), "duplicate_rows": self.duplicate_rows,
                "complete_temp_files": self.complete_files, "incomplete_temp_files": self.incomplete_files}


def adopt_incomplete_outputs(out_dir: str, prefix: str | None = None) -> AdoptReport:
    """Turn the complete temporary shards a killed run left in ``OUT`` into final shards (see module doc)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    report = AdoptReport()
    found = {sub: temp_files(out_dir, sub) for sub in SUBDIRS}
    if not any(files for _, files in found.values()):
        _delete_temp_dirs(found)  # a run killed before any bundle finished leaves empty temporary directories
        return report
    prefix = prefix or unused_prefix(out_dir, "part-a")
    seen: set[str] = set()
    for sub in SUBDIRS:
        for path in final_shards(out_dir, sub):
            seen.update(_read_uids(path))
    for sub in SUBDIRS:  # curated first: a uid in both kinds of temp file is adopted as curated
        n = 0
        for path in found[sub][1]:
            table = _read_complete(path)
            if table is None:
                report.incomplete_files += 1
                continue
            report.complete_files += 1
            uids = table.column("uid").to_pylist()
            keep = []
            for i, uid in enumerate(uids):
                if uid in seen:
                    report.duplicate_rows += 1
                else:
                    seen.add(uid)
                    keep.append(i)
            if not keep:
                continue
            table = table.take(pa.array(keep, pa.int64()))
            final = _join(out_dir, sub, f"{prefix}-{n:05d}.parquet")
            staging = _join(out_dir, sub, f"_adopting-{prefix}-{n:05d}.parquet.tmp")
            with FileSystems.create(staging) as f:
                pq.write_table(table, f)
            FileSystems.rename([staging], [final])
            report.written.append(final)
            report.adopted_rows[sub] += table.num_rows
            n += 1
    _delete_temp_dirs(found)
    log.info("resume: adopted %d curated + %d rejected rows from %d complete temporary files of an earlier run "
             "(%d incomplete files ignored, %d rows already present)", report.adopted_rows["curated"],
             report.adopted_rows["rejected"], report.complete_files, report.incomplete_files,
             report.duplicate_rows)
    return report


def _delete_temp_dirs(found: dict[str, tuple[list[str], list[str]]]) -> None:
    for dirs, _ in found.values():
        if dirs:
            FileSystems.delete(dirs)


def unused_prefix(out_dir: str, stem: str) -> str:
    """``<stem><unix ms>``, distinct from every shard name already in ``OUT/curated`` and ``OUT/rejected``."""
    ms = int(time.time() * 1000)
    while True:
        prefix = f"{stem}{ms}"
        if not any(_match(_join(out_dir, sub, f"*{prefix}*")) for sub in SUBDIRS):
            return prefix
        ms += 1


def resume_prefix(out_dir: str) -> str:
    """A shard prefix distinct from every earlier run's (``part-r<unix ms>``)."""
    return unused_prefix(out_dir, "part-r")


@dataclass
class ResumeState:
    """What a resumed run needs: its shard prefix, earlier rows' counts, what was adopted."""

    prefix: str
    previous: dict[str, Any]
    adopted: AdoptReport


def prepare_resume(out_dir: str) -> ResumeState:
    """Adopt a killed run's complete temporary shards, then count what OUT already holds."""
    adopted = adopt_incomplete_outputs(out_dir)
    previous = output_counts(out_dir)
    previous["adopted"] = adopted.as_dict()
    return ResumeState(resume_prefix(out_dir), previous, adopted)


def existing_output_uids(p: beam.Pipeline, out_dir: str):
    """PCollection of uids already written to OUT/curated and OUT/rejected (empty if none)."""
    patterns = [_join(out_dir, sub, "*.parquet") for sub in SUBDIRS]
    present = [pat for pat in patterns if FileSystems.match([pat])[0].metadata_list]
    if not present:
        return p | "NoDoneUids" >> beam.Create([])
    reads = [p | f"ReadDone{i}" >> beam.io.ReadFromParquet(pat, columns=["uid"]) for i, pat in enumerate(present)]
    return tuple(reads) | "DoneRows" >> beam.Flatten() | "DoneUid" >> beam.Map(lambda r: r["uid"])


def _key_row(r):
    return r["uid"], r


def _key_done(u):
    return u, None


def _keep_new(kv):
    return [] if kv[1]["done"] else kv[1]["row"]


class SkipExisting(beam.PTransform):
    """Drop rows whose uid is in ``uids`` (a PCollection of uid strings) with a keyed join."""

    def __init__(self, uids):
        super().__init__()
        self._uids = uids

    def expand(self, rows):
        keyed = rows | "KeyByUid" >> beam.Map(_key_row)
        done = self._uids | "KeyDone" >> beam.Map(_key_done)
        return ({"row": keyed, "done": done}
                | "JoinDone" >> beam.CoGroupByKey()
                | "KeepNew" >> beam.FlatMap(_keep_new))


def output_counts(out_dir: str) -> dict[str, Any]:
    """Rows already in OUT (curated count, rejected by stage/reason), read from the final Parquet shards."""
    import pyarrow.parquet as pq

    counts: dict[str, Any] = {"curated_rows": 0, "rejected_rows": 0, "rejected_by": {}}
    for sub in SUBDIRS:
        for path in final_shards(out_dir, sub):
            with FileSystems.open(path) as f:
                if sub == "curated":
                    counts["curated_rows"] += pq.ParquetFile(f).metadata.num_rows
                    continue
                table = pq.read_table(f, columns=["stage", "reason"])
            for stage, reason in zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()):
                by = counts["rejected_by"].setdefault(stage, {})
                by[reason] = by.get(reason, 0) + 1
                counts["rejected_rows"] += 1
    return counts


def uids_in(paths: Iterable[str]) -> list[str]:
    """All uids in the given Parquet files (tests, tools)."""
    out: list[str] = []
    for path in paths:
        out.extend(_read_uids(path))
    return out
