"""Balance stage at scale: N captions against M entries, through the real Beam transform.

    python bench/balance_scale.py --captions 1000000 --entries 500000 [--workers 2]

Entries are synthetic multi-word and single-word phrases over a 60k-word vocabulary (Zipf-distributed
in the captions, so a few entries are far over t and most are under it, like MetaCLIP's metadata).
Prints the matcher build time, the pure matching rate on one core, and the wall time of the whole
Beam stage (match, global count, draw) on the DirectRunner; writes bench/results-balance.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vocab(n: int, rng) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = set()
    while len(words) < n:
        k = int(rng.integers(3, 9))
        words.add("".join(rng.choice(letters, k)))
    return sorted(words)


def make_data(n_captions: int, n_entries: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    vocab = _vocab(60_000, rng)
    singles = vocab[: min(len(vocab), n_entries // 2)]
    pairs = {f"{vocab[a]} {vocab[b]}" for a, b in rng.integers(0, len(vocab), (n_entries, 2))}
    entries = (singles + sorted(pairs))[:n_entries]
    ranks = np.minimum(rng.zipf(1.3, (n_captions, 8)), len(vocab)) - 1
    captions = [" ".join(vocab[i] for i in row) for row in ranks]
    return entries, captions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=1_000_000)
    ap.add_argument("--entries", type=int, default=500_000)
    ap.add_argument("--t", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results-balance.json"))
    args = ap.parse_args(argv)

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from clip_curate.stages.balance import Balance, BalanceConfig, EntryMatcher

    t0 = time.perf_counter()
    entries, captions = make_data(args.captions, args.entries)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = EntryMatcher(entries)
    t_build = time.perf_counter() - t0
    sample = captions[:100_000]
    t0 = time.perf_counter()
    matched = sum(len(matcher.match(c)) for c in sample)
    rate = len(sample) / (time.perf_counter() - t0)
    print(f"data {t_data:.1f}s; matcher over {len(entries)} entries built in {t_build:.1f}s; "
          f"matching {rate:,.0f} captions/s on one core ({matched / len(sample):.2f} entries per caption)")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "entries.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(e + "\n" for e in entries)
        cfg = BalanceConfig(balance_entries=path, balance_t=args.t)
        opts = PipelineOptions([f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"])
        files = []
        for k in range(0, len(captions), 20_000):  # captions reach the workers as files, not in the job graph
            files.append(os.path.join(tmp, f"captions-{k:08d}.txt"))
            with open(files[-1], "w", encoding="utf-8") as f:
                f.writelines(c + "\n" for c in captions[k:k + 20_000])

        def read(path):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    yield {"uid": f"{os.path.basename(path)}-{i}", "caption": line.rstrip("\n")}

        t0 = time.perf_counter()
        with beam.Pipeline(options=opts) as p:
            rows = p | beam.Create(files) | beam.FlatMap(read) | beam.Reshuffle()
            kept, rejected = rows | Balance(cfg, stats_dir=tmp)
            kept | "CountKept" >> beam.combiners.Count.Globally() | "K" >> beam.Map(
                lambda n: open(os.path.join(tmp, "kept"), "w").write(str(n)))
        wall = time.perf_counter() - t0
        kept_n = int(open(os.path.join(tmp, "kept")).read())
        summary = json.load(open(os.path.join(tmp, "_stage_stats", "balance.json")))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    result = {"captions": args.captions, "entries": len(entries), "t": args.t, "workers": args.workers,
              "matcher_build_s": round(t_build, 1), "match_captions_per_s_one_core": round(rate),
              "beam_wall_s": round(wall, 1), "kept": kept_n, "entries_matched": summary["entries_matched"],
              "entries_at_or_under_t": summary["entries_at_or_under_t"], "launcher_peak_rss_gb": round(peak_gb, 2),
              "hardware": "2 x86-64 cores, no GPU"}
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
