"""The embedding stage: open_clip image and text towers through Beam's ``RunInference``.

    rows ─► Prepare (CPU: decode JPEG, the model's resize/crop, tokenize) ─► RunInference(keyed handler,
         batched) ─► Attach (image_embedding, text_embedding, clip_score, embed_model)

Preprocessing runs in its own DoFn before ``RunInference`` and hands the handler uint8 pixels
(4x smaller than float tensors); ToTensor/Normalize of the model's transform run on the device in
the batch. On runners that execute several bundles per process (Dataflow, Flink, the DirectRunner
in multi_threading mode) one thread's decode overlaps another's forward pass on the shared model.
Rows that already carry embeddings made by the same model (``embed_model``) skip the model.

A batch whose forward pass raises (a bad tensor, out of memory) is retried one element at a time;
elements that still fail become ``embed/embed_error`` rows (the exception's first line in ``detail``)
and the job goes on: a dead-letter path inside the handler, so no second model copy is loaded.
"""
from __future__ import annotations

import io
import logging
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np

from clip_curate import records
from clip_curate.models.clip import (Deferred, ModelConfig, autocast_context, embed_model_key, load_preprocess,
                                     open_clip_image_size, shared_clip, validate_model_config)
from clip_curate.process_cache import trim_heap
from clip_curate.stages.base import IMAGE, Stage, register

log = logging.getLogger(__name__)

STAGE = "embed"
EMBED_FIELDS = ("image_embedding", "text_embedding", "clip_score", "embed_model")
METRICS = records.METRICS_NAMESPACE
OPENCV_MIN_SIZE = 224  # model inputs from this size up resize with OpenCV (fast_pixels)


@dataclass(frozen=True)
class PixelPlan:
    """How image bytes become model input: the PIL part of the model's transform, then (on the
    device) ``x / 255``, ``(x - mean) / std`` — exactly open_clip's ToTensor + Normalize.

    ``fast_size``: the PIL part is open_clip's eval ``Resize(S)`` (shortest side) + ``CenterCrop(S)``, which
    :func:`fast_pixels` does on a simplejpeg decode with OpenCV instead (see docs/clip.md for the tolerance)."""

    pil_transform: Any
    mean: tuple[float, float, float] | None  # None: pil_transform already yields the float tensor
    std: tuple[float, float, float] | None
    fast_size: int | None = None


def _shortest_side_crop(steps: list) -> int | None:
    """S when ``steps`` are ``Resize(S, bicubic) + CenterCrop(S) [+ RGB convert]``, else None."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    if len(steps) not in (2, 3) or not isinstance(steps[0], Resize) or not isinstance(steps[1], CenterCrop):
        return None
    if len(steps) == 3 and type(steps[2]).__name__ not in ("MaybeConvertMode", "function"):
        return None
    resize, crop = steps[0], steps[1]
    size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
    if size is None or resize.max_size is not None or tuple(crop.size) != (size, size):
        return None
    if resize.interpolation != InterpolationMode.BICUBIC:
        return None
    return int(size)


def pixel_plan(preprocess, fast: bool = True) -> PixelPlan:
    """Split open_clip's eval ``Compose`` at ToTensor; falls back to the whole transform."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = list(getattr(preprocess, "transforms", []))
    if (len(steps) >= 2 and isinstance(steps[-1], Normalize) and isinstance(steps[-2], ToTensor)
            and not any(isinstance(s, (ToTensor, Normalize)) for s in steps[:-2])):
        norm = steps[-1]
        return PixelPlan(Compose(steps[:-2]), tuple(float(v) for v in norm.mean), tuple(float(v) for v in norm.std),
                         _shortest_side_crop(steps[:-2]) if fast else None)
    return PixelPlan(preprocess, None, None)


def resized_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision's ``Resize(size)`` output ``(w, h)`` and ``CenterCrop(size)`` offsets ``(left, top)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    w, h = (size, new_long) if width <= height else (new_long, size)
    return w, h, int(round((w - size) / 2.0)), int(round((h - size) / 2.0))


