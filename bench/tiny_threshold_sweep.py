"""Sweep ``--min-clip-score`` for a CLIP checkpoint on a fresh synthetic world: precision and recall of
rejecting mismatched captions (random and one-attribute-changed), and the share of matched pairs kept.

    python bench/tiny_threshold_sweep.py --seed 777 --rows 600
    python bench/tiny_threshold_sweep.py --seed 31337 --rows 400 --model-dir my-tiny/

Scores with plain open_clip (``local-dir:`` checkpoint, eval mode) the way the Embed stage does: cosine of
the L2-normalised image and caption embeddings. Used to pick ``RECOMMENDED_THRESHOLDS["synthetic-tiny"]``.
"""
from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    from clip_curate.synthetic import train as T
    from clip_curate.synthetic import world as W

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=str(T.synthetic_tiny_dir()), help="local-dir checkpoint (default: synthetic-tiny)")
    p.add_argument("--seed", type=int, default=777, help="world seed (never a training seed)")
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--thresholds", default="0.70,0.72,0.74,0.75,0.76,0.77,0.78,0.79,0.80,0.82")
    args = p.parse_args()

    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.model_dir}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{args.model_dir}")
    world = W.generate_world(args.rows, seed=args.seed, mismatch_random=0.2, mismatch_hard=0.2, dup_exact=0,
                             dup_near=0, unsafe=0, eval_leak=0)
    items = [it for it in world.items if it.image_bytes]
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(io.BytesIO(it.image_bytes)).convert("RGB")) for it in items])
        score = (model.encode_image(x, normalize=True)
                 * model.encode_text(tokenizer([it.caption for it in items]), normalize=True)).sum(1).numpy()
    kind = np.array([it.kind.split(":")[0] for it in items])
    bad = np.isin(kind, ["mismatch_random", "mismatch_hard"])
    print(f"world seed {args.seed}, {len(items)} items; AUC matched vs random "
          f"{T.roc_auc(score[kind == 'matched'], score[kind == 'mismatch_random']):.4f}, vs hard "
          f"{T.roc_auc(score[kind == 'matched'], score[kind == 'mismatch_hard']):.4f}")
    print("threshold  precision  recall  recall_random  recall_hard  matched_kept")
    for t in (float(v) for v in args.thresholds.split(",")):
        rej = score < t
        tp = int((rej & bad).sum())
        share = lambda k: float((rej & (kind == k)).sum() / max((kind == k).sum(), 1))  # noqa: E731
        print(f"{t:9.2f}  {tp / max(int(rej.sum()), 1):9.3f}  {tp / bad.sum():6.3f}  {share('mismatch_random'):13.3f}"
              f"  {share('mismatch_hard'):11.3f}  {1 - share('matched'):12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
