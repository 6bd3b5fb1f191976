"""Proxy evaluation on a long-tailed world: raw vs CLIP+dedup vs +balance vs +image-based, head vs tail accuracy.

Builds everything from scratch, for real:

1. a long-tailed synthetic world (``generate_world(..., long_tail=100)``: the 48 colour-shape concepts follow
   a Zipf law, "red circle" 100x as frequent as "black diamond") with the demo's mix of mismatches,
   duplicates, unsafe scenes, eval leaks and broken URLs, served on 127.0.0.1;
2. four arms, each a ``clip-curate run``:
   (a) ``raw``: ``--stages download,image`` (every pair that downloaded and decoded);
   (b) ``filtered``: ``synthetic-tiny`` CLIP-score filter at its recommended threshold + dedup
       exact/near/semantic + decontamination (embeddings stored);
   (c) ``balanced``: (b) re-balanced (``--input-format curated --stages balance``) with the concept names as
       entries (``red circle``, ``red circles``, ...) and ``t`` = the largest count of any tail-concept entry,
       so every tail row is kept and head entries are cut to about ``t``;
   (d) ``target``: (b) with the image-based filter (``--stages clip,balance --target-set``: a fresh,
       uniform, eval-like sample of scenes, one cluster per ~10 pool rows) and then the same balancing;
3. a uniform labelled held-out set (``concept``, ``colour``, ``shape`` ... labels), scored on head concepts
   (ranks 1-8) and tail concepts (ranks 25-48) apart;
4. the proxy CLIP (:mod:`clip_curate.synthetic.evaluate`) trained on every arm for the same samples seen, per
   seed, in ``--workers`` processes of ``--threads`` torch threads each; each run is saved as it finishes
   (``DIR/runs/ARM-SEED.json``, re-runs skip it), then aggregated into ``--results`` and ``--plot``.

    nice -n 15 python bench/evaluate_long_tail.py --dir /tmp/longtail --rows 5000 --steps 500 --seeds 0,1,2 \
        --workers 2 --threads 1
    python bench/evaluate_long_tail.py --dir /tmp/longtail --phase report ...   # aggregate saved runs
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARMS = ("raw", "filtered", "balanced", "target")
ARM_LABELS = {"raw": "(a) raw", "filtered": "(b) CLIP + dedup", "balanced": "(c) + balance",
              "target": "(d) + image-based"}
HEAD_RANKS = range(0, 8)  # 0-based concept ranks of the head group
TAIL_RANKS = range(24, 48)


def concept_groups() -> dict:
    from clip_curate.synthetic import world as W

    names = [W.concept_name(c, s) for c, s in W.CONCEPTS]
    return {"attribute": "concept", "groups": {"head": [names[i] for i in HEAD_RANKS],
                                               "tail": [names[i] for i in TAIL_RANKS]}}


def entries() -> list[str]:
    from clip_curate.synthetic import world as W

    return [e for c, s in W.CONCEPTS for e in (f"{c} {s}", f"{c} {W.plural(s)}")]


def concept_counts(out_dir: str) -> dict[str, int]:
    """Rows per concept (from the world's truth columns) in a run's curated output."""
    from clip_curate.synthetic import world as W

    t = pq.read_table(os.path.join(out_dir, "curated"), columns=["truth_colour", "truth_shape"]).to_pydict()
    c = collections.Counter(W.concept_name(a, b) for a, b in zip(t["truth_colour"], t["truth_shape"]) if a)
    return {W.concept_name(a, b): c.get(W.concept_name(a, b), 0) for a, b in W.CONCEPTS}


def entry_counts(out_dir: str) -> dict[str, int]:
    """Curated rows whose caption names each entry (whole words, the balance stage's matching)."""
    import re

    caps = pq.read_table(os.path.join(out_dir, "curated"), columns=["caption"]).column("caption").to_pylist()
    out = {}
    for e in entries():
        rx = re.compile(r"(?<!\w)" + re.escape(e) + r"(?!\w)")
        out[e] = sum(1 for cap in caps if rx.search(cap.lower()))
    return out


def build_data(d: str, rows: int, seed: int, ratio: float, workers: int, target_size: int) -> dict:
    from clip_curate.models.clip import recommended_threshold
    from clip_curate.run import run
    from clip_curate.synthetic import world as W

    os.makedirs(d, exist_ok=True)
    t0 = time.time()
    w = W.generate_world(rows, seed, long_tail=ratio, broken_404=0.03, broken_not_image=0.02)
    print(f"world: {len(w)} URLs, {time.time() - t0:.0f}s; kinds {json.dumps(w.kinds())}", flush=True)
    eval_dir = os.path.join(d, "eval_images")
    w.write_eval_dir(eval_dir)
    target_dir = os.path.join(d, "target_images")  # eval-like: fresh uniform scenes, a seed nothing else uses
    os.makedirs(target_dir, exist_ok=True)
    for it in W.heldout_set(target_size, seed=4242, uid_prefix="t").items:
        with open(os.path.join(target_dir, f"{it.uid}.jpg"), "wb") as f:
            f.write(it.image_bytes)
    with open(os.path.join(d, "entries.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(entries()) + "\n")
    timings = {}
    with W.serve_world(w) as srv:
        urls = os.path.join(d, "urls.parquet")
        pq.write_table(w.to_url_table(srv.base_url, include_uid=False), urls)
        common = ["--input", urls, "--allow-private-addresses", "--per-host-rps", "0", "--per-host-connections", "16",
                  "--progress-seconds", "60", "--overwrite"]
        if workers > 1:
            common += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
        t0 = time.time()
        run(common + ["--output", os.path.join(d, "raw"), "--stages", "download,image", "--no-store-embeddings"])
        timings["raw"] = round(time.time() - t0)
        t0 = time.time()
        run(common + ["--output", os.path.join(d, "filtered"), "--stages", "download,image,embed,clip,dedup",
                      "--clip-model", "synthetic-tiny",
                      "--min-clip-score", str(recommended_threshold("synthetic-tiny")),
                      "--dedup", "exact,near,semantic", "--semantic-threshold", "0.99", "--decontaminate", eval_dir])
        timings["filtered"] = round(time.time() - t0)
    counts = entry_counts(os.path.join(d, "filtered"))
    tail_entries = [e for i in TAIL_RANKS for e in entries()[2 * i:2 * i + 2]]
    t = max(counts[e] for e in tail_entries)
    print(f"balance: t = {t} (largest tail-entry count); top entries "
          f"{sorted(counts.items(), key=lambda kv: -kv[1])[:6]}", flush=True)
    cur = ["--input", os.path.join(d, "filtered"), "--input-format", "curated", "--overwrite",
           "--balance-entries", os.path.join(d, "entries.txt"), "--balance-t", str(t)]
    t0 = time.time()
    run(cur + ["--output", os.path.join(d, "balanced"), "--stages", "balance"])
    timings["balanced"] = round(time.time() - t0)
    n_filtered = sum(concept_counts(os.path.join(d, "filtered")).values())
    k = max(2, n_filtered // 10)
    t0 = time.time()
    run(cur + ["--output", os.path.join(d, "target"), "--stages", "clip,balance", "--clip-model", "synthetic-tiny",
               "--min-clip-score", str(recommended_threshold("synthetic-tiny")), "--target-set", target_dir,
               "--target-clusters", str(k)])
    timings["target"] = round(time.time() - t0)
    info = {"world_rows": len(w), "world_seed": seed, "long_tail": ratio, "kinds": w.kinds(), "balance_t": t,
            "target_set": {"images": target_size, "clusters": k, "what": "fresh uniform (eval-like) scenes, seed 4242"},
            "entries": len(entries()), "entry_counts_filtered": counts, "curation_s": timings}
    with open(os.path.join(d, "data.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def _train_one(job: tuple) -> dict:
    d, arm, seed, steps, batch_size, lr, threads, heldout = job
    import torch

    torch.set_num_threads(threads)
    from clip_curate.synthetic import evaluate, train

    pre = train.TINY_PREPROCESS_CFG
    eval_set = evaluate.load_eval_set(heldout, pre, ("concept", "colour", "shape"), concept_groups())
    pool = evaluate.load_pool(os.path.join(d, arm), pre)
    res = evaluate.run_seed(arm, pool, eval_set, seed, model_cfg=evaluate.PROXY_MODEL_CFG, preprocess_cfg=pre,
                            steps=steps, batch_size=batch_size, lr=lr, warmup_steps=None, device="cpu")
    res.update(arm=arm, pairs=len(pool.captions), threads=threads)
    path = os.path.join(d, "runs", f"{arm}-{seed}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"{arm} seed {seed}: concept head {res['zero_shot_groups']['head']['concept']:.3f} tail "
          f"{res['zero_shot_groups']['tail']['concept']:.3f} ({res['train_s']:.0f}s)", flush=True)
    return res


def train_all(d: str, arms, seeds, steps, batch_size, lr, workers, threads, eval_size) -> None:
    from clip_curate.synthetic import evaluate
    from clip_curate.synthetic import world as W

    heldout = os.path.join(d, "heldout")
    if not os.path.exists(os.path.join(heldout, evaluate.EVAL_FILE)):
        evaluate.make_eval_set(heldout, eval_size, attributes=W.LABEL_ATTRIBUTES + ("concept",))
    os.makedirs(os.path.join(d, "runs"), exist_ok=True)
    jobs = [(d, arm, seed, steps, batch_size, lr, threads, heldout) for seed in seeds for arm in arms
            if not os.path.exists(os.path.join(d, "runs", f"{arm}-{seed}.json"))]
    print(f"{len(jobs)} runs to train ({workers} worker(s) x {threads} thread(s))", flush=True)
    if workers <= 1:
        for j in jobs:
            _train_one(j)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_train_one, jobs))


def _metrics(run: dict) -> dict[str, float]:
    out = {}
    for g in ("head", "tail"):
        for a in ("concept", "colour", "shape"):
            out[f"{a}@{g}"] = run["zero_shot_groups"][g][a]
    for a in ("concept", "colour", "shape"):
        out[a] = run["zero_shot"][a]
    return out


def report(d: str, arms, seeds, results_path: str, plot_path: str, settings: dict) -> dict:
    from clip_curate.synthetic import evaluate

    with open(os.path.join(d, "data.json")) as f:
        data = json.load(f)
    runs = {arm: [json.load(open(os.path.join(d, "runs", f"{arm}-{s}.json"))) for s in seeds
                  if os.path.exists(os.path.join(d, "runs", f"{arm}-{s}.json"))] for arm in arms}
    arms_out = {}
    for arm in arms:
        if not runs[arm]:
            continue
        ms = [_metrics(r) for r in runs[arm]]
        arms_out[arm] = {"label": ARM_LABELS[arm], "pairs": runs[arm][0]["pairs"],
                         "concepts": concept_counts(os.path.join(d, arm)),
                         "per_seed": {k: [round(m[k], 4) for m in ms] for k in ms[0]},
                         "seeds": [r["seed"] for r in runs[arm]],
                         "train_s": [r["train_s"] for r in runs[arm]],
                         "summary": {k: evaluate.summarize([m[k] for m in ms]) for k in ms[0]}}
    for arm, a in arms_out.items():
        c = a["concepts"]
        names = list(c)
        a["head_rows"] = sum(c[names[i]] for i in HEAD_RANKS)
        a["tail_rows"] = sum(c[names[i]] for i in TAIL_RANKS)
    paired = {}  # same-seed differences: each arm against the one before it, and balance against raw
    for before, after in (("raw", "filtered"), ("filtered", "balanced"), ("balanced", "target"), ("raw", "balanced")):
        if before in arms_out and after in arms_out and arms_out[before]["seeds"] == arms_out[after]["seeds"]:
            b, a = arms_out[before]["per_seed"], arms_out[after]["per_seed"]
            paired[f"{after} - {before}"] = {k: evaluate.compare(b[k], a[k]) for k in a}
    result = {"settings": settings, "data": data, "groups": concept_groups(), "chance": {
        "concept": 1 / 48, "colour": 1 / 8, "shape": 1 / 6}, "arms": arms_out, "paired": paired}
    with open(results_path, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, plot_path)
    print(table(result))
    return result


def table(result: dict) -> str:
    keys = ("concept@head", "concept@tail", "colour@head", "colour@tail", "shape@head", "shape@tail")
    lines = ["| arm | pairs (head / tail rows) | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for arm, a in result["arms"].items():
        cells = [f"{a['summary'][k]['mean']:.3f} ± {a['summary'][k]['std']:.3f}" for k in keys]
        lines.append(f"| {a['label']} | {a['pairs']} ({a['head_rows']} / {a['tail_rows']}) | "
                     + " | ".join(cells) + " |")
    lines.append("")
    for arm, a in result["arms"].items():
        lines.append(f"{a['label']} per seed {a['seeds']}: " + "; ".join(
            f"{k} {', '.join(f'{v:.3f}' for v in a['per_seed'][k])}" for k in keys))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(result["arms"])
    colours = {"raw": "#9aa5b1", "filtered": "#2f7ed8", "balanced": "#e8a33d", "target": "#5cb85c"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, attr in zip(axes, ("concept", "colour")):
        x = np.arange(2)
        width = 0.8 / max(1, len(arms))
        for j, arm in enumerate(arms):
            a = result["arms"][arm]
            keys = (f"{attr}@head", f"{attr}@tail")
            pos = x + (j - (len(arms) - 1) / 2) * width
            ax.bar(pos, [a["summary"][k]["mean"] for k in keys], width, yerr=[a["summary"][k]["std"] for k in keys],
                   capsize=3, color=colours.get(arm), label=f"{a['label']} ({a['pairs']} pairs)")
            for i, k in enumerate(keys):
                ax.scatter([pos[i]] * len(a["per_seed"][k]), a["per_seed"][k], s=9, color="black", zorder=3)
        ax.axhline(result["chance"][attr], color="#d9534f", lw=1, ls="--")
        ax.set_xticks(x)
        ax.set_xticklabels(["head concepts (ranks 1-8)", "tail concepts (ranks 25-48)"])
        ax.set_ylabel(f"zero-shot {attr} accuracy ({'48' if attr == 'concept' else '8'} classes)")
        ax.set_ylim(0, 0.3 if attr == "concept" else 1)
    axes[0].legend(fontsize=7, loc="upper right")
    s = result["settings"]
    fig.suptitle(f"long-tailed world (head/tail {result['data']['long_tail']:g}x): proxy CLIP, {s['steps']} steps x "
                 f"{s['batch_size']}, seeds "
                 f"{','.join(map(str, s['seeds']))} (dots: seeds, dashed: chance)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--phase", default="all", choices=("all", "data", "train", "report"))
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--world-seed", type=int, default=2027)
    p.add_argument("--long-tail", type=float, default=100.0)
    p.add_argument("--target-size", type=int, default=480)
    p.add_argument("--run-workers", type=int, default=1, help="Beam DirectRunner workers of the curation runs")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--workers", type=int, default=2, help="training processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--eval-size", type=int, default=1200)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--results", default=os.path.join(root, "bench", "results-evaluate-long-tail.json"))
    p.add_argument("--plot", default=os.path.join(root, "docs", "img", "long_tail_eval.png"))
    args = p.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.phase in ("all", "data"):
        build_data(args.dir, args.rows, args.world_seed, args.long_tail, args.run_workers, args.target_size)
    if args.phase in ("all", "train"):
        train_all(args.dir, arms, seeds, args.steps, args.batch_size, args.lr, args.workers, args.threads,
                  args.eval_size)
    if args.phase in ("all", "report"):
        settings = {"steps": args.steps, "batch_size": args.batch_size, "samples_seen": args.steps * args.batch_size,
                    "lr": args.lr, "seeds": seeds, "workers": args.workers, "torch_threads": args.threads,
                    "eval_size": args.eval_size, "hardware": "2 x86-64 cores, no GPU (shared)",
                    "load_average_at_report": os.getloadavg()[0],
                    "note": "runs niced (nice -n 15) on cores shared with other jobs, load average 6-9 while training"}
        report(args.dir, arms, seeds, args.results, args.plot, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