def fast_pixels(image_bytes: bytes, size: int) -> np.ndarray:
    """JPEG bytes -> uint8 ``[3, S, S]``: simplejpeg decode, resize of the shortest side to S, centre crop.

    For inputs of ``OPENCV_MIN_SIZE`` px or more, a shrink by less than 2x (the stored 256 px -> 224) is OpenCV's
    bicubic, within the tolerance of docs/clip.md of open_clip's Pillow resize; every other case uses
    Pillow's resize itself, so its pixels are open_clip's exactly (the small synthetic-world models keep
    the pixels they were calibrated on). Raises ValueError on anything but a JPEG."""
    import cv2
    import simplejpeg
    from PIL import Image

    if image_bytes[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    arr = simplejpeg.decode_jpeg(image_bytes, colorspace="RGB")
    height, width = arr.shape[:2]
    w, h, left, top = resized_geometry(width, height, size)
    if (w, h) != (width, height):
        if size >= OPENCV_MIN_SIZE and 1 <= min(width, height) / size < 2:
            arr = cv2.resize(arr, (w, h), interpolation=cv2.INTER_CUBIC)
        else:
            arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC))
    return np.ascontiguousarray(arr[top:top + size, left:left + size].transpose(2, 0, 1))


def prepare_image(image_bytes: bytes, plan: PixelPlan) -> np.ndarray:
    """JPEG/PNG bytes -> model input: uint8 ``[3, S, S]`` (or float32 when the plan has no split)."""
    from PIL import Image

    if plan.fast_size:
        try:
            return fast_pixels(image_bytes, plan.fast_size)
        except Exception:  # noqa: BLE001 - PNG, CMYK JPEG...: the model's own PIL transform below
            pass
    with Image.open(io.BytesIO(image_bytes)) as im:
        im.load()
        out = plan.pil_transform(im.convert("RGB"))
    if plan.mean is None:
        return np.array(out, dtype=np.float32)  # a copy: never a view of a torch tensor (see ClipEmbedder.embed)
    arr = np.asarray(out, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


#: Largest difference allowed between a traced encoder's output and the eager model's (else eager is kept).
TRACE_TOLERANCE = 1e-4


def traced_encoders(loaded, encode_image: Callable, encode_text: Callable) -> tuple[Callable, Callable]:
    """TorchScript traces of the image and text towers (CPU, fp32), checked against the eager model on a
    batch of another size; the eager callables when tracing fails or disagrees.

    Why: an eager forward takes Python's GIL back between its hundreds of ops, so the pipeline's other
    threads (decode, caption rules, Beam's own work) slow it by up to half; a traced forward runs whole in
    C++ and is also ~10 % faster alone (docs/clip.md)."""
    import torch

    model = loaded.model
    size = open_clip_image_size(model)
    ctx = int(getattr(model, "context_length", 77) or 77)

    class _Tower(torch.nn.Module):
        def __init__(self, fn_name: str):
            super().__init__()
            self.model = model
            self.fn_name = fn_name

        def forward(self, x):
            return getattr(self.model, self.fn_name)(x)

    try:
        gen = torch.Generator().manual_seed(0)
        images = [torch.rand(n, 3, size, size, generator=gen) for n in (2, 3)]
        tokens = [torch.randint(1, 400, (n, ctx), generator=gen) for n in (2, 3)]
        for t in tokens:
            t[:, -1] = t.max() + 1  # an end-of-text token, the largest id (open_clip pools at argmax)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image_fn = torch.jit.freeze(torch.jit.trace(_Tower("encode_image").eval(), images[0], check_trace=False))
            text_fn = torch.jit.freeze(torch.jit.trace(_Tower("encode_text").eval(), tokens[0], check_trace=False))
        with torch.inference_mode():
            diff = max(float((image_fn(images[1]) - encode_image(images[1])).abs().max()),
                       float((text_fn(tokens[1]) - encode_text(tokens[1])).abs().max()))
    except Exception as exc:  # noqa: BLE001 - any model tracing cannot follow runs eagerly, as before
        log.info("embed: %s runs eagerly (tracing failed: %s)", loaded.model_id, str(exc).splitlines()[0][:200])
        return encode_image, encode_text
    if not diff <= TRACE_TOLERANCE:
        log.info("embed: %s runs eagerly (traced output differs by %.2g)", loaded.model_id, diff)
        return encode_image, encode_text
    log.info("embed: %s traced for CPU (max difference to eager %.1g)", loaded.model_id, diff)
    return image_fn, text_fn


class ClipEmbedder:
    """The object RunInference shares per process: a loaded model and one ``embed`` call.

    ``embed`` takes and returns numpy arrays, so the object also works as a Beam
    multi-process-shared proxy (``--share-model``)."""

    def __init__(self, config: ModelConfig):
        import torch

        self.loaded = shared_clip(config)  # one copy per process (the safety/audit prompts use it too)
        self.device = self.loaded.device
        self.precision = self.loaded.precision
        self.plan = pixel_plan(self.loaded.preprocess)
        if self.plan.mean is not None:
            self._mean = torch.tensor(self.plan.mean, device=self.device).view(1, 3, 1, 1)
            self._std = torch.tensor(self.plan.std, device=self.device).view(1, 3, 1, 1)
        self._encode_image, self._encode_text = self.loaded.model.encode_image, self.loaded.model.encode_text
        if self.device.type == "cpu" and self.precision == "fp32":
            self._encode_image, self._encode_text = traced_encoders(self.loaded, self._encode_image,
                                                                    self._encode_text)

    def to_model_input(self, images: np.ndarray):
        import torch

        x = torch.from_numpy(images)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0).sub_(self._mean).div_(self._std)
        return x

    def embed(self, images: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[N,3,S,S]`` uint8/float32 pixels, ``[N,ctx]`` int64 tokens -> two L2-normalised float32 ``[N,D]``."""
        import torch

        with torch.inference_mode():
            x = self.to_model_input(images)
            t = torch.from_numpy(tokens).to(self.device, non_blocking=True)
            with autocast_context(self.device.type, self.precision):
                img = self._encode_image(x)
                txt = self._encode_text(t)
            img = torch.nn.functional.normalize(img.float(), dim=-1)
            txt = torch.nn.functional.normalize(txt.float(), dim=-1)
            # Copies: arrays that own their memory. A view of a torch tensor would pin the whole batch
            # per row and free through torch, which aborts (std::terminate) when a worker thread drops
            # the last reference during interpreter exit (PortableRunner LOOPBACK).
            return img.cpu().numpy().copy(), txt.cpu().numpy().copy()


Example = tuple[np.ndarray, np.ndarray]  # (pixels [3,S,S], tokens [ctx])


@dataclass(frozen=True)
class EmbedFailure:
    """The inference of an element whose forward pass raised, alone in its batch too."""

    detail: str


def failure_detail(exc: BaseException) -> str:
    """``embedding failed: <Type>: <first line of the message>`` (addresses stripped, at most 300 chars)."""
    lines = str(exc).strip().splitlines()
    first = re.sub(r" (object )?at 0x[0-9a-fA-F]+", "", lines[0].strip()) if lines else ""
    return f"embedding failed: {exc.__class__.__name__}" + (f": {first}" if first else "")[:300]


def _free_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort before the element-wise retry
        pass


class _ClipHandler:
    """open_clip image + text towers for ``RunInference``: example = (pixels, tokens);
    inference = (image_embedding, text_embedding, clip_score). ``ClipModelHandler`` is this on Beam's
    ``ModelHandler`` (see :func:`__getattr__`)."""

    def __init__(self, config: ModelConfig, *, min_batch_size: int | None = None):
        bs = config.batch_size
        super().__init__(min_batch_size=min(min_batch_size or bs, bs), max_batch_size=bs,
                         large_model=config.share_model)
        self._config = config

    def load_model(self) -> ClipEmbedder:
        """The embedder, loading in the background (``Deferred``): the worker's steps before the model start
        at once. With ``--share-model`` the shared process loads it (a proxy needs the real object)."""
        if self._config.share_model:
            return self._load_embedder()
        return Deferred(self._load_embedder, name="clip-curate-embed-load")

    def _load_embedder(self) -> ClipEmbedder:
        t0 = time.monotonic()
        embedder = ClipEmbedder(self._config)
        trim_heap()  # the checkpoint's tensors and the tracing's transient copies, back to the system
        log.info("embed: loaded %s on %s (%s) in %.1f s", embedder.loaded.model_id, embedder.device,
                 embedder.precision, time.monotonic() - t0)
        return embedder

    def run_inference(self, batch: Sequence[Example], model: ClipEmbedder,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[PredictionResult]:
        """One forward pass over the batch; when it raises, one pass per element, and an element that
        still raises gets an :class:`EmbedFailure` as its inference (the job goes on)."""
        from apache_beam.ml.inference.base import PredictionResult

        t0 = time.monotonic()
        try:
            results = self._embed_batch(batch, model)
        except Exception as exc:  # noqa: BLE001 - any failure of the pass: retry element by element
            log.warning("embed: a batch of %d failed (%s); retrying its elements one by one", len(batch),
                        failure_detail(exc))
            beam.metrics.Metrics.counter(METRICS, "embed_batch_retries").inc()
            _free_device_memory()
            results = []
            for example in batch:
                try:
                    results.extend(self._embed_batch([example], model))
                except Exception as one:  # noqa: BLE001 - this element's problem: a rejected row
                    beam.metrics.Metrics.counter(METRICS, "embed_element_failures").inc()
                    results.append(PredictionResult(None, EmbedFailure(failure_detail(one))))
        msecs = (time.monotonic() - t0) * 1000.0
        beam.metrics.Metrics.distribution(METRICS, "embed_batch_msecs").update(int(msecs))
        per_row = int(round(msecs / max(len(batch), 1)))
        dist = beam.metrics.Metrics.distribution(METRICS, "embed_msecs")
        for _ in batch:
            dist.update(per_row)
        return results

    def _embed_batch(self, batch: Sequence[Example], model: ClipEmbedder) -> list[PredictionResult]:
        from apache_beam.ml.inference.base import PredictionResult

        images = np.stack([e[0] for e in batch])
        tokens = np.stack([e[1] for e in batch]).astype(np.int64, copy=False)
        img, txt = model.embed(images, tokens)
        if len(img) != len(batch) or len(txt) != len(batch):
            raise ValueError(f"the model returned {len(img)} image / {len(txt)} text embeddings for {len(batch)} "
                             "examples")
        scores = np.einsum("nd,nd->n", img, txt)
        if not np.all(np.isfinite(scores)):
            raise FloatingPointError("non-finite embedding (NaN or inf) in the batch")
        beam.metrics.Metrics.counter(METRICS, "embedded_rows").inc(len(batch))
        return [PredictionResult(None, (img[i], txt[i], float(scores[i]))) for i in range(len(batch))]

    def get_num_bytes(self, batch: Sequence[Example]) -> int:
        return sum(e[0].nbytes + e[1].nbytes for e in batch)

    def get_metrics_namespace(self) -> str:
        return "BeamML_OpenCLIP"


_LAZY: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """``ClipModelHandler``, made on first use: Beam's ``apache_beam.ml.inference.base`` imports torch (its
    model manager does), so importing it with this module would load torch into every worker process,
    also those of runs without the embed stage (seconds of CPU and hundreds of MB each)."""
    if name != "ClipModelHandler":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _LAZY:
        from apache_beam.ml.inference.base import ModelHandler

        _LAZY[name] = type(name, (_ClipHandler, ModelHandler), {"__module__": __name__, "__qualname__": name})
    return _LAZY[name]


def has_reusable_embeddings(row: dict[str, Any], key: str) -> bool:
    return (row.get("embed_model") == key and row.get("image_embedding") is not None
            and row.get("text_embedding") is not None and row.get("clip_score") is not None)


class _Prepare(beam.DoFn):
    """CPU side: decode + the model's PIL transform + tokenize; reused rows and failures split off."""

    REUSED = "reused"

    def __init__(self, config: ModelConfig, key: str):
        self._config = config
        self._key = key

    def setup(self):
        # no weights, but open_clip's import takes seconds: in the background, so the steps before start at once
        self._preprocess = Deferred(self._load_preprocess, name="clip-curate-preprocess-load")
        self._plan = self._tokenizer = None
        self._in = beam.metrics.Metrics.counter(METRICS, "embed_in")
        self._reused = beam.metrics.Metrics.counter(METRICS, "embed_reused")
        self._errors = beam.metrics.Metrics.counter(METRICS, "embed_embed_error")
        self._msecs = beam.metrics.Metrics.distribution(METRICS, "embed_msecs")

    def _load_preprocess(self):
        transform, tokenizer = load_preprocess(self._config)
        return pixel_plan(transform), tokenizer

    def process(self, row):
        self._in.inc()
        if self._config.reuse_embeddings and has_reusable_embeddings(row, self._key):
            self._reused.inc()
            yield beam.pvalue.TaggedOutput(self.REUSED, row)
            return
        if self._plan is None:
            self._plan, self._tokenizer = self._preprocess.get()
        t0 = time.monotonic()
        image = row.get("image")
        if not image:
            self._errors.inc()
            stored = row.get("embed_model")
            detail = ("no image bytes" if not stored else
                      f"no image to embed: the row's stored embeddings were made by {stored}, this run uses "
                      f"{self._key} (rows re-read from a rejected table keep no image)")
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, records.reject(row, STAGE, "embed_error", detail))
            return
        try:
            pixels = prepare_image(bytes(image), self._plan)
        except Exception as exc:  # noqa: BLE001 - any decode failure is this row's problem
            self._errors.inc()
            msg = re.sub(r" (object )?at 0x[0-9a-fA-F]+", "", str(exc))
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG, records.reject(
                row, STAGE, "embed_error", f"image decode failed: {exc.__class__.__name__}: {msg}"))
            return
        tokens = self._tokenizer([row.get("caption") or ""])[0].numpy().astype(np.int64)  # a copy, not a torch-backed view
        self._msecs.update(int((time.monotonic() - t0) * 1000))
        yield row, (pixels, tokens)


