"""``clip-curate export``: curated Parquet -> WebDataset tar shards for open_clip training.

Each curated row becomes three tar members sharing the key ``{uid}``: ``{uid}.jpg`` (the stored
image bytes, untouched), ``{uid}.txt`` (the caption, UTF-8) and ``{uid}.json`` (every scalar column:
scores, sizes, hashes, language, carried input columns; no image bytes, no embeddings). Shards are
``00000.tar``, ``00001.tar``, ... with ``--shard-size`` rows each (the last one shorter), so
open_clip reads them with ``--train-data 'DIR/{00000..NNNNN}.tar'``. Beside them:

- ``manifest.json``: source, shard size, rows per shard, total, skipped rows, the brace pattern;
- ``sizes.json``: ``{shard file name: rows}``, the file open_clip's ``get_dataset_size`` looks for,
  so ``--train-num-samples`` may be left out.

The writer streams: it reads the Parquet files one record batch at a time (only the columns it
writes) and writes each tar member as it goes, so memory stays at one batch whatever the corpus
size. Input and output may be any fsspec path (local, ``gs://``, ``s3://``, ``memory://``...).

Why a streaming writer and not a Beam pipeline: the export decodes nothing (JPEG bytes are copied
as they are), so it runs at disk/network speed on one core, and open_clip's brace pattern needs
contiguous shard numbers with exact counts, which a single ordered pass gives for free. For very
large corpora, run several exports over disjoint ``--input`` globs into separate directories
(each gets its own numbering and ``sizes.json``) and pass open_clip their patterns joined by ``::``.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import posixpath
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import fsspec
import pyarrow.parquet as pq

from clip_curate.fields import ConfigError, OneLineParser
from clip_curate.preflight import probe_output
from clip_curate.schemas import image_bytes

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SIZES_FILE = "sizes.json"
FORMATS = ("webdataset", "datacomp-uids")
#: Columns never written to ``{uid}.json`` (bytes and vectors).
EXCLUDED_META = ("image", "image_embedding", "text_embedding")
_IMAGE_EXT = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"RIFF", "webp"))


@dataclass
class ExportResult:
    """What an export wrote: shard paths, rows per shard and the open_clip brace pattern."""

    output: str
    shards: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def pattern(self) -> str:
        """``DIR/{00000..00009}.tar`` (or ``DIR/00000.tar`` for one shard), open_clip's ``--train-data``."""
        if not self.shards:
            return ""
        if len(self.shards) == 1:
            return self.shards[0]
        first = posixpath.basename(self.shards[0])[:-4]
        last = posixpath.basename(self.shards[-1])[:-4]
        return f"{self.output.rstrip('/')}/{{{first}..{last}}}.tar"


def shard_name(index: int) -> str:
    return f"{index:05d}.tar"


def sample_key(uid: str) -> str:
    """WebDataset key for a uid: ``.`` and ``/`` would split the key, so they become ``_``."""
    return str(uid).replace("/", "_").replace(".", "_")


def image_extension(data: bytes) -> str:
    """``jpg`` / ``png`` / ``webp`` from the magic bytes (curated images are JPEG: ``jpg``)."""
    for magic, ext in _IMAGE_EXT:
        if data[: len(magic)] == magic:
            return ext
    return "jpg"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return None
    return value


