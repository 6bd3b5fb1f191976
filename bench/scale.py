"""Memory and throughput at scale: does peak RSS stay flat as the input grows?

For each ``--sizes`` N, builds a synthetic world of N URL rows (``clip_curate.synthetic.world``: matched and
mismatched captions, exact and near duplicates, unsafe scenes, 404s and HTML pages; ``--image-px``
square JPEG/PNG scenes), serves it from a separate process on 127.0.0.1, and runs ``clip-curate run``
through **all stages** (caption, download, image, embed with ``synthetic-tiny``, clip filter, dedup
exact+near+semantic, safety) on the DirectRunner with ``--workers`` processes, as a subprocess, in
``--chunk-rows`` passes (default 10000; 0 = one job over every row, whose memory grows with the rows on
the DirectRunner: it keeps every shuffled PCollection in memory).

While it runs, the memory of the run's whole process tree (launcher + worker processes) is sampled every
0.5 s from /proc (sum of RSS, and of PSS: shared pages split between processes). Prints, per size: wall
time, input rows/s, peak RSS/PSS, RSS at 10 %, 50 %, 90 % of the run, and the curated/rejected counts
(checked: input == curated + rejected); then the peak-RSS ratio of the largest to the smallest size
(target: <= 1.3, i.e. streamed, not materialised).

    python bench/scale.py                                  # 20000 and 100000 rows (hours on 2 cores)
    python bench/scale.py --sizes 2000,10000 --no-nsfw-classifier
    python bench/scale.py --json /tmp/scale.json -- --dedup exact,near   # extra flags after --
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from download_vs_img2dataset import run_measured  # noqa: E402  (same folder)


def measure(cmd: list[str], log_path: str, interval: float = 0.5) -> dict:
    """Run ``cmd``; sample the process tree's memory until it exits (also written live to LOG.rss.tsv)."""
    samples: list[tuple[float, int, int]] = []
    with open(log_path + ".rss.tsv", "w") as trace:  # seconds, RSS, PSS (bytes): readable during the run

        def on_sample(t: float, rss: int, pss: int) -> None:
            samples.append((t, rss, pss))
            trace.write(f"{t:.1f}\t{rss}\t{pss}\n")
            trace.flush()

        wall, peak_rss, peak_pss, _ = run_measured(cmd, log_path=log_path, interval=interval, on_sample=on_sample)

    def at(frac: float) -> int:
        t = frac * wall
        return min(samples, key=lambda s: abs(s[0] - t))[1] if samples else 0

    return {"wall_s": wall, "peak_rss": peak_rss, "peak_pss": peak_pss,
            "rss_10": at(0.1), "rss_50": at(0.5), "rss_90": at(0.9),
            "timeline": [(round(t, 1), r) for t, r, _ in samples[:: max(1, len(samples) // 40)]]}


def run_size(n: int, args, extra: list[str], workdir: str) -> dict:
    from clip_curate.synthetic import world as W
    from clip_curate.models.clip import recommended_threshold

    t0 = time.monotonic()
    w = W.generate_world(n, args.seed, broken_404=0.03, broken_not_image=0.02, image_px=args.image_px)
    gen_s = time.monotonic() - t0
    d = os.path.join(workdir, f"n{n}")
    os.makedirs(d, exist_ok=True)
    with W.serve_world(w, process=True) as srv:
        urls = os.path.join(d, "urls.parquet")
        pq.write_table(w.to_url_table(srv.base_url, include_uid=False), urls)
        del w
        out = os.path.join(d, "out")
        shutil.rmtree(out, ignore_errors=True)  # a fresh output: never mix with an earlier run's shards
        cmd = [sys.executable, "-m", "clip_curate.cli", "run", "--input", urls, "--output", out,
               "--allow-private-addresses", "--per-host-rps", "0", "--per-host-connections", "32",
               "--clip-model", "synthetic-tiny", "--min-clip-score", str(recommended_threshold("synthetic-tiny")),
               "--dedup", "exact,near,semantic", "--semantic-threshold", "0.99", "--no-nsfw-concept",
               "--language-candidates", "en,de", "--image-size", str(args.image_px),
               "--progress-seconds", "30", f"--direct_num_workers={args.workers}",
               "--direct_running_mode=multi_processing",
               *(["--chunk-rows", str(args.chunk_rows)] if args.chunk_rows else []), *extra]
        m = measure(cmd, os.path.join(d, "run.log"))
    stats = json.loads(open(os.path.join(out, "stats.json")).read())
    assert stats["input_rows"] == n == stats["curated_rows"] + stats["rejected_rows"], stats
    return {"rows": n, "world_s": round(gen_s, 1), **m, "rows_per_s": n / m["wall_s"],
            "passes": stats.get("passes", 1), "chunk_rows": args.chunk_rows,
            "curated": stats["curated_rows"], "rejected": stats["rejected_rows"],
            "rejected_by_stage": {s: sum(r.values()) for s, r in stats["rejected_by"].items()}}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,100000")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-px", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--no-nsfw-classifier", action="store_true", help="skip opennsfw (the slowest CPU step)")
    p.add_argument("--chunk-rows", type=int, default=10000,
                   help="the run's --chunk-rows (passes of this many rows; 0 = one pass, memory grows with rows)")
    args = p.parse_args(argv)
    if args.no_nsfw_classifier:
        extra = ["--no-nsfw-classifier", *extra]
    workdir = args.dir or tempfile.mkdtemp(prefix="clip-curate-scale-")
    results = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        r = run_size(n, args, extra, workdir)
        results.append(r)
        print(f"{n} rows ({r['passes']} passes): {r['wall_s']:.0f}s, {r['rows_per_s']:.1f} rows/s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB "
              f"(PSS {r['peak_pss'] / 2**20:.0f}), curated {r['curated']}, rejected {r['rejected_by_stage']}",
              flush=True)
    mib = 2 ** 20
    print("\n| rows | passes | wall | rows/s | peak RSS | peak PSS | RSS at 10 / 50 / 90 % | curated |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['passes']} | {r['wall_s']:.0f} s | {r['rows_per_s']:.1f} | {r['peak_rss'] / mib:,.0f} MiB | "
              f"{r['peak_pss'] / mib:,.0f} MiB | {r['rss_10'] / mib:,.0f} / {r['rss_50'] / mib:,.0f} / "
              f"{r['rss_90'] / mib:,.0f} MiB | {r['curated']:,} |")
    if len(results) > 1:
        ratio = results[-1]["peak_rss"] / results[0]["peak_rss"]
        print(f"\npeak RSS ratio {results[-1]['rows']:,} / {results[0]['rows']:,} rows: {ratio:.2f} "
              f"(target <= 1.3): {'OK' if ratio <= 1.3 else 'NOT MET'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"extra_flags": extra, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
