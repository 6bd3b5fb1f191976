"""``clip-curate demo``: the full pipeline on a local synthetic web, scored against its ground truth.

Generates a synthetic image–caption world (matched pairs, random and hard caption mismatches, exact and
near duplicates, unsafe images/captions, eval-set leaks, broken URLs), serves it on 127.0.0.1, runs
``clip-curate run --clip-model synthetic-tiny`` (the bundled model, named: it is never a default) on the
DirectRunner, and prints what was kept and rejected, plus precision/recall of each filter against the
world's truth. The model's card switches the judgments it is not calibrated for off.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from typing import Sequence

import pyarrow.parquet as pq

from clip_curate.fields import ConfigError, OneLineParser

log = logging.getLogger(__name__)

#: Subdirectory of the demo's --output holding the synthetic web's files (URL list, eval images).
WORLD_DIR = "_world"


def build_arg_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="clip-curate demo", description=__doc__.splitlines()[0])
    p.add_argument("--output", default=None, help="output directory: curated/, rejected/, stats.json and audit/ "
                   "directly in it, the synthetic web's files in OUTPUT/_world/ (default: a new temporary directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's outputs in --output")
    p.add_argument("--rows", type=int, default=600, help="URLs in the synthetic web")
    p.add_argument("--seed", type=int, default=2026, help="world seed (the model was trained on other seeds)")
    p.add_argument("--long-tail", type=float, default=0.0, metavar="R",
                   help="long-tailed world: colour-shape concepts follow a Zipf law, the head concept R times as "
                        "frequent as the rarest (e.g. 100; default 0: uniform)")
    p.add_argument("--workers", type=int, default=1,
                   help="DirectRunner workers: 1 (default) runs in this process, the fastest start (the models "
                        "are loaded once); N > 1 starts N worker processes")
    p.add_argument("--min-clip-score", type=float, default=None,
                   help="CLIP threshold (default: the recommended value for synthetic-tiny)")
    return p


def score_against_truth(out_dir: str) -> dict:
    """Precision/recall of each filter against the world's truth columns, carried through the outputs.

    CLIP filter: a drop is right when the caption was mismatched. Dedup: a drop is right when the dropped
    row and the row it names as kept are copies of the same scene (or, for ``eval_leak``, when the row is
    a leak). Safety: a drop is right when the image or caption is unsafe.
    """
    cols = ["uid", "truth_uid", "truth_family", "truth_of", "truth_unsafe", "truth_unsafe_caption"]
    cur = pq.read_table(os.path.join(out_dir, "curated"), columns=cols).to_pylist()
    rej = pq.read_table(os.path.join(out_dir, "rejected"), columns=cols + ["stage", "reason", "detail"]).to_pylist()
    scene = {r["uid"]: (r["truth_of"] or r["truth_uid"]) for r in cur + rej}  # pipeline uid -> scene

    def is_unsafe(r):
        return r["truth_unsafe"] or r["truth_unsafe_caption"]

    def is_dup(r):
        return r["truth_family"] in ("dup_exact", "dup_near", "eval_leak")

    def dedup_right(r):
        if r["reason"] == "eval_leak":
            return r["truth_family"] == "eval_leak"
        kept = (r["detail"] or "").rsplit(" ", 1)[-1]
        return scene.get(kept) == scene.get(r["uid"])

    checks = {
        "CLIP filter": (lambda r: r["stage"] == "clip", lambda r: r["truth_family"].startswith("mismatch"),
                        lambda r: r["truth_family"].startswith("mismatch")),
        "dedup": (lambda r: r["stage"] == "dedup", dedup_right, is_dup),
        "safety": (lambda r: r["stage"] == "safety" or r["reason"] == "unsafe_caption", lambda r: is_unsafe(r),
                   is_unsafe),
    }
    report = {}
    for name, (dropped_by, right, positive) in checks.items():
        dropped = [r for r in rej if dropped_by(r)]
        tp = sum(1 for r in dropped if right(r))
        missed = sum(1 for r in cur if positive(r))
        report[name] = {"dropped": len(dropped), "true_positives": tp,
                        "precision": tp / len(dropped) if dropped else 1.0,
                        "recall": tp / (tp + missed) if tp + missed else 1.0}
    return report


def _make_world(args):
    from clip_curate.synthetic import world as world_mod

    return world_mod.generate_world(args.rows, args.seed, broken_404=0.03, broken_not_image=0.02,
                                    long_tail=args.long_tail)


def _start_world(args):
    """``(future of the synthetic world, pool)``: the world is generated in a forked process while this one
    imports what the run needs (Beam, torch, open_clip: seconds of start-up that now overlap). Without fork
    (not Linux/macOS), the future is already done and the pool is None."""
    import concurrent.futures
    import multiprocessing

    try:
        pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
        return pool.submit(_make_world, args), pool
    except (ValueError, OSError):
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(_make_world(args))
        return done, None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if args.rows < 50:
        raise ConfigError("--rows must be >= 50")
    if args.long_tail and args.long_tail < 1:
        raise ConfigError(f"--long-tail: 0 (off) or a head/tail frequency ratio >= 1, got {args.long_tail:g}")
    future, pool = _start_world(args)  # before the imports below, which it overlaps
    try:
        from clip_curate.synthetic import world as world_mod
        from clip_curate.models.clip import recommended_threshold
        from clip_curate.stats import format_summary
        from clip_curate.run import run

        from clip_curate.preflight import probe_output
        from clip_curate.writers import OUTPUT_PARTS, claim_output

        out = args.output or tempfile.mkdtemp(prefix="clip-curate-demo-")
        probe_output(out, "--output")
        claim_output(out, overwrite=args.overwrite, parts=OUTPUT_PARTS + (WORLD_DIR,), command="demo")
        world_dir = os.path.join(out, WORLD_DIR)  # the synthetic web's files, apart from the run's outputs
        os.makedirs(world_dir, exist_ok=True)
        import open_clip  # noqa: F401 - the run's preprocessing identity needs it; imported while the world is made

        w = future.result()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    eval_dir = os.path.join(world_dir, "eval_images")
    w.write_eval_dir(eval_dir)
    threshold = args.min_clip_score if args.min_clip_score is not None else recommended_threshold("synthetic-tiny")
    with world_mod.serve_world(w) as server:
        urls = os.path.join(world_dir, "urls.parquet")
        pq.write_table(w.to_url_table(server.base_url, include_uid=False), urls)  # uid = hash(url, caption)
        print(f"synthetic web: {len(w)} URLs at {server.base_url}  kinds: {json.dumps(w.kinds())}")
        argv = ["--input", urls, "--output", out, "--overwrite", "--allow-private-addresses",  # beside _world/
                "--clip-model", "synthetic-tiny", "--min-clip-score", str(threshold),
                "--dedup", "exact,near,semantic", "--semantic-threshold", "0.99", "--decontaminate", eval_dir,
                "--nsfw-policy", "drop", "--audit", "--progress-seconds", "5",
                "--language-candidates", "en,de,fr,es",
                # one local host: the per-host politeness limits of the open web only slow the demo down
                "--per-host-rps", "0"]
        # synthetic-tiny's card (clip_curate/data/synthetic-tiny/clip_curate_card.json) leaves the CLIP concept
        # check and the audit's zero-shot attributes off: the opennsfw classifier and the word list judge safety
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
    print(f"stats:    {os.path.join(out, 'stats.json')}")
    print(f"world:    {world_dir} (URL list, eval images)")
    report = os.path.join(out, "audit", "report.html")
    if os.path.exists(report):
        print(f"audit report: {report}")
    return 0