def list_parquet_files(path: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The Parquet files of ``path``: a file, a glob, a curated directory, or an output ``OUT``
    (then ``OUT/curated``). Any fsspec path."""
    try:
        fs, root = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"--input {path!r}: cannot open ({exc})") from None
    if any(c in root for c in "*?["):
        files = sorted(p for p in fs.glob(root) if p.endswith(".parquet"))
    elif fs.isdir(root):
        if fs.isdir(posixpath.join(root, "curated")):
            root = posixpath.join(root, "curated")
        files = sorted(p for p in fs.find(root) if p.endswith(".parquet")
                       and not posixpath.basename(p).startswith((".", "_")))
    elif fs.exists(root):
        files = [root]
    else:
        raise ConfigError(f"--input {path!r}: not found; pass OUT/curated of a clip-curate run")
    if not files:
        raise ConfigError(f"--input {path!r}: no .parquet files; pass OUT/curated of a clip-curate run")
    return fs, files


def iter_rows(path: str, batch_rows: int = 256) -> Iterator[dict[str, Any]]:
    """Stream the rows of curated Parquet ``path`` (see :func:`list_parquet_files`) as dicts without
    the embedding columns, one record batch in memory at a time."""
    fs, files = list_parquet_files(path)
    for f in files:
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            for need in ("uid", "caption", "image"):
                if need not in names:
                    raise ConfigError(f"--input: {f} has no {need!r} column; expected clip-curate curated rows "
                                      f"(schemas/curated_row.json)")
            columns = [n for n in names if n not in ("image_embedding", "text_embedding")]
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                yield from batch.to_pylist()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o444
    info.uname = info.gname = "clip-curate"
    tar.addfile(info, io.BytesIO(data))


def sample_members(row: dict[str, Any]) -> list[tuple[str, bytes]]:
    """``[(name, bytes)]`` tar members of one curated row (image, caption, metadata JSON)."""
    key = sample_key(row["uid"])
    image = image_bytes(row["image"])
    meta = {k: _jsonable(v) for k, v in row.items() if k not in EXCLUDED_META}
    meta["key"] = key
    return [
        (f"{key}.{image_extension(image)}", image),
        (f"{key}.txt", (row.get("caption") or "").encode("utf-8")),
        (f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")),
    ]


def _check_output(fs: fsspec.AbstractFileSystem, out: str, overwrite: bool) -> None:
    if fs.exists(out) and not fs.isdir(out):
        raise ConfigError(f"--output {out!r} is a file; pass a directory")
    if fs.isdir(out):
        entries = [p for p in fs.ls(out, detail=False)
                   if not posixpath.basename(p.rstrip("/")).startswith(".clip-curate-write-probe-")]
        if entries and not overwrite:
            shown = ", ".join(posixpath.basename(p.rstrip("/")) for p in entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ConfigError(f"--output {out!r} is not empty ({shown}); pass --overwrite to replace its shards, or "
                              "an empty directory")
        for p in entries:  # the shards, manifest and sizes of an earlier export
            if p.endswith((".tar", MANIFEST_FILE, SIZES_FILE)):
                fs.rm(p)
    fs.makedirs(out, exist_ok=True)


def export_webdataset(input_path: str, output: str, *, shard_size: int = 10_000, overwrite: bool = False,
                      batch_rows: int = 256, progress_seconds: float = 10.0) -> ExportResult:
    """Write the curated rows of ``input_path`` as WebDataset shards under ``output`` (any fsspec paths).

    Rows without image bytes are skipped and counted (``skipped["no_image"]``); a uid seen twice in a
    shard would merge two samples in a WebDataset reader, so the later one is skipped and counted
    (``skipped["duplicate_uid"]``). Writes ``manifest.json`` and ``sizes.json`` last.
    """
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    rows = iter_rows(input_path, batch_rows)  # validates --input before anything is written
    first = next(rows, None)
    probe_output(output, "--output", api="fsspec")  # a file, an unwritable directory or parent: one line
    fs, out = fsspec.core.url_to_fs(output)
    _check_output(fs, out, overwrite)
    result = ExportResult(output=output.rstrip("/"))
    t0 = last = time.time()
    tar = fh = None
    keys: set[str] = set()

    def close() -> None:
        nonlocal tar, fh
        if tar is not None:
            tar.close()
            fh.close()
            tar = fh = None

    def all_rows():
        if first is not None:
            yield first
        yield from rows

    try:
        for row in all_rows():
            if not image_bytes(row.get("image")):
                result.skipped["no_image"] = result.skipped.get("no_image", 0) + 1
                continue
            if tar is None or result.counts[-1] >= shard_size:
                close()
                name = shard_name(len(result.shards))
                path = posixpath.join(out, name)
                fh = fs.open(path, "wb")
                tar = tarfile.open(fileobj=fh, mode="w|")
                result.shards.append(posixpath.join(result.output, name))
                result.counts.append(0)
                keys = set()
            key = sample_key(row["uid"])
            if key in keys:
                result.skipped["duplicate_uid"] = result.skipped.get("duplicate_uid", 0) + 1
                continue
            keys.add(key)
            for member, data in sample_members(row):
                _add_member(tar, member, data, t0)
            result.counts[-1] += 1
            if progress_seconds and time.time() - last >= progress_seconds:
                last = time.time()
                log.info("export: %d rows in %d shards (%.0f rows/s)", result.total, len(result.shards),
                         result.total / max(1e-9, last - t0))
    finally:
        close()
    result.seconds = time.time() - t0
    manifest = {
        "format": "webdataset", "source": input_path, "output": result.output, "shard_size": shard_size,
        "total_rows": result.total, "num_shards": len(result.shards), "pattern": result.pattern,
        "skipped": result.skipped,
        "shards": [{"name": posixpath.basename(s), "rows": c} for s, c in zip(result.shards, result.counts)],
        "members": {"image": "{key}.jpg (stored JPEG bytes)", "caption": "{key}.txt",
                    "metadata": "{key}.json (scalar columns; no image bytes or embeddings)"},
    }
    with fs.open(posixpath.join(out, SIZES_FILE), "w") as f:
        json.dump({m["name"]: m["rows"] for m in manifest["shards"]}, f, indent=1)
    with fs.open(posixpath.join(out, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
    return result


def build_arg_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="clip-curate export",
                                description="Write curated rows as WebDataset tar shards for open_clip training.")
    p.add_argument("--input", required=True, help="curated Parquet: OUT/curated (or OUT, a file, a glob); any fsspec path")
    p.add_argument("--output", required=True, help="webdataset: directory for NNNNN.tar shards, manifest.json, sizes.json; "
                                                      "datacomp-uids: FILE.npy")
    p.add_argument("--format", default="webdataset", choices=FORMATS,
                   help="webdataset (tar shards for open_clip) or datacomp-uids (the sorted uid .npy of DataComp's "
                        "resharder)")
    p.add_argument("--shard-size", type=int, default=10_000, help="rows per tar shard (default: 10000)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``clip-curate export``; returns the exit code (user mistakes raise ``ConfigError``)."""
    args = build_arg_parser().parse_args(argv)
    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format!r}: unknown; choose from {', '.join(FORMATS)}")
    if args.format == "datacomp-uids":
        return _export_uids(args.input, args.output, args.overwrite)
    result = export_webdataset(args.input, args.output, shard_size=args.shard_size, overwrite=args.overwrite)
    if not result.total:
        print(f"exported 0 rows (skipped: {json.dumps(result.skipped)}); nothing to train on", file=sys.stderr)
    print(f"exported {result.total} rows in {len(result.shards)} shards to {result.output} "
          f"({result.seconds:.1f}s; skipped: {json.dumps(result.skipped)})")
    print(f"manifest: {posixpath.join(result.output, MANIFEST_FILE)}")
    if result.total:
        print("open_clip: python -m open_clip_train.main --dataset-type webdataset "
              f"--train-data '{result.pattern}' --train-num-samples {result.total} ...")
    return 0


def _export_uids(input_path: str, output: str, overwrite: bool) -> int:
    """``--format datacomp-uids``: OUTPUT is one ``.npy`` file (DataComp's ``--subset-file``)."""
    import fsspec

    from clip_curate.datacomp import curated_uids, write_uids

    if not output.endswith(".npy"):
        raise ConfigError(f"--output {output!r}: --format datacomp-uids writes one .npy file; name it FILE.npy")
    fs, path = fsspec.core.url_to_fs(output)
    if fs.exists(path) and not overwrite:
        raise ConfigError(f"--output {output!r} exists; pass --overwrite to replace it")
    n = write_uids(curated_uids(input_path), output)
    print(f"exported {n} uids to {output} (sorted (u8, u8) pairs, DataComp's resharder --subset-file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