class _Attach(beam.DoFn):
    """Model output -> the row's embedding fields; an :class:`EmbedFailure` -> an ``embed_error`` row."""

    def __init__(self, key: str):
        self._key = key

    def setup(self):
        self._out = beam.metrics.Metrics.counter(METRICS, "embed_out")
        self._errors = beam.metrics.Metrics.counter(METRICS, "embed_embed_error")

    def process(self, keyed):
        row, result = keyed
        if isinstance(result.inference, EmbedFailure):
            self._errors.inc()
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG,
                                           records.reject(row, STAGE, "embed_error", result.inference.detail))
            return
        img, txt, score = result.inference
        out = dict(row)
        out["image_embedding"] = np.asarray(img, dtype=np.float32)
        out["text_embedding"] = np.asarray(txt, dtype=np.float32)
        out["clip_score"] = float(score)
        out["embed_model"] = self._key
        self._out.inc()
        yield out


class _CountReused(beam.DoFn):
    def setup(self):
        self._out = beam.metrics.Metrics.counter(METRICS, "embed_out")

    def process(self, row):
        self._out.inc()
        yield row


class Embed(beam.PTransform):
    """rows -> (kept, rejected): kept rows gain ``image_embedding``, ``text_embedding`` (float32,
    L2-normalised), ``clip_score`` (cosine) and ``embed_model``; rows whose image can't be decoded are
    rejected ``embed/embed_error``. Rows that already carry embeddings with ``embed_model`` equal to
    this model's key pass through without a forward pass (counter ``embed_reused``)."""

    def __init__(self, config: ModelConfig, resource_hint_accelerator: str | None = None):
        super().__init__()
        self._config = config
        self._accelerator = resource_hint_accelerator or config.accelerator
        self._key = embed_model_key(config)

    @property
    def model_key(self) -> str:
        return self._key

    def handler(self) -> KeyedModelHandler:
        from apache_beam.ml.inference.base import KeyedModelHandler

        return KeyedModelHandler(__getattr__("ClipModelHandler")(self._config))

    def expand(self, rows):
        prepared = rows | "Prepare" >> beam.ParDo(_Prepare(self._config, self._key)).with_outputs(
            records.REJECTED_TAG, _Prepare.REUSED, main="examples")
        from apache_beam.ml.inference.base import RunInference

        inference = RunInference(self.handler())
        if self._accelerator:
            inference = inference.with_resource_hints(accelerator=self._accelerator)
        embedded = (prepared.examples
                    | "RunInference" >> inference
                    | "Attach" >> beam.ParDo(_Attach(self._key)).with_outputs(records.REJECTED_TAG, main="rows"))
        reused = prepared[_Prepare.REUSED] | "CountReused" >> beam.ParDo(_CountReused())
        kept = (embedded.rows, reused) | "Kept" >> beam.Flatten()
        rejected = ((prepared[records.REJECTED_TAG], embedded[records.REJECTED_TAG])
                    | "Rejected" >> beam.Flatten())
        return kept, rejected


def _check(cfg: ModelConfig) -> None:
    if cfg.enabled:
        validate_model_config(cfg)


register(Stage("embed", ModelConfig, build=lambda cfg, ctx: Embed(cfg) if cfg.enabled else None, position=40,
               needs=frozenset({IMAGE}), check=_check, title="CLIP embeddings"))
