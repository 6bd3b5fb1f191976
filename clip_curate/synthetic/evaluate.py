"""``clip-curate evaluate``: does the curation help? Train the same small CLIP on raw vs curated pairs.

Both arms train the same open_clip config (:data:`PROXY_MODEL_CFG`, random init) with
:func:`clip_curate.synthetic.train.train_clip` for the same number of samples seen (``--steps`` x
``--batch-size``), from the same seed, then are scored on one labelled held-out set:

- zero-shot classification accuracy per label attribute (classes = the attribute's values, each
  class embedded as the mean of its prompts), and their mean (the headline figure);
- image->text and text->image retrieval recall@1/5 among the held-out images and their captions.

``--groups FILE`` (JSON ``{"attribute": "concept", "groups": {"head": [...], "tail": [...]}}``) also scores
every attribute on the subsets of held-out images whose label of that attribute is in each group (e.g. head vs
tail concepts of a long-tailed world): metrics ``zero_shot/<attribute>@<group>``.

Several ``--seeds`` give mean, standard deviation and range per arm; ``evaluation.json`` holds every
run and the paired (same seed) curated - raw differences, ``evaluation.png`` plots them.

Arms (``--raw``, ``--curated``) are image pools: a clip-curate output ``OUT`` (its ``curated/``
Parquet), any Parquet with an ``image`` (or img2dataset ``jpg``) and a ``caption`` (or ``txt``)
column, or a WebDataset export (``*.tar``). ``--raw`` may also be the URL list itself: it is then
downloaded and decoded by ``clip-curate run --stages download,image`` (no filtering at all) into
``--output/raw-pool``, so the raw arm is "every pair whose image downloaded", the pool the curated
run started from. Unknown flags are passed to that run (``--allow-private-addresses``, ``--resolve``...).

The held-out set (``--eval-set``) is a directory with ``eval.parquet`` (``image``, ``caption``,
``label_<attribute>`` columns) and ``classes.json`` (``{attribute: {"classes": [...], "prompts":
{class: [...]}}}``); ``--make-eval-set DIR`` writes one from fresh synthetic-world scenes
(:func:`clip_curate.synthetic.world.heldout_set`, a seed the world never uses), labelled by all seven world
attributes (``--eval-attributes`` adds ``concept``, the colour-shape pair of a long-tailed world).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import posixpath
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from clip_curate.fields import ConfigError
from clip_curate.schemas import image_bytes

log = logging.getLogger(__name__)

EVAL_FILE = "eval.parquet"
CLASSES_FILE = "classes.json"
RESULT_FILE = "evaluation.json"
PLOT_FILE = "evaluation.png"
CLASSES_METADATA_KEY = b"clip_curate.classes"
#: Seed of ``--make-eval-set`` scenes (distinct from world/training seeds used in the project).
DEFAULT_EVAL_SEED = 31_337
DEFAULT_PROMPT = "a photo of a {}."

#: The proxy model: synthetic-tiny's image/text towers, narrower and shallower so one arm of the default
#: run stays within minutes on a CPU (64 px ViT, 16 px patches; 32-token text over open_clip's BPE).
PROXY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 96, "layers": 3, "head_width": 32,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


# ---------------------------------------------------------------------------------------------
# Metrics (pure numpy)

def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: Sequence[int]) -> float:
    """Top-1 accuracy of ``argmax_c cos(image_i, class_c)`` against ``labels`` (class indices).

    Ties count as wrong unless the true class is the only maximum (a collapsed model scores 0)."""
    sims = _normalise(image_emb) @ _normalise(class_emb).T
    labels = np.asarray(labels)
    true = sims[np.arange(len(labels)), labels]
    beaten = (sims >= true[:, None]).sum(1) - 1  # classes scoring at least as high as the true one
    return float((beaten == 0).mean()) if len(labels) else float("nan")


def class_embeddings(prompt_emb: Sequence[np.ndarray]) -> np.ndarray:
    """One embedding per class: the normalised mean of its (normalised) prompt embeddings."""
    return _normalise(np.stack([_normalise(e).mean(0) for e in prompt_emb]))


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, ks: Sequence[int] = (1, 5),
                     groups: Sequence[Any] | None = None) -> dict[str, float]:
    """Image->text and text->image recall@k for paired rows (``image_emb[i]`` <-> ``text_emb[i]``).

    ``groups[i]`` (optional, e.g. the caption text) marks interchangeable rows: any member of i's
    group counts as a hit. The rank of the best hit counts every non-member scoring at least as high
    (ties are pessimistic, so a collapsed model scores 0)."""
    sim = _normalise(image_emb) @ _normalise(text_emb).T
    n = sim.shape[0]
    g = np.asarray(range(n) if groups is None else [hash(x) for x in groups])
    _, gid = np.unique(g, return_inverse=True)
    same = gid[:, None] == gid[None, :]

    def ranks(s: np.ndarray) -> np.ndarray:
        best = np.where(same, s, -np.inf).max(1)
        return (np.where(same, -np.inf, s) >= best[:, None]).sum(1)

    r_i2t, r_t2i = ranks(sim), ranks(sim.T)
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float((r_i2t < k).mean()) if n else float("nan")
        out[f"t2i_r@{k}"] = float((r_t2i < k).mean()) if n else float("nan")
    return out


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean, std (sample, ddof=1; 0 for one value), min, max, n."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def compare(raw: Sequence[float], curated: Sequence[float]) -> dict[str, Any]:
    """Paired (same seed) comparison of one metric: curated - raw per seed, its mean, and whether the
    mean margin exceeds the seed-to-seed spread (the larger of the two arms' standard deviations)."""
    d = np.asarray(curated, dtype=np.float64) - np.asarray(raw, dtype=np.float64)
    spread = max(summarize(raw)["std"], summarize(curated)["std"])
    return {"delta_per_seed": [float(x) for x in d], "delta_mean": float(d.mean()), "spread": spread,
            "margin_exceeds_spread": bool(len(d) > 1 and d.mean() > spread),
            "curated_better_every_seed": bool((d > 0).all())}


# ---------------------------------------------------------------------------------------------
# Pools and the held-out set

@dataclass
class Pool:
    """Image–caption pairs preprocessed for the proxy model (uint8 ``[N, 3, S, S]``), sorted by uid."""

    source: str
    pixels: Any
    captions: list[str]
    uids: list[str]
    kind: str
    load_s: float = 0.0


def _fs(path: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot open {path!r}: {exc}") from None


def _pick(names: Iterable[str], options: Sequence[str]) -> str | None:
    names = list(names)
    return next((o for o in options if o in names), None)


def pool_kind(path: str) -> str:
    """``parquet`` (image pool), ``webdataset`` (tar shards) or ``urls`` (a URL list, no images)."""
    import pyarrow.parquet as pq

    fs, p = _fs(path)
    if not fs.exists(p):
        raise ConfigError(f"{path!r} not found")
    if fs.isdir(p):
        if fs.isdir(posixpath.join(p, "curated")):
            return "parquet"
        files = sorted(fs.find(p))
        if any(f.endswith(".tar") for f in files):
            return "webdataset"
        pqs = [f for f in files if f.endswith(".parquet") and not posixpath.basename(f).startswith((".", "_"))]
        if not pqs:
            return "urls"
        p = pqs[0]
    if p.endswith(".tar"):
        return "webdataset"
    if not p.endswith(".parquet"):
        return "urls"
    with fs.open(p, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return "parquet" if _pick(names, ("image", "jpg")) else "urls"


def _parquet_files(path: str) -> tuple[Any, list[str]]:
    fs, p = _fs(path)
    if fs.isdir(p):
        if fs.isdir(posixpath.join(p, "curated")):
            p = posixpath.join(p, "curated")
        return fs, sorted(f for f in fs.find(p) if f.endswith(".parquet")
                          and not posixpath.basename(f).startswith((".", "_")))
    return fs, [p]


def load_pool(path: str, preprocess_cfg: dict[str, Any], *, batch_rows: int = 512) -> Pool:
    """Read an image pool, one record batch at a time, straight into the model's uint8 pixels."""
    import pyarrow.parquet as pq
    import torch

    from clip_curate.synthetic import train

    t0 = time.time()
    kind = pool_kind(path)
    chunks, caps, uids = [], [], []
    if kind == "parquet":
        fs, files = _parquet_files(path)
        for f in files:
            with fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                names = pf.schema_arrow.names
                img_col, cap_col = _pick(names, ("image", "jpg")), _pick(names, ("caption", "txt"))
                uid_col = _pick(names, ("uid", "key", "__key__"))
                if not img_col or not cap_col:
                    raise ConfigError(f"{f}: needs an image (image/jpg) and a caption (caption/txt) column")
                cols = [c for c in (uid_col, img_col, cap_col) if c]
                for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
                    d = batch.to_pydict()
                    images = [image_bytes(im) for im in d[img_col]]  # bytes, or the {bytes, path} image struct
                    keep = [i for i, (im, c) in enumerate(zip(images, d[cap_col])) if im and c]
                    chunks.append(train.images_to_uint8([images[i] for i in keep], preprocess_cfg))
                    caps += [d[cap_col][i] for i in keep]
                    uids += [str(d[uid_col][i]) if uid_col else f"{f}:{len(uids) + j}" for j, i in enumerate(keep)]
    elif kind == "webdataset":
        import webdataset as wds

        fs, p = _fs(path)
        shards = sorted(f for f in fs.find(p) if f.endswith(".tar")) if fs.isdir(p) else [p]
        urls = [s if fs.protocol in ("file", ("file", "local")) else fs.unstrip_protocol(s) for s in shards]
        batch_imgs: list[bytes] = []
        for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
            img = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            if img is None or "txt" not in sample:
                continue
            batch_imgs.append(img)
            caps.append(sample["txt"].decode("utf-8"))
            uids.append(sample["__key__"])
            if len(batch_imgs) >= batch_rows:
                chunks.append(train.images_to_uint8(batch_imgs, preprocess_cfg))
                batch_imgs = []
        chunks.append(train.images_to_uint8(batch_imgs, preprocess_cfg))
    else:
        raise ConfigError(f"{path!r} holds no images (a URL list?); pass it as --raw to have it downloaded, "
                          "or pass a clip-curate output / image Parquet / WebDataset export")
    pixels = torch.cat(chunks) if chunks else torch.zeros((0, 3, 64, 64), dtype=torch.uint8)
    order = sorted(range(len(uids)), key=lambda i: uids[i])  # runner output order must not change training
    pixels = pixels[torch.as_tensor(order, dtype=torch.long)] if order else pixels
    return Pool(path, pixels, [caps[i] for i in order], [uids[i] for i in order], kind, time.time() - t0)


def download_raw_pool(urls: str, out_dir: str, run_args: Sequence[str]) -> str:
    """``clip-curate run --stages download,image`` (no filtering) of a URL list into ``out_dir``."""
    from clip_curate.run import run

    argv = ["--input", urls, "--output", out_dir, "--stages", "download,image", "--no-store-embeddings",
            *run_args]
    log.info("raw arm: downloading %s (clip-curate run %s)", urls, " ".join(argv))
    run(argv)
    return out_dir


@dataclass
class EvalSet:
    """Labelled held-out images: ``labels[attr][i]`` indexes ``classes[attr]``."""

    pixels: Any
    captions: list[str]
    labels: dict[str, np.ndarray]
    classes: dict[str, list[str]]
    prompts: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    #: ``{group: boolean mask over the images}`` (``--groups``): zero-shot accuracy is also scored per group.
    groups: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


def make_eval_set(out_dir: str, n: int = 1000, seed: int = DEFAULT_EVAL_SEED, image_px: int = 128,
                  attributes: Sequence[str] | None = None) -> str:
    """Write ``n`` fresh labelled synthetic scenes as an eval set, labelled by ``attributes`` (default: the
    seven world attributes; ``concept`` adds the colour-shape pair)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clip_curate.synthetic import world as W

    if n < 2:
        raise ConfigError(f"--eval-size must be >= 2, got {n}")
    attributes = list(attributes or W.LABEL_ATTRIBUTES)
    known = W.LABEL_ATTRIBUTES + ("concept",)
    unknown = [a for a in attributes if a not in known]
    if unknown:
        raise ConfigError(f"--eval-attributes: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    ls = W.heldout_set(n, seed, image_px=image_px)
    classes = {a: {"classes": list(W.attribute_classes(a)),
                   "prompts": {c: W.zero_shot_prompts(a, c) for c in W.attribute_classes(a)}}
               for a in attributes}
    cols: dict[str, list] = {"uid": [it.uid for it in ls.items], "image": list(ls.images),
                             "caption": [it.caption for it in ls.items]}
    for a in attributes:
        cols[f"label_{a}"] = [W.label_value(it.truth, a) for it in ls.items]
    table = pa.table(cols)
    meta = {"seed": seed, "n": n, "image_px": image_px, "attributes": classes}
    table = table.replace_schema_metadata({CLASSES_METADATA_KEY: json.dumps(meta).encode()})
    fs, p = _fs(out_dir)
    fs.makedirs(p, exist_ok=True)
    with fs.open(posixpath.join(p, EVAL_FILE), "wb") as f:
        pq.write_table(table, f)
    with fs.open(posixpath.join(p, CLASSES_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return out_dir


def load_eval_set(path: str, preprocess_cfg: dict[str, Any], attributes: Sequence[str] = (),
                  groups: dict[str, Any] | None = None) -> EvalSet:
    """Read ``--eval-set`` (a directory with eval.parquet [+ classes.json], or the Parquet file); ``groups``
    (``{"attribute": a, "groups": {name: [class, ...]}}``) selects image subsets to score apart."""
    import pyarrow.parquet as pq

    from clip_curate.synthetic import train

    fs, p = _fs(path)
    if fs.isdir(p):
        p = posixpath.join(p, EVAL_FILE)
    if not fs.exists(p):
        raise ConfigError(f"--eval-set {path!r}: no {EVAL_FILE}; make one with "
                          f"'clip-curate evaluate --make-eval-set DIR'")
    with fs.open(p, "rb") as f:
        table = pq.read_table(f)
    meta: dict[str, Any] = {}
    side = posixpath.join(posixpath.dirname(p), CLASSES_FILE)
    if fs.exists(side):
        meta = json.loads(fs.cat(side))
    elif table.schema.metadata and CLASSES_METADATA_KEY in table.schema.metadata:
        meta = json.loads(table.schema.metadata[CLASSES_METADATA_KEY])
    declared = meta.get("attributes", {})
    names = table.column_names
    img_col, cap_col = _pick(names, ("image", "jpg")), _pick(names, ("caption", "txt"))
    found = [n[len("label_"):] for n in names if n.startswith("label_")]
    if not img_col or not found:
        raise ConfigError(f"--eval-set {path!r}: needs an image column and label_<attribute> columns")
    attrs = list(attributes) or found
    missing = [a for a in attrs if a not in found]
    if missing:
        raise ConfigError(f"--attributes: {', '.join(missing)} not in the eval set; choose from {', '.join(found)}")
    labels, classes, prompts = {}, {}, {}
    for a in attrs:
        values = [str(v) for v in table.column(f"label_{a}").to_pylist()]
        cls = [str(c) for c in declared.get(a, {}).get("classes", [])] or sorted(set(values))
        unknown = set(values) - set(cls)
        if unknown:
            raise ConfigError(f"--eval-set: label_{a} values {sorted(unknown)[:3]} not among its classes")
        labels[a] = np.array([cls.index(v) for v in values])
        classes[a] = cls
        declared_prompts = declared.get(a, {}).get("prompts", {})
        prompts[a] = {c: list(declared_prompts.get(c) or [DEFAULT_PROMPT.format(c)]) for c in cls}
    captions = [str(c) for c in table.column(cap_col).to_pylist()] if cap_col else []
    masks = group_masks(groups, {a: [str(v) for v in table.column(f"label_{a}").to_pylist()] for a in found})
    pixels = train.images_to_uint8(table.column(img_col).to_pylist(), preprocess_cfg)
    return EvalSet(pixels, captions, labels, classes, prompts, masks)


def group_masks(groups: dict[str, Any] | None, labels: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """``{group: mask}`` of the held-out images whose ``groups["attribute"]`` label is in each group's classes."""
    if not groups:
        return {}
    if not isinstance(groups, dict) or not isinstance(groups.get("groups"), dict) or not groups["groups"]:
        raise ConfigError('--groups: expected {"attribute": NAME, "groups": {GROUP: [CLASS, ...], ...}}')
    attr = groups.get("attribute")
    if attr not in labels:
        raise ConfigError(f"--groups: attribute {attr!r} has no label_{attr} column in the eval set; "
                          f"choose from {', '.join(labels)}")
    values = np.asarray(labels[attr], dtype=object)
    out = {}
    for name, members in groups["groups"].items():
        if not isinstance(members, (list, tuple)) or not members:
            raise ConfigError(f"--groups: group {name!r} needs a non-empty list of {attr} classes")
        out[str(name)] = np.isin(values, [str(m) for m in members])
        if not out[str(name)].any():
            raise ConfigError(f"--groups: no held-out image of group {name!r} ({', '.join(map(str, members[:3]))}"
                              f"{' ...' if len(members) > 3 else ''}); check the label_{attr} classes")
    return out


# ---------------------------------------------------------------------------------------------
# Scoring and the experiment

def score_model(model, eval_set: EvalSet, *, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any],
                device: str = "cpu") -> dict[str, Any]:
    """Zero-shot accuracy per attribute (+ mean) and retrieval recall of ``model`` on ``eval_set``."""
    from clip_curate.synthetic import train

    tok = train.make_tokenizer(model_cfg)
    img = train.encode_images(model, eval_set.pixels, preprocess_cfg=preprocess_cfg, device=device)
    zs: dict[str, float] = {}
    groups: dict[str, dict[str, float]] = {}
    for a, cls in eval_set.classes.items():
        per_class = [train.encode_texts(model, eval_set.prompts[a][c], tokenizer=tok, device=device) for c in cls]
        class_emb = class_embeddings(per_class)
        zs[a] = zero_shot_accuracy(img, class_emb, eval_set.labels[a])
        for g, mask in eval_set.groups.items():
            groups.setdefault(g, {})[a] = zero_shot_accuracy(img[mask], class_emb, eval_set.labels[a][mask])
    out: dict[str, Any] = {"zero_shot": zs, "zero_shot_mean": float(np.mean(list(zs.values())))}
    if groups:
        out["zero_shot_groups"] = groups
    if eval_set.captions:
        txt = train.encode_texts(model, eval_set.captions, tokenizer=tok, device=device)
        out["retrieval"] = retrieval_recall(img, txt, groups=eval_set.captions)
    return out


def flat_metrics(run: dict[str, Any]) -> dict[str, float]:
    """``{"zero_shot_mean": .., "zero_shot/shape": .., "retrieval/i2t_r@1": ..}`` of one scored run."""
    out = {"zero_shot_mean": run["zero_shot_mean"]}
    out.update({f"zero_shot/{a}": v for a, v in run["zero_shot"].items()})
    out.update({f"zero_shot/{a}@{g}": v for g, accs in run.get("zero_shot_groups", {}).items()
                for a, v in accs.items()})
    out.update({f"retrieval/{k}": v for k, v in run.get("retrieval", {}).items()})
    return out


def run_seed(name: str, pool: Pool, eval_set: EvalSet, seed: int, *, model_cfg: dict[str, Any],
             preprocess_cfg: dict[str, Any], steps: int, batch_size: int, lr: float, warmup_steps: int | None,
             device: str) -> dict[str, Any]:
    """Train the proxy on one arm's pool from ``seed`` and score it on the held-out set (one run)."""
    from clip_curate.synthetic import train

    log.info("%s arm, seed %d: training %d steps x %d on %d pairs", name, seed, steps, batch_size, len(pool.captions))
    t0 = time.time()
    model = train.train_clip(pool.pixels, pool.captions, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg,
                             steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, seed=seed,
                             device=device, log=lambda s: log.info("%s seed %d: %s", name, seed, s),
                             log_every=max(1, steps // 5))
    train_s = time.time() - t0
    scored = score_model(model, eval_set, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg, device=device)
    log.info("%s arm, seed %d: zero-shot mean %.3f %s, retrieval %s (%.0fs)", name, seed, scored["zero_shot_mean"],
             json.dumps({k: round(v, 3) for k, v in scored["zero_shot"].items()}),
             json.dumps({k: round(v, 3) for k, v in scored.get("retrieval", {}).items()}), train_s)
    return {"seed": seed, "train_s": round(train_s, 1), **scored}


def arm_result(pool: Pool, runs: list[dict[str, Any]], metrics: list[dict[str, float]], *, steps: int,
               batch_size: int) -> dict[str, Any]:
    """One arm of ``evaluation.json``: its pool, every run, and the per-metric summary over seeds."""
    return {"source": pool.source, "source_kind": pool.kind, "pairs": len(pool.captions),
            "epochs": steps * batch_size / len(pool.captions), "load_s": round(pool.load_s, 1),
            "runs": runs, "summary": {k: summarize([m[k] for m in metrics]) for k in metrics[0]}}


def format_table(result: dict[str, Any]) -> str:
    """The raw-vs-curated table printed by the command (mean ± sd over seeds; Δ = paired mean)."""
    raw, cur, cmp_ = result["arms"]["raw"]["summary"], result["arms"]["curated"]["summary"], result["comparison"]
    seeds = result["settings"]["seeds"]
    lines = [f"{'metric':<38}{'raw':>17}{'curated':>17}{'Δ (curated-raw)':>18}  margin > spread",
             "-" * 106]
    for k in raw:
        chance = result["chance"].get(k)
        label = k + (f" (chance {chance:.2f})" if chance is not None else "")
        c = cmp_[k]
        lines.append(f"{label:<38.38}{raw[k]['mean']:>10.3f} ± {raw[k]['std']:.3f}{cur[k]['mean']:>10.3f} ± "
                     f"{cur[k]['std']:.3f}{c['delta_mean']:>+18.3f}  {'yes' if c['margin_exceeds_spread'] else 'no'}")
    a = result["arms"]
    lines.append(f"pairs: raw {a['raw']['pairs']}, curated {a['curated']['pairs']}; samples seen per run "
                 f"{result['settings']['samples_seen']}; seeds {','.join(map(str, seeds))}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> str:
    """Grouped bars (mean over seeds, error bar = sd, dots = seeds) of raw vs curated per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result["arms"]["raw"]["summary"])
    fig, ax = plt.subplots(figsize=(max(7, 0.85 * len(keys) + 2), 4.2), dpi=110)
    x = np.arange(len(keys))
    width = 0.38
    for j, (arm, colour) in enumerate((("raw", "#9aa5b1"), ("curated", "#2f7ed8"))):
        summ = result["arms"][arm]["summary"]
        means = [summ[k]["mean"] for k in keys]
        sds = [summ[k]["std"] for k in keys]
        pos = x + (j - 0.5) * width
        ax.bar(pos, means, width, yerr=sds, capsize=3, color=colour,
               label=f"{arm} ({result['arms'][arm]['pairs']} pairs)")
        for i, k in enumerate(keys):
            vals = [flat_metrics(r)[k] for r in result["arms"][arm]["runs"]]
            ax.scatter([pos[i]] * len(vals), vals, s=9, color="black", zorder=3)
    for i, k in enumerate(keys):
        if k in result["chance"]:
            ax.plot([x[i] - width, x[i] + width], [result["chance"][k]] * 2, color="#d9534f", lw=1, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels([k.replace("zero_shot/", "zs ").replace("retrieval/", "").replace("zero_shot_mean", "zs MEAN")
                        for k in keys], rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy / recall")
    s = result["settings"]
    ax.set_title(f"small CLIP trained on raw vs curated pairs: {s['steps']} steps x {s['batch_size']}, "
                 f"seeds {','.join(map(str, s['seeds']))} (dashed: chance)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fs, p = _fs(path)
    with fs.open(p, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def evaluate(raw: Pool, curated: Pool, eval_set: EvalSet, *, seeds: Sequence[int] = (0, 1, 2), steps: int = 2000,
             batch_size: int = 64, lr: float = 2e-3, warmup_steps: int | None = None,
             model_cfg: dict[str, Any] | None = None, preprocess_cfg: dict[str, Any] | None = None,
             device: str = "cpu") -> dict[str, Any]:
    """Train the proxy model on both pools for every seed and compare; returns the evaluation dict."""
    import torch

    from clip_curate.synthetic import train

    model_cfg = copy.deepcopy(model_cfg or PROXY_MODEL_CFG)
    preprocess_cfg = dict(preprocess_cfg or train.TINY_PREPROCESS_CFG)
    pools = {"raw": raw, "curated": curated}
    for name, pool in pools.items():
        if len(pool.captions) < batch_size:
            raise ConfigError(f"--batch-size {batch_size} is larger than the {name} pool ({len(pool.captions)} "
                              "pairs); lower --batch-size so both arms see the same samples")
        if len(pool.captions) < 2:
            raise ConfigError(f"the {name} pool has {len(pool.captions)} pairs; need at least 2")
    t0 = time.time()
    common = dict(model_cfg=model_cfg, preprocess_cfg=preprocess_cfg, steps=steps, batch_size=batch_size, lr=lr,
                  warmup_steps=warmup_steps, device=device)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in pools}
    for seed in seeds:  # seed-major, so an interrupted run still has paired results in its log
        for name, pool in pools.items():
            runs[name].append(run_seed(name, pool, eval_set, seed, **common))
    metrics = {name: [flat_metrics(r) for r in runs[name]] for name in pools}
    arms = {name: arm_result(pool, runs[name], metrics[name], steps=steps, batch_size=batch_size)
            for name, pool in pools.items()}
    keys = list(arms["raw"]["summary"])
    comparison = {k: compare([m[k] for m in metrics["raw"]], [m[k] for m in metrics["curated"]]) for k in keys}
    chance = {f"zero_shot/{a}": 1 / len(c) for a, c in eval_set.classes.items()}
    chance.update({f"zero_shot/{a}@{g}": 1 / len(c) for a, c in eval_set.classes.items() for g in eval_set.groups})
    chance["zero_shot_mean"] = float(np.mean(list(chance.values())))
    n = len(eval_set)
    for k in keys:
        if k.startswith("retrieval/") and n:
            chance[k] = min(1.0, int(k.rsplit("@", 1)[1]) / n)
    return {
        "settings": {"steps": steps, "batch_size": batch_size, "samples_seen": steps * batch_size, "lr": lr,
                     "warmup_steps": warmup_steps, "seeds": list(seeds), "device": str(device),
                     "torch_threads": torch.get_num_threads(), "model_cfg": model_cfg,
                     "preprocess_cfg": preprocess_cfg,
                     "params": sum(p.numel() for p in train.build_model(model_cfg).parameters())},
        "eval_set": {"size": n, "attributes": {a: c for a, c in eval_set.classes.items()}},
        "arms": arms, "comparison": comparison, "chance": chance,
        "headline": {"metric": "zero_shot_mean", **comparison["zero_shot_mean"],
                     "raw": arms["raw"]["summary"]["zero_shot_mean"],
                     "curated": arms["curated"]["summary"]["zero_shot_mean"]},
        "seconds": round(time.time() - t0, 1),
    }


# ---------------------------------------------------------------------------------------------
# CLI

def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clip-curate evaluate",
        description="Proxy evaluation: train the same small CLIP on raw vs curated pairs (same samples seen) and "
                    "compare zero-shot accuracy and retrieval recall on a labelled held-out set. Unknown flags go "
                    "to the download run when --raw is a URL list.")
    p.add_argument("--raw", help="raw pool: URL list (downloaded with --stages download,image), clip-curate output, "
                                 "image Parquet or WebDataset export")
    p.add_argument("--curated", help="curated pool: clip-curate output OUT (or OUT/curated), image Parquet or "
                                     "WebDataset export")
    p.add_argument("--eval-set", help="labelled held-out set: directory with eval.parquet (+ classes.json)")
    p.add_argument("--output", default="evaluation", help="directory for evaluation.json and evaluation.png "
                                                          "(default: ./evaluation)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (default: 2000)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per step (default: 64)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: 0,1,2)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: 0.002)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default: min(200, steps/10))")
    p.add_argument("--model-config", default=None,
                   help="JSON file with an open_clip model_cfg (or {'model_cfg': ...}); default: the proxy config")
    p.add_argument("--attributes", default="", help="comma-separated label attributes to score (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--make-eval-set", metavar="DIR", default=None,
                   help="write a labelled held-out set of fresh synthetic scenes to DIR and exit")
    p.add_argument("--eval-size", type=int, default=1000, help="images in --make-eval-set (default: 1000)")
    p.add_argument("--eval-attributes", default="",
                   help="comma-separated label attributes of --make-eval-set (default: the seven world attributes; "
                        "'concept' adds the colour-shape pair)")
    p.add_argument("--groups", default=None, metavar="FILE",
                   help='JSON {"attribute": A, "groups": {NAME: [CLASS, ...]}}: also score every attribute on the '
                        "held-out images whose A label is in each group (e.g. head vs tail concepts)")
    p.add_argument("--eval-seed", type=int, default=DEFAULT_EVAL_SEED,
                   help=f"scene seed of --make-eval-set (default: {DEFAULT_EVAL_SEED})")
    return p


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give one or more distinct integers, e.g. 0,1,2")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    """``clip-curate evaluate``; returns the exit code (user mistakes raise ``ConfigError``)."""
    import torch

    from clip_curate.synthetic import train

    args, rest = build_arg_parser().parse_known_args(argv)
    if args.make_eval_set:
        make_eval_set(args.make_eval_set, args.eval_size, args.eval_seed,
                      attributes=[a.strip() for a in args.eval_attributes.split(",") if a.strip()] or None)
        print(f"eval set: {args.eval_size} labelled scenes (seed {args.eval_seed}) in {args.make_eval_set}")
        return 0
    for flag in ("raw", "curated", "eval_set"):
        if not getattr(args, flag):
            raise ConfigError(f"--{flag.replace('_', '-')} is required (or use --make-eval-set DIR)")
    for flag, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 2)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    seeds = _seeds(args.seeds)
    try:
        train.resolve_device(args.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    model_cfg = PROXY_MODEL_CFG
    if args.model_config:
        try:
            with open(args.model_config, encoding="utf-8") as f:
                loaded = json.load(f)
            model_cfg = loaded.get("model_cfg", loaded)
            train.build_model(model_cfg)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"--model-config {args.model_config}: {exc}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    raw_kind = pool_kind(args.raw)
    if rest and raw_kind != "urls":
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    pre = train.TINY_PREPROCESS_CFG
    attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
    groups = None
    if args.groups:
        try:
            with open(args.groups, encoding="utf-8") as f:
                groups = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--groups {args.groups}: {exc}") from None
    eval_set = load_eval_set(args.eval_set, pre, attributes, groups)
    raw_src = args.raw
    if raw_kind == "urls":
        raw_src = download_raw_pool(args.raw, posixpath.join(args.output.rstrip("/"), "raw-pool"), rest)
    raw = load_pool(raw_src, pre)
    curated = load_pool(args.curated, pre)
    log.info("pools: raw %d pairs, curated %d pairs; eval set %d images", len(raw.captions), len(curated.captions),
             len(eval_set))
    result = evaluate(raw, curated, eval_set, seeds=seeds, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=args.warmup_steps, model_cfg=model_cfg, preprocess_cfg=pre, device=args.device)
    result["inputs"] = {"raw": args.raw, "curated": args.curated, "eval_set": args.eval_set}
    fs, out = _fs(args.output)
    fs.makedirs(out, exist_ok=True)
    with fs.open(posixpath.join(out, RESULT_FILE), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, posixpath.join(args.output.rstrip("/"), PLOT_FILE))
    print(format_table(result))
    print(f"results: {posixpath.join(args.output.rstrip('/'), RESULT_FILE)}  plot: "
          f"{posixpath.join(args.output.rstrip('/'), PLOT_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
