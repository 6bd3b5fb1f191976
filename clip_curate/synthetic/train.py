"""Train the small open_clip model ``synthetic-tiny`` on the synthetic world, and evaluate CLIP models.

``python -m clip_curate.synthetic.train --output DIR`` (also ``clip-curate train-tiny``) renders training
scenes from :mod:`clip_curate.synthetic.world`, trains an open_clip ``CLIP`` contrastively (with one hard
negative caption per image in every batch), evaluates it on a held-out stream of scenes and writes
an open_clip ``local-dir:`` checkpoint::

    DIR/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
    DIR/open_clip_model.safetensors  weights (float16 by default; open_clip upcasts on load)
    DIR/training.json                settings, timings and held-out figures

so ``open_clip.create_model_and_transforms("local-dir:DIR")`` and
``open_clip.get_tokenizer("local-dir:DIR")`` load it. The reusable pieces are :func:`train_clip`
(any image–caption pairs, any small model config; the proxy evaluation trains raw vs curated pairs
with it), :func:`evaluate_clip`, :func:`zero_shot_accuracy`, :func:`save_model_dir` and
:func:`load_model_dir`.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import platform
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip_curate.models import clip
from clip_curate.synthetic import world as W

#: The trainer's default architecture (``synthetic-tiny``'s first five stages): 4-layer ViT on 64 px
#: (16 px patches), 4-layer text transformer over open_clip's BPE vocabulary (``get_tokenizer("ViT-B-32")``)
#: with a 32-token context.
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 4, "head_width": 32,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
}
#: The shipped ``synthetic-tiny``: the same text tower under a small open_clip ``ModifiedResNet`` image
#: tower (one bottleneck per stage, width 16, attention pooling) on 64 px. Convolutions tell the world's
#: small shapes apart far better than 16 px ViT patches (held-out shape-change AUC 0.77 -> 0.92).
TINY_RESNET_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": dict(TINY_MODEL_CFG["text_cfg"]),
}
TINY_PREPROCESS_CFG: dict[str, Any] = {
    "size": 64, "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest",
    "fill_color": 0,
}


def preprocess_cfg_for(model_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The tiny model's preprocessing at ``model_cfg``'s image size."""
    size = ((model_cfg or TINY_MODEL_CFG).get("vision_cfg") or {}).get("image_size", TINY_PREPROCESS_CFG["size"])
    return {**TINY_PREPROCESS_CFG, "size": int(size if isinstance(size, int) else size[0])}


#: Seeds of the held-out evaluation stream (never used for training by ``main``).
EVAL_SEED = 900_001
MODEL_NAME = "synthetic-tiny"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
REPORT_FILE = "training.json"


