"""``clip-curate demo``: the full pipeline on a local synthetic web, scored against its ground truth.

Generates a synthetic image–caption world (matched pairs, random and hard caption mismatches, exact and
near duplicates, unsafe images/captions, eval-set leaks, broken URLs), serves it on 127.0.0.1, runs
``clip-curate run`` with the bundled ``synthetic-tiny`` model on the DirectRunner, and prints what was
kept and rejected, plus precision/recall of each filter against the world's truth.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from typing import Sequence

import pyarrow.parquet as pq

from clip_curate.options import ConfigError

log = logging.getLogger(__name__)

# Which stage/reason is the right answer for each kind of world item.
EXPECTED = {
    "mismatch_random": {("clip", "low_clip_score"), ("clip", "below_top_fraction")},
    "mismatch_hard": {("clip", "low_clip_score"), ("clip", "below_top_fraction")},
    "dup_exact": {("dedup", "duplicate_exact")},
    "dup_near": {("dedup", "duplicate_near"), ("dedup", "duplicate_semantic"), ("dedup", "duplicate_exact")},
    "eval_leak": {("dedup", "eval_leak")},
    "unsafe": {("safety", "nsfw_image"), ("safety", "nsfw_concept"), ("safety", "unsafe_caption"),
               ("caption", "unsafe_caption")},
    "broken_404": {("download", "http_404")},
    "broken_not_image": {("download", "not_image")},
}
FILTERS = {"CLIP filter": ("clip", ("mismatch_random", "mismatch_hard")),
           "dedup": ("dedup", ("dup_exact", "dup_near", "eval_leak")),
           "safety": ("safety", ("unsafe",))}


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clip-curate demo", description=__doc__.splitlines()[0])
    p.add_argument("--output", default=None, help="output directory (default: a new temporary directory)")
    p.add_argument("--rows", type=int, default=600, help="URLs in the synthetic web")
    p.add_argument("--seed", type=int, default=2026, help="world seed (the model was trained on other seeds)")
    p.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
    p.add_argument("--min-clip-score", type=float, default=None,
                   help="CLIP threshold (default: the recommended value for synthetic-tiny)")
    return p


def kind_family(kind: str | None) -> str:
    return (kind or "").split(":", 1)[0]


def score_against_truth(out_dir: str) -> dict:
    """Precision/recall per filter, from the truth_kind column carried through the outputs."""
    cur = pq.read_table(os.path.join(out_dir, "curated"), columns=["truth_kind"]).column("truth_kind").to_pylist()
    rej = pq.read_table(os.path.join(out_dir, "rejected"), columns=["truth_kind", "stage", "reason"]).to_pylist()
    report = {}
    for name, (stage, kinds) in FILTERS.items():
        dropped = [kind_family(r["truth_kind"]) for r in rej if r["stage"] == stage]
        tp = sum(k in kinds for k in dropped)
        # Items of these kinds that reached the stage: kept ones plus ones this stage dropped.
        missed = sum(kind_family(k) in kinds for k in cur)
        report[name] = {"dropped": len(dropped), "true_positives": tp,
                        "precision": tp / len(dropped) if dropped else 1.0,
                        "recall": tp / (tp + missed) if tp + missed else 1.0}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if args.rows < 50:
        raise ConfigError("--rows must be >= 50")
    from clip_curate import world as world_mod
    from clip_curate.clip_model import recommended_threshold
    from clip_curate.summary import format_summary
    from pipelines.curate import run

    out_root = args.output or tempfile.mkdtemp(prefix="clip-curate-demo-")
    os.makedirs(out_root, exist_ok=True)
    w = world_mod.generate_world(args.rows, args.seed, broken_404=0.03, broken_not_image=0.02)
    eval_dir = os.path.join(out_root, "eval_images")
    w.write_eval_dir(eval_dir)
    threshold = args.min_clip_score if args.min_clip_score is not None else recommended_threshold("synthetic-tiny")
    with world_mod.serve_world(w) as server:
        urls = os.path.join(out_root, "urls.parquet")
        pq.write_table(w.to_url_table(server.base_url, include_uid=False), urls)
        out = os.path.join(out_root, "out")
        print(f"synthetic web: {len(w)} URLs at {server.base_url}  kinds: {json.dumps(w.kinds())}")
        argv = ["--input", urls, "--output", out, "--allow-private-addresses",
                "--clip-model", "synthetic-tiny", "--min-clip-score", str(threshold),
                "--dedup", "exact,near,semantic", "--decontaminate", eval_dir,
                "--nsfw-policy", "drop", "--audit", "--progress-seconds", "5"]
        if args.workers > 1:
            argv += [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
        stats = run(argv)
    print()
    print(format_summary(stats))
    print()
    print(f"{'filter':<14}{'dropped':>9}{'precision':>11}{'recall':>9}   (against the world's ground truth)")
    for name, r in score_against_truth(out).items():
        print(f"{name:<14}{r['dropped']:>9}{r['precision']:>11.3f}{r['recall']:>9.3f}")
    print()
    print(f"curated:  {os.path.join(out, 'curated')}")
    print(f"rejected: {os.path.join(out, 'rejected')}")
    report = os.path.join(out, "audit", "report.html")
    if os.path.exists(report):
        print(f"audit report: {report}")
    return 0
