"""Dedup kind ``eval_leak``: rows that copy an item of an evaluation set (``--decontaminate``).

The eval set (a directory of images, or Parquet with image bytes and/or ``image_embedding``) is loaded
when the stage is built; rows match by pHash distance or embedding cosine. Unlike the other kinds it
needs no shared key: every row is looked up in the (small) eval index, a side input.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np

from clip_curate.records import METRICS_NAMESPACE as NS
from clip_curate.stages.dedup.core import DedupKind, KindInputs, register_kind
from clip_curate.stages.dedup.near import band_masks, popcount64

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


@dataclass
class EvalSet:
    """Eval items: pHashes of their images and (optionally) their embeddings, with item names."""

    phashes: np.ndarray            # uint64
    phash_names: list[str]
    embeddings: np.ndarray | None  # (m, d) float32, L2-normalised
    embedding_names: list[str]
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(set(self.phash_names) | set(self.embedding_names))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_index"] = {}
        return state

    def match_phash(self, phash: int, hamming: int) -> tuple[str, int] | None:
        """(name, distance) of the closest eval image within ``hamming``, or None (band index lookup)."""
        if not len(self.phashes):
            return None
        index = self._index.get(hamming)
        if index is None:
            index = self._index[hamming] = _band_index(self.phashes, hamming)
        masks, table = index
        cand = set()
        for b, m in enumerate(masks):
            cand.update(table.get((b, phash & m), ()))
        if not cand:
            return None
        cand = np.array(sorted(cand), dtype=np.int64)
        d = popcount64(self.phashes[cand] ^ np.uint64(phash))
        i = int(np.argmin(d))  # ties: the smallest index (stable, deterministic)
        return (self.phash_names[cand[i]], int(d[i])) if d[i] <= hamming else None

    def match_embeddings(self, emb: np.ndarray, threshold: float) -> list[tuple[str, float] | None]:
        """Per row of ``emb`` (n, d): (name, cosine) of the most similar eval embedding >= threshold."""
        if self.embeddings is None or not len(emb):
            return [None] * len(emb)
        if emb.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"--decontaminate: eval embeddings have {self.embeddings.shape[1]} dimensions "
                             f"but rows have {emb.shape[1]}; embed the eval set with the same CLIP model")
        sims = emb @ self.embeddings.T
        j = np.argmax(sims, axis=1)
        s = sims[np.arange(len(emb)), j]
        return [(self.embedding_names[j[i]], float(s[i])) if s[i] >= threshold else None for i in range(len(emb))]


def _band_index(phashes: np.ndarray, hamming: int):
    masks = band_masks(hamming)
    table: dict[tuple[int, int], list[int]] = {}
    for i, h in enumerate(phashes.tolist()):
        for b, m in enumerate(masks):
            table.setdefault((b, h & m), []).append(i)
    return masks, table


def image_phash(data: bytes) -> int:
    """imagehash pHash of encoded image bytes (as the image stage computes it), as an int."""
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return int(str(imagehash.phash(img.convert("RGB"))), 16)


def load_eval_set(path: str) -> EvalSet:
    """Eval items from a directory of images, or a Parquet with image bytes and/or ``image_embedding``.

    Parquet: the name column is the first of ``uid``, ``key``, ``name``, ``id`` (else ``eval-<row>``);
    the image column the first of ``image``, ``jpg``, ``png``, ``image_bytes`` (bytes, or a Hugging Face
    ``{"bytes": ...}`` struct). Raises ``ConfigError`` when nothing usable is found or an image is corrupt.
    """
    import fsspec

    from clip_curate.fields import ConfigError

    images: list[tuple[str, bytes]] = []
    embs: list[tuple[str, np.ndarray]] = []
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise ConfigError(f"--decontaminate: not found: {path}")
    if fs.isdir(p):
        for f in sorted(fs.find(p)):
            if f.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                name = f[len(p):].lstrip("/") if f.startswith(p) else os.path.basename(f)
                images.append((name, fs.cat_file(f)))
    else:
        import pyarrow.parquet as pq
        try:
            with fs.open(p, "rb") as fh:
                table = pq.read_table(fh)
        except Exception as exc:
            raise ConfigError(f"--decontaminate {path}: not a directory of images or a Parquet file "
                              f"({type(exc).__name__}: {exc})"[:300]) from None
        cols = table.column_names
        name_col = next((c for c in ("uid", "key", "name", "id") if c in cols), None)
        img_col = next((c for c in ("image", "jpg", "png", "image_bytes") if c in cols), None)
        for i, row in enumerate(table.to_pylist()):
            name = str(row[name_col]) if name_col else f"eval-{i}"
            value = row.get(img_col) if img_col else None
            if isinstance(value, dict):
                value = value.get("bytes")
            if value:
                images.append((name, value))
            if row.get("image_embedding") is not None:
                v = np.asarray(row["image_embedding"], dtype=np.float32)
                embs.append((name, v / (np.linalg.norm(v) or 1.0)))
    hashes, names = [], []
    for name, data in images:
        try:
            hashes.append(image_phash(data))
        except Exception as exc:
            raise ConfigError(f"--decontaminate: cannot decode eval image {name}: "
                              f"{type(exc).__name__}: {exc}; remove or fix it"[:300]) from None
        names.append(name)
    if not hashes and not embs:
        raise ConfigError(f"--decontaminate {path}: no eval images ({', '.join(IMAGE_EXTENSIONS)}) or "
                          "image_embedding column found")
    if embs and len({len(e) for _, e in embs}) > 1:
        raise ConfigError(f"--decontaminate {path}: image_embedding rows have different lengths")
    return EvalSet(np.array(hashes, dtype=np.uint64), names,
                   np.stack([e for _, e in embs]).astype(np.float32) if embs else None, [n for n, _ in embs])


class _EvalLeaks(beam.DoFn):
    """Batches of compact rows -> (uid, ("eval_leak", detail, None)) for rows matching an eval item."""

    def __init__(self, cfg):
        self._cfg = cfg
        self._unchecked = beam.metrics.Metrics.counter(NS, "dedup_eval_unchecked")

    def process(self, batch, ev: EvalSet):
        cfg = self._cfg
        found: dict[str, str] = {}
        with_emb = []
        for m in batch:
            checked = False
            if m["phash"] is not None and len(ev.phashes):
                checked = True
                hit = ev.match_phash(m["phash"], cfg.decontaminate_hamming)
                if hit:
                    found[m["uid"]] = f"eval item {hit[0]} (phash distance {hit[1]})"
                    continue
            if m["emb"] is not None and ev.embeddings is not None:
                checked = True
                with_emb.append(m)
            if not checked:
                self._unchecked.inc()
        if with_emb:
            hits = ev.match_embeddings(np.stack([m["emb"] for m in with_emb]), cfg.decontaminate_threshold)
            for m, hit in zip(with_emb, hits):
                if hit:
                    found[m["uid"]] = f"eval item {hit[0]} (cosine {hit[1]:.4f})"
        for uid, detail in found.items():
            yield uid, ("eval_leak", detail, None)


def _decisions(inp: KindInputs):
    ev = inp.compact.pipeline | "EvalSet" >> beam.Create([inp.state])
    return (inp.compact
            | "EvalBatch" >> beam.BatchElements(min_batch_size=64, max_batch_size=2048)
            | "EvalLeaks" >> beam.ParDo(_EvalLeaks(inp.config), beam.pvalue.AsSingleton(ev)))


register_kind(DedupKind(
    None, "eval_leak", priority=0, decisions=_decisions, active=lambda cfg: bool(cfg.decontaminate),
    prepare=lambda cfg: load_eval_set(cfg.decontaminate)))