def synthetic_tiny_dir() -> Path:
    """Directory of the bundled ``synthetic-tiny`` checkpoint (``open_clip`` ``local-dir:`` layout)."""
    return Path(str(resources.files("clip_curate.data").joinpath(MODEL_NAME)))


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is a ConfigError (the product's rule)."""
    return torch.device(clip.resolve_device(device))


def build_model(model_cfg: dict[str, Any] | None = None):
    """A randomly initialised open_clip ``CLIP`` for ``model_cfg`` (default :data:`TINY_MODEL_CFG`)."""
    import open_clip

    cfg = copy.deepcopy(model_cfg or TINY_MODEL_CFG)
    return open_clip.CLIP(**cfg)


def make_tokenizer(model_cfg: dict[str, Any] | None = None):
    """open_clip's BPE tokenizer (ViT-B-32 vocabulary) with the config's context length."""
    import open_clip

    ctx = (model_cfg or TINY_MODEL_CFG)["text_cfg"].get("context_length", 77)
    return open_clip.get_tokenizer("ViT-B-32", context_length=ctx)


def make_preprocess(preprocess_cfg: dict[str, Any] | None = None):
    """open_clip's evaluation transform for ``preprocess_cfg`` (PIL image -> normalised tensor)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = dict(preprocess_cfg or TINY_PREPROCESS_CFG)
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def _as_pil(image: Any):
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(image))).convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    return image.convert("RGB")


def _resample():
    from PIL import Image

    return {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


_PIL_RESAMPLE = _resample()


def images_to_uint8(images: Sequence[Any], preprocess_cfg: dict[str, Any] | None = None) -> torch.Tensor:
    """Apply the model's own preprocessing to images (bytes / PIL / HxWx3 uint8) and keep them
    compactly as uint8 ``[N, 3, S, S]`` (the exact pixels open_clip's transform produces)."""
    cfg = preprocess_cfg or TINY_PREPROCESS_CFG
    preprocess = make_preprocess(cfg)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    resample = _PIL_RESAMPLE[cfg.get("interpolation", "bicubic")]
    out = []
    for image in images:
        pil = _as_pil(image)
        if pil.size[0] == pil.size[1]:
            # square input: open_clip's Resize + CenterCrop is exactly one PIL resize; skip the float round trip
            arr = np.asarray(pil if pil.size[0] == size else pil.resize((size, size), resample))
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        else:
            x = preprocess(pil)
            out.append(((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8))
    if not out:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.stack(out)


def _normalise(batch_u8: torch.Tensor, preprocess_cfg: dict[str, Any], device: torch.device) -> torch.Tensor:
    mean = torch.tensor(preprocess_cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"], device=device).view(1, 3, 1, 1)
    return (batch_u8.to(device).float() / 255.0 - mean) / std


class _TokenCache:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for t, row in zip(missing, self.tokenizer(missing)):
                self.cache[t] = row
        return torch.stack([self.cache[t] for t in texts])


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "logit_scale" in name or "bias" in name or name.endswith("positional_embedding") \
                or "class_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _draw_distinct(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """``k`` indices below ``n``, distinct while ``k <= n`` (then repeating)."""
    if k == 1:  # one integer draw, as before --hard-per-image existed: earlier recipes reproduce
        return [int(rng.integers(n))]
    out = [int(j) for j in rng.permutation(n)[:k]]
    return out + [int(rng.integers(n)) for _ in range(k - len(out))]


def train_clip(images: Sequence[Any] | torch.Tensor, captions: Sequence[str | Sequence[str]], *,
               model_cfg: dict[str, Any] | None = None, preprocess_cfg: dict[str, Any] | None = None,
               steps: int = 3000, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.1,
               warmup_steps: int | None = None, seed: int = 0, device: str = "cpu",
               hard_negatives: Sequence[str | Sequence[str]] | None = None, hard_per_image: int = 1,
               twin_of: Sequence[int] | None = None,
               log_every: int = 100, log: Callable[[str], None] | None = None, model=None):
    """Train an open_clip ``CLIP`` contrastively on image–caption pairs; returns the model (eval mode).

    ``images``: encoded bytes, PIL images, HxWx3 arrays, or a uint8 tensor already produced by
    :func:`images_to_uint8`. ``captions[i]``: one caption or several (one is drawn per step: text
    augmentation). ``hard_negatives[i]`` (optional): captions that must *not* match image i;
    ``hard_per_image`` of them (distinct where there are enough) are added to the batch's text side
    per image (image->text loss over ``(1 + hard_per_image) * batch`` captions). ``twin_of[i]``
    (optional): the index of image i's minimal-pair twin (the same scene with one attribute changed,
    :func:`clip_curate.synthetic.world.scene_twin`); a step then draws ``batch_size // 2`` scenes and adds their
    twins, so both loss directions must tell the two apart. Data order, initialisation and caption
    draws follow ``seed``.
    """
    model_cfg = model_cfg or TINY_MODEL_CFG
    preprocess_cfg = preprocess_cfg or TINY_PREPROCESS_CFG
    dev = resolve_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 77])
    pixels = images if isinstance(images, torch.Tensor) else images_to_uint8(images, preprocess_cfg)
    n = len(pixels)
    if n != len(captions):
        raise ValueError(f"{n} images but {len(captions)} captions")
    if n < 2:
        raise ValueError("need at least 2 image-caption pairs to train contrastively")
    caps = [(c,) if isinstance(c, str) else tuple(c) for c in captions]
    negs = None
    if hard_negatives is not None:
        negs = [(c,) if isinstance(c, str) else tuple(c) for c in hard_negatives]
        if len(negs) != n:
            raise ValueError(f"{n} images but {len(negs)} hard-negative entries")
    anchors = np.arange(n)
    if twin_of is not None:
        twin = np.asarray(twin_of, dtype=np.int64)
        if len(twin) != n or twin.min() < 0 or twin.max() >= n or (twin[twin] != np.arange(n)).any() \
                or (twin == np.arange(n)).any():
            raise ValueError("twin_of must pair every image with another one (twin_of[twin_of[i]] == i)")
        anchors = np.flatnonzero(np.arange(n) < twin)
    batch_size = min(batch_size, n)
    draw = batch_size // 2 if twin_of is not None else batch_size
    model = model if model is not None else build_model(model_cfg)
    model.to(dev).train()
    tokens = _TokenCache(make_tokenizer(model_cfg))
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = warmup_steps if warmup_steps is not None else max(1, min(200, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))

    order = rng.permutation(anchors)
    pos = 0
    t0 = time.time()
    for step in range(steps):
        if pos + draw > len(anchors):
            order, pos = rng.permutation(anchors), 0
        idx = order[pos:pos + draw]
        pos += draw
        if twin_of is not None:
            idx = np.concatenate([idx, twin[idx]])
        texts = [caps[i][int(rng.integers(len(caps[i])))] for i in idx]
        if negs is not None:
            picks = [_draw_distinct(rng, len(negs[i]), hard_per_image) for i in idx]
            for k in range(hard_per_image):
                texts += [negs[i][pick[k]] for i, pick in zip(idx, picks)]
        x = _normalise(pixels[torch.from_numpy(idx)], preprocess_cfg, dev)
        t = tokens(texts).to(dev)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        img_f, txt_f, scale = model(x, t)
        logits = scale * img_f @ txt_f.T  # [B, B] or [B, 2B]
        labels = torch.arange(len(idx), device=dev)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :len(idx)].T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} lr {lr_at(step):.2e} "
                f"scale {model.logit_scale.exp().item():.1f} {time.time() - t0:.0f}s")
    model.eval()
    return model


def encode_images(model, images: Sequence[Any] | torch.Tensor, *, preprocess_cfg: dict[str, Any] | None = None,
                  batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """L2-normalised image embeddings ``[N, D]`` (float32) through the model's preprocessing."""
    cfg = preprocess_cfg or TINY_PREPROCESS_CFG
    pixels = images if isinstance(images, torch.Tensor) else images_to_uint8(images, cfg)
    dev = resolve_device(device)
    model.to(dev).eval()
    return clip.embed_in_batches(model.encode_image, pixels, lambda batch: _normalise(batch, cfg, dev),
                                 model.text_projection.shape[1], dev, batch_size=batch_size)


def encode_texts(model, texts: Sequence[str], *, tokenizer=None, model_cfg: dict[str, Any] | None = None,
                 batch_size: int = 512, device: str = "cpu") -> np.ndarray:
    """L2-normalised text embeddings ``[N, D]`` (float32)."""
    tokenizer = tokenizer or make_tokenizer(model_cfg)
    dev = resolve_device(device)
    model.to(dev).eval()
    return clip.embed_in_batches(model.encode_text, list(texts), lambda batch: tokenizer(list(batch)).to(dev),
                                 model.text_projection.shape[1], dev, batch_size=batch_size)


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative), ties count half."""
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def evaluate_clip(model, pairs: Sequence[W.ScenePair] | None = None, *, n: int = 1000, seed: int = EVAL_SEED,
                  image_px: int = 128, tokenizer=None, model_cfg: dict[str, Any] | None = None,
                  preprocess_cfg: dict[str, Any] | None = None, device: str = "cpu",
                  zero_shot_attributes: Sequence[str] = ("shape", "colour", "count", "position"),
                  zero_shot_n: int = 300) -> dict[str, Any]:
    """Held-out quality of a CLIP model on the synthetic world.

    Uses ``pairs`` or ``n`` fresh scenes of stream ``seed``: image->text retrieval top-1/top-5 and
    text->image top-1 among the ``n`` matched captions; ROC AUC of ``clip_score`` (cosine) for matched
    captions vs (a) random other captions, (b) hard mismatches with one attribute changed (also per
    attribute); zero-shot accuracy per attribute on ``zero_shot_n`` labelled scenes of ``seed + 1``.
    """
    pairs = list(pairs) if pairs is not None else W.scene_pairs(n, seed, image_px=image_px)
    img = encode_images(model, [p.image_bytes for p in pairs], preprocess_cfg=preprocess_cfg, device=device)
    enc = lambda texts: encode_texts(model, texts, tokenizer=tokenizer, model_cfg=model_cfg, device=device)  # noqa: E731
    matched = enc([p.captions[0] for p in pairs])
    rand = enc([p.random_caption for p in pairs])
    hard = enc([p.hard_caption for p in pairs])
    s_match = (img * matched).sum(1)
    s_rand = (img * rand).sum(1)
    s_hard = (img * hard).sum(1)
    sim = img @ matched.T
    target = np.arange(len(pairs))
    top5 = np.argsort(-sim, axis=1)[:, :5]
    result: dict[str, Any] = {
        "n": len(pairs),
        "retrieval_i2t_top1": float((sim.argmax(1) == target).mean()),
        "retrieval_i2t_top5": float((top5 == target[:, None]).any(1).mean()),
        "retrieval_t2i_top1": float((sim.argmax(0) == target).mean()),
        "auc_random": roc_auc(s_match, s_rand),
        "auc_hard": roc_auc(s_match, s_hard),
        "auc_hard_by_attribute": {
            a: roc_auc(s_match, s_hard[[p.hard_attribute == a for p in pairs]]) for a in W.HARD_ATTRIBUTES},
        "clip_score_mean": {"matched": float(s_match.mean()), "random": float(s_rand.mean()),
                            "hard": float(s_hard.mean())},
    }
    if zero_shot_attributes:
        labelled = W.heldout_set(zero_shot_n, seed + 1, image_px=image_px)
        result["zero_shot_accuracy"] = {
            a: zero_shot_accuracy(model, labelled.with_attribute(a), tokenizer=tokenizer, model_cfg=model_cfg,
                                  preprocess_cfg=preprocess_cfg, device=device)
            for a in zero_shot_attributes}
    return result


def zero_shot_accuracy(model, labelled: W.LabelledSet, *, tokenizer=None, model_cfg: dict[str, Any] | None = None,
                       preprocess_cfg: dict[str, Any] | None = None, device: str = "cpu") -> float:
    """Top-1 zero-shot accuracy: each class is the mean embedding of its prompts."""
    img = encode_images(model, list(labelled.images), preprocess_cfg=preprocess_cfg, device=device)
    classes = []
    for name in labelled.classnames:
        e = encode_texts(model, labelled.prompts(name), tokenizer=tokenizer, model_cfg=model_cfg,
                         device=device).mean(0)
        classes.append(e / np.linalg.norm(e))
    pred = (img @ np.stack(classes).T).argmax(1)
    return float((pred == np.asarray(labelled.labels)).mean())


def save_model_dir(model, out_dir: str | os.PathLike, *, model_cfg: dict[str, Any] | None = None,
                   preprocess_cfg: dict[str, Any] | None = None, dtype: str = "float16",
                   report: dict[str, Any] | None = None) -> Path:
    """Write an open_clip ``local-dir:`` checkpoint (config JSON + safetensors [+ training.json])."""
    from safetensors.torch import save_file

    if dtype not in ("float16", "float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: use float16, bfloat16 or float32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": copy.deepcopy(model_cfg or TINY_MODEL_CFG),
           "preprocess_cfg": dict(preprocess_cfg or TINY_PREPROCESS_CFG)}
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    tdtype = getattr(torch, dtype)
    state = {k: v.detach().to("cpu", tdtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "producer": "clip_curate.synthetic.train"})
    if report is not None:
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return out


def load_model_dir(path: str | os.PathLike, device: str = "cpu"):
    """``(model, preprocess, tokenizer)`` from an open_clip ``local-dir:`` checkpoint, in eval mode."""
    import open_clip

    name = f"local-dir:{path}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=resolve_device(device))
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def transplant_weights(source, target):
    """Copy into ``target`` every tensor of ``source`` with the same name and shape; returns
    ``(target, number copied)`` (e.g. a trained text tower under a freshly initialised image tower)."""
    src, dst = source.state_dict(), target.state_dict()
    taken = {k: v.to(dst[k].dtype) for k, v in src.items() if k in dst and dst[k].shape == v.shape}
    target.load_state_dict({**dst, **taken})
    return target, len(taken)


def hard_caption_pools(pairs: Sequence[W.ScenePair], pool: int, seed: int,
                       weights: dict[str, float] | None = None) -> list[tuple[str, ...]]:
    """Per scene: its hard caption plus ``pool - 1`` more, each with one attribute changed
    (drawn uniformly or by ``weights``), so training sees many different one-word-wrong captions."""
    out = []
    for i, p in enumerate(pairs):
        rng = np.random.default_rng([seed, 31, i])
        extra = []
        for _ in range(pool - 1):
            changed, _ = W.change_one_attribute(p.attrs, rng, weights=weights)
            extra.append(W.describe(changed, rng))
        out.append((p.hard_caption, *extra))
    return out


def build_arg_parser(prog: str = "python -m clip_curate.synthetic.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train the small open_clip model 'synthetic-tiny' on the synthetic world and "
                               "write an open_clip local-dir checkpoint with held-out figures.")
    p.add_argument("--output", required=True, help="directory for open_clip_config.json, "
                   "open_clip_model.safetensors and training.json")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per step (default: 128)")
    p.add_argument("--scenes", type=int, default=15000, help="distinct training scenes rendered (default: 15000)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: 0.002)")
    p.add_argument("--model-config", default=None,
                   help="JSON file with an open_clip model_cfg (or {'model_cfg': ...}); default: synthetic-tiny's")
    p.add_argument("--seed", type=int, default=0, help="seed of the training scenes, init and data order (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes rendering scenes (default: min(2, CPUs))")
    p.add_argument("--hard-weights", default=None,
                   help="how often each attribute is the one changed in the hard-negative caption, e.g. "
                        "colour=0.1,shape=0.3,position=0.35,count=0.25 (default: uniform)")
    p.add_argument("--hard-per-image", type=int, default=1,
                   help="hard-negative captions per image in each step (default: 1)")
    p.add_argument("--hard-pool", type=int, default=1,
                   help="hard-negative captions written per scene, drawn from each step (default: 1)")
    p.add_argument("--twins", action="store_true",
                   help="render a minimal-pair twin of every scene (same scene, one attribute changed, drawn "
                        "by --hard-weights) and put each scene and its twin in the same batch")
    p.add_argument("--init-from", default=None,
                   help="continue training from this local-dir checkpoint (its model_cfg is used); with "
                        "--model-config, only the weights whose names and shapes match are taken (e.g. the "
                        "text tower under a new image tower)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: min(200, steps/10))")
    p.add_argument("--no-hard-negatives", dest="hard_negatives", action="store_false",
                   help="train without one-attribute-changed captions as in-batch negatives")
    p.add_argument("--eval-scenes", type=int, default=1000, help="held-out scenes for the figures (default: 1000)")
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED, help=f"held-out stream seed (default: {EVAL_SEED})")
    p.add_argument("--zero-shot-n", type=int, default=300,
                   help="labelled held-out scenes per attribute for zero-shot accuracy; 0 skips (default: 300)")
    p.add_argument("--save-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="weight dtype in the safetensors file (default: float16)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m clip_curate.synthetic.train`` / ``clip-curate train-tiny``; returns an exit code."""
    args = build_arg_parser().parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    for flag, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 2),
                             ("--hard-per-image", args.hard_per_image, 1), ("--hard-pool", args.hard_pool, 1),
                             ("--scenes", args.scenes, 2), ("--eval-scenes", args.eval_scenes, 2)):
        if value < low:
            print(f"{build_arg_parser().prog}: error: {flag} must be >= {low}", file=sys.stderr)
            return 2
    if args.seed == args.eval_seed:
        print("error: --seed must differ from --eval-seed (held-out scenes must be unseen)", file=sys.stderr)
        return 2
    try:
        resolve_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg = TINY_MODEL_CFG
    if args.model_config:
        try:
            with open(args.model_config, encoding="utf-8") as f:
                loaded = json.load(f)
            model_cfg = loaded.get("model_cfg", loaded)
            build_model(model_cfg)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            print(f"error: --model-config {args.model_config}: {exc}", file=sys.stderr)
            return 2
    hard_weights = None
    if args.hard_weights:
        try:
            hard_weights = {k.strip(): float(v) for k, v in (kv.split("=") for kv in args.hard_weights.split(","))}
            if not set(hard_weights) <= set(W.HARD_ATTRIBUTES) or sum(hard_weights.values()) <= 0:
                raise ValueError
        except ValueError:
            print(f"error: --hard-weights: expected e.g. colour=0.1,shape=0.3,position=0.35,count=0.25 "
                  f"(attributes {', '.join(W.HARD_ATTRIBUTES)})", file=sys.stderr)
            return 2
    init_model = None
    if args.init_from:
        try:
            init_model, _, _ = load_model_dir(args.init_from)
            if args.model_config:
                torch.manual_seed(args.seed)
                init_model, taken = transplant_weights(init_model, build_model(model_cfg))
                log(f"--init-from {args.init_from}: took {taken} of {len(init_model.state_dict())} tensors "
                    f"(the rest start from random init)")
            else:
                model_cfg = json.loads((Path(args.init_from) / CONFIG_FILE).read_text("utf-8"))["model_cfg"]
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            print(f"error: --init-from {args.init_from}: {exc}", file=sys.stderr)
            return 2
    t_start = time.time()
    log(f"rendering {args.scenes} training scenes (seed {args.seed}, {args.workers} workers)")
    pairs = W.scene_pairs(args.scenes, args.seed, workers=args.workers, hard_weights=hard_weights, twins=args.twins)
    twin_of = list(range(args.scenes, 2 * args.scenes)) + list(range(args.scenes)) if args.twins else None
    preprocess_cfg = preprocess_cfg_for(model_cfg)
    pixels = images_to_uint8([p.image_bytes for p in pairs], preprocess_cfg)
    t_data = time.time() - t_start
    log(f"data ready in {t_data:.0f}s; training {args.steps} steps x {args.batch_size}")
    t0 = time.time()
    model = train_clip(pixels, [p.captions for p in pairs], model_cfg=model_cfg, preprocess_cfg=preprocess_cfg,
                       steps=args.steps, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, device=args.device,
                       hard_negatives=hard_caption_pools(pairs, args.hard_pool, args.seed, hard_weights)
                       if args.hard_negatives else None, hard_per_image=args.hard_per_image, twin_of=twin_of,
                       warmup_steps=args.warmup_steps, model=init_model, log=log)
    t_train = time.time() - t0
    log("evaluating on held-out scenes")
    metrics = evaluate_clip(model, n=args.eval_scenes, seed=args.eval_seed, device=args.device, model_cfg=model_cfg,
                            preprocess_cfg=preprocess_cfg,
                            zero_shot_attributes=("shape", "colour", "count", "position") if args.zero_shot_n else (),
                            zero_shot_n=args.zero_shot_n)
    n_params = sum(p.numel() for p in model.parameters())
    report = {
        "model": MODEL_NAME, "params": n_params,
        "params_without_token_embedding": n_params - model.token_embedding.weight.numel(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "quiet", "model_config")},
        "model_cfg": model_cfg,
        "timings_s": {"data": round(t_data, 1), "train": round(t_train, 1),
                      "total": round(time.time() - t_start, 1)},
        "hardware": {"device": str(resolve_device(args.device)), "torch_threads": torch.get_num_threads(),
                     "cpu_count": os.cpu_count(), "machine": platform.machine(),
                     "gpu": torch.cuda.get_device_name(0) if resolve_device(args.device).type == "cuda" else None,
                     "torch": torch.__version__},
        "heldout": metrics,
    }
    out = save_model_dir(model.cpu(), args.output, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg,
                         dtype=args.save_dtype, report=report)
    report["weights_bytes"] = (out / WEIGHTS_FILE).stat().st_size
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"output": str(out), "params": n_params, "weights_bytes": report["weights_bytes"],
                      "train_s": report["timings_s"]["train"], **{k: metrics[k] for k in (
                          "retrieval_i2t_top1", "auc_random", "auc_hard")}}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
