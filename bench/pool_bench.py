"""Curating a pool already on disk: a WebDataset pool in img2dataset's layout, end to end, then a re-filter.

1. Build the pool (no network): N synthetic scenes (clip_curate.synthetic.world) written straight into tar shards of
   ``--shard-size`` samples as ``{key}.jpg`` / ``{key}.txt`` / ``{key}.json``, with img2dataset's metadata
   Parquet beside each shard (including ``--failed-fraction`` of failed downloads, which are never in the
   tar). Captions: 70 % matched, 15 % random and 15 % hard (one attribute changed) mismatches.
2. ``clip-curate run --input POOL`` with the bundled synthetic-tiny model and every stage (caption rules,
   image decode/resize, embed, CLIP score, exact + near dedup, safety): images/s and the peak RSS of the
   process tree (sum over the DirectRunner's worker processes).
3. ``clip-curate run --input OUT --clip-top-fraction F``: the re-filter from stored embeddings, rows/s
   (``embedded_rows`` must be 0). Every stage runs again on the stored rows (caption rules, dedup, the
   safety classifier on the stored images), the embedding model excepted.
4. The same with ``--stages clip``: a threshold sweep, where only the CLIP score filter runs (curated rows
   already passed every other stage); it must keep the same rows as 3.

Each run is a fresh ``clip-curate`` process; wall time includes its start-up (imports, model load).

    python bench/pool_bench.py                      # 20 000 images, 2 DirectRunner workers
    python bench/pool_bench.py --images 2000 --keep # smaller; keep the pool and outputs
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
                    ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                    ("original_width", pa.int32()), ("original_height", pa.int32()), ("exif", pa.string()),
                    ("sha256", pa.string())])


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def build_pool(directory: str, n: int, shard_size: int, failed_fraction: float, seed: int, workers: int) -> dict:
    """Write the pool; returns counts and timing."""
    import hashlib

    from clip_curate.synthetic.world import scene_pairs

    t0 = time.monotonic()
    pairs = scene_pairs(n, seed, workers=workers, image_px=128, n_captions=1)
    render_s = time.monotonic() - t0
    os.makedirs(directory, exist_ok=True)
    failed = 0
    for shard in range(0, (n + shard_size - 1) // shard_size):
        meta_rows = []
        with tarfile.open(os.path.join(directory, f"{shard:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(shard * shard_size, min(n, (shard + 1) * shard_size)):
                p = pairs[i]
                kind = i % 20
                caption = p.captions[0] if kind < 14 else (p.random_caption if kind < 17 else p.hard_caption)
                key = f"{shard:05d}{i - shard * shard_size:04d}"
                url = f"http://pool.example/{seed}/{i}.jpg"
                meta = {"url": url, "caption": caption, "key": key, "status": "success", "error_message": None,
                        "width": 128, "height": 128, "original_width": 128, "original_height": 128,
                        "exif": "{}", "sha256": hashlib.sha256(p.image_bytes).hexdigest()}
                if (i * 7919) % 1000 < failed_fraction * 1000:
                    meta.update(status="failed_to_download", error_message="HTTP Error 404: Not Found",
                                width=None, height=None, original_width=None, original_height=None, exif=None,
                                sha256=None)
                    failed += 1
                else:
                    _add(tf, f"{key}.jpg", p.image_bytes)
                    _add(tf, f"{key}.txt", caption.encode())
                    _add(tf, f"{key}.json", json.dumps(meta, indent=4).encode())
                meta_rows.append(meta)
        pq.write_table(pa.Table.from_pylist(meta_rows, SCHEMA), os.path.join(directory, f"{shard:05d}.parquet"))
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    return {"rows": n, "failed": failed, "shards": (n + shard_size - 1) // shard_size, "bytes": size,
            "render_s": render_s, "build_s": time.monotonic() - t0}


# ---------------------------------------------------------------------------------------------
# Measuring a process tree: the sampler of bench/download_vs_img2dataset.py (same folder)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from download_vs_img2dataset import run_measured as _run_tree_measured  # noqa: E402


def run_measured(argv: list[str], log_path: str) -> tuple[float, int, float]:
    """Run ``clip-curate run ARGV``; (wall seconds, peak RSS summed over its process tree in bytes, CPU
    seconds of the tree: user + system, children included; unlike wall time, barely moved by other load)."""
    wall, rss, _, cpu = _run_tree_measured([sys.executable, "-m", "clip_curate.cli", "run"] + argv,
                                           log_path=log_path, interval=0.5)
    return wall, rss, cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    ap.add_argument("--failed-fraction", type=float, default=0.02, help="img2dataset failures in the metadata")
    ap.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes (and pool renderers)")
    ap.add_argument("--top-fraction", type=float, default=0.3, help="re-filter: --clip-top-fraction")
    ap.add_argument("--min-clip-score", type=float, default=0.5, help="first pass threshold")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one); an existing pool "
                                                "there with the same size is reused")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    work = args.dir or tempfile.mkdtemp(prefix="pool_bench_")
    pool = os.path.join(work, f"pool-{args.images}")
    if not os.path.exists(os.path.join(pool, "_done")):
        shutil.rmtree(pool, ignore_errors=True)
        built = build_pool(pool, args.images, args.shard_size, args.failed_fraction, seed=31, workers=args.workers)
        with open(os.path.join(pool, "_done"), "w") as f:
            json.dump(built, f)
    with open(os.path.join(pool, "_done")) as f:
        built = json.load(f)
    print(f"pool: {built['rows']} rows ({built['failed']} img2dataset failures) in {built['shards']} shards, "
          f"{built['bytes'] / 1e6:.0f} MB; built in {built['build_s']:.0f} s", flush=True)

    beam = [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
    out = os.path.join(work, "out")
    refilter = os.path.join(work, "out_refilter")
    sweep = os.path.join(work, "out_sweep")
    for d in (out, refilter, sweep):
        shutil.rmtree(d, ignore_errors=True)
    common = ["--clip-model", "synthetic-tiny", "--no-nsfw-concept", "--progress-seconds", "30"]
    wall1, rss1, cpu1 = run_measured(["--input", pool, "--output", out, "--min-clip-score", str(args.min_clip_score)]
                               + common + beam, os.path.join(work, "curate.log"))
    with open(os.path.join(out, "stats.json")) as f:
        s1 = json.load(f)
    wall2, rss2, cpu2 = run_measured(["--input", out, "--output", refilter, "--clip-top-fraction", str(args.top_fraction)]
                               + common + beam, os.path.join(work, "refilter.log"))
    with open(os.path.join(refilter, "stats.json")) as f:
        s2 = json.load(f)
    # A threshold sweep needs only the CLIP stage: curated rows already passed every other stage.
    wall3, rss3, cpu3 = run_measured(["--input", out, "--output", sweep, "--clip-top-fraction", str(args.top_fraction),
                                      "--stages", "clip"] + common + beam, os.path.join(work, "sweep.log"))
    with open(os.path.join(sweep, "stats.json")) as f:
        s3 = json.load(f)
    assert s1["input_rows"] == s1["curated_rows"] + s1["rejected_rows"] == built["rows"], s1
    assert s2["input_rows"] == s1["curated_rows"] and s2["embedded_rows"] == 0, s2
    assert s3["input_rows"] == s1["curated_rows"] and s3["embedded_rows"] == 0, s3
    res = {
        "images": built["rows"], "shards": built["shards"], "workers": args.workers, "cpus": os.cpu_count(),
        "curate": {"wall_s": round(wall1, 1), "images_per_s": round(built["rows"] / wall1, 1),
                   "cpu_s": round(cpu1, 1), "cpu_ms_per_image": round(1000 * cpu1 / built["rows"], 2),
                   "peak_rss_mb": round(rss1 / 2**20), "embedded_rows": s1["embedded_rows"],
                   "curated_rows": s1["curated_rows"], "rejected_by": s1["rejected_by"],
                   "pipeline_wall_s": s1["timings"].get("wall_seconds"), "stage_busy_ms": s1["timings"]},
        "refilter": {"wall_s": round(wall2, 1), "rows": s2["input_rows"], "cpu_s": round(cpu2, 1),
                     "cpu_ms_per_row": round(1000 * cpu2 / max(s2["input_rows"], 1), 2),
                     "rows_per_s": round(s2["input_rows"] / wall2, 1), "peak_rss_mb": round(rss2 / 2**20),
                     "embedded_rows": s2["embedded_rows"], "curated_rows": s2["curated_rows"],
                     "pipeline_wall_s": s2["timings"].get("wall_seconds"), "stage_busy_ms": s2["timings"]},
        "sweep": {"wall_s": round(wall3, 1), "rows": s3["input_rows"], "cpu_s": round(cpu3, 1),
                  "cpu_ms_per_row": round(1000 * cpu3 / max(s3["input_rows"], 1), 2),
                  "rows_per_s": round(s3["input_rows"] / wall3, 1), "peak_rss_mb": round(rss3 / 2**20),
                  "embedded_rows": s3["embedded_rows"], "curated_rows": s3["curated_rows"],
                  "same_rows_as_refilter": None},
    }
    uids = {}
    for name, d in (("refilter", refilter), ("sweep", sweep)):
        uids[name] = set(pq.read_table(os.path.join(d, "curated"), columns=["uid"]).column(0).to_pylist())
    res["sweep"]["same_rows_as_refilter"] = uids["refilter"] == uids["sweep"]
    print(json.dumps(res, indent=2))
    print("\n| run | rows | wall s | rows/s | CPU s (ms/row) | peak RSS MB (process tree) | rows through the model |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    c, r = res["curate"], res["refilter"]
    print(f"| curate the pool (all stages) | {built['rows']:,} | {c['wall_s']} | {c['images_per_s']} | {c['cpu_s']} "
          f"({c['cpu_ms_per_image']}) | {c['peak_rss_mb']:,} | {c['embedded_rows']:,} |")
    print(f"| re-filter `--clip-top-fraction {args.top_fraction}` | {r['rows']:,} | {r['wall_s']} | {r['rows_per_s']} "
          f"| {r['cpu_s']} ({r['cpu_ms_per_row']}) | {r['peak_rss_mb']:,} | {r['embedded_rows']:,} |")
    w = res["sweep"]
    print(f"| re-filter `--clip-top-fraction {args.top_fraction} --stages clip` | {w['rows']:,} | {w['wall_s']} "
          f"| {w['rows_per_s']} | {w['cpu_s']} ({w['cpu_ms_per_row']}) | {w['peak_rss_mb']:,} | {w['embedded_rows']:,} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if not args.keep and not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
