"""Proxy evaluation on the demo world: curated vs raw pairs -> zero-shot accuracy of a small CLIP.

Builds everything from scratch, for real:

1. a synthetic world with the demo's mix (15 % random + 15 % hard caption mismatches, 3 % exact and
   5 % near duplicates, 3 % unsafe, 2 % eval leaks, 3 % 404 + 2 % HTML pages), served on 127.0.0.1;
2. ``clip-curate run`` with the demo's flags (``synthetic-tiny``, ``--min-clip-score`` = its recommended threshold, dedup
   exact/near/semantic, decontamination, safety) -> ``DIR/out`` (the curated arm);
3. ``clip-curate run --stages download,image`` on the same URL list -> ``DIR/raw`` (the raw arm: every
   pair whose image downloaded and decoded, nothing filtered);
4. a labelled held-out set (``clip-curate evaluate --make-eval-set``; fresh scenes, other seed);
5. ``clip-curate evaluate --raw DIR/raw --curated DIR/out --eval-set DIR/heldout`` (seeds, steps ...).

    nice python bench/evaluate_demo.py --dir /tmp/evaldemo --rows 4000 --steps 2000 --seeds 0,1,2
    python bench/evaluate_demo.py --dir /tmp/evaldemo --phase eval ...   # reuse the data of a previous run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_data(d: str, rows: int, seed: int, workers: int) -> None:
    from clip_curate.synthetic import world as W
    from clip_curate.models.clip import recommended_threshold
    from clip_curate.run import run

    os.makedirs(d, exist_ok=True)
    w = W.generate_world(rows, seed, broken_404=0.03, broken_not_image=0.02)
    eval_dir = os.path.join(d, "eval_images")
    w.write_eval_dir(eval_dir)
    with W.serve_world(w) as srv:
        urls = os.path.join(d, "urls.parquet")
        pq.write_table(w.to_url_table(srv.base_url, include_uid=False), urls)
        print(f"world: {len(w)} URLs at {srv.base_url}; kinds {json.dumps(w.kinds())}", flush=True)
        common = ["--input", urls, "--allow-private-addresses", "--per-host-rps", "0", "--per-host-connections", "16",
                  "--progress-seconds", "30"]
        if workers > 1:
            common += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
        t0 = time.time()
        run(common + ["--output", os.path.join(d, "raw"), "--stages", "download,image", "--no-store-embeddings"])
        print(f"raw pool: {time.time() - t0:.0f}s", flush=True)
        # the demo's curation flags (clip_curate/demo.py)
        argv = common + ["--output", os.path.join(d, "out"), "--clip-model", "synthetic-tiny",
                         "--min-clip-score", str(recommended_threshold("synthetic-tiny")),
                         "--dedup", "exact,near,semantic", "--semantic-threshold", "0.99", "--decontaminate", eval_dir,
                         "--nsfw-policy", "drop", "--language-candidates", "en,de,fr,es", "--no-nsfw-concept"]
        for prompt in W.UNSAFE_CONCEPT_PROMPTS:
            argv += ["--unsafe-concept", prompt]
        for prompt in W.NEUTRAL_CONCEPT_PROMPTS:
            argv += ["--neutral-concept", prompt]
        t0 = time.time()
        run(argv)
        print(f"curated: {time.time() - t0:.0f}s", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--phase", default="all", choices=("all", "data", "eval"))
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--world-seed", type=int, default=2026)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--eval-size", type=int, default=1000)
    args, rest = p.parse_known_args()
    if args.phase in ("all", "data"):
        build_data(args.dir, args.rows, args.world_seed, args.workers)
    if args.phase in ("all", "eval"):
        from clip_curate.synthetic import evaluate

        heldout = os.path.join(args.dir, "heldout")
        if not os.path.exists(os.path.join(heldout, evaluate.EVAL_FILE)):
            evaluate.main(["--make-eval-set", heldout, "--eval-size", str(args.eval_size)])
        return evaluate.main(["--raw", os.path.join(args.dir, "raw"), "--curated", os.path.join(args.dir, "out"),
                              "--eval-set", heldout, "--output", os.path.join(args.dir, "evaluation")] + rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
