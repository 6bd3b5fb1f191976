"""Loading open_clip models for the embedding stage: names, checkpoints, devices and precision.

``--clip-model`` accepts

* ``synthetic-tiny`` — the model bundled with the package (open_clip ``local-dir:`` layout in
  ``clip_curate/data/synthetic-tiny/``), trained by ``clip-curate train-tiny`` on the synthetic world;
* an open_clip architecture name (``ViT-B-32``) with ``--clip-pretrained TAG``
  (``laion2b_s34b_b79k``, ``openai`` ...), downloaded by open_clip from the Hugging Face hub or the
  tag's URL when online and cached (``~/.cache/huggingface`` / ``~/.cache/clip``). Unset, the model is
  ``ViT-B-32`` + ``laion2b_s34b_b79k``. An architecture without a tag is refused (with its tags);
  ``--clip-pretrained none`` asks for seeded random weights on purpose (benchmarks);
* ``hf-hub:org/repo`` — an open_clip model repo on the hub (``open_clip_config.json`` + weights);
* a local path (``local-dir:DIR`` as open_clip writes it, or a plain path): a directory in open_clip ``local-dir:`` layout (``open_clip_config.json`` + weights),
  a weights file with an ``open_clip_config.json`` beside it, or ``--clip-model ARCH
  --clip-pretrained FILE``. Weights are ``.safetensors`` or torch files read with
  ``weights_only=True``: pickled objects are refused, never executed;
* ``test-tiny-random`` — a seeded random-init tiny config, for tests only.

:func:`validate_model_config` runs in the launcher before any download work: names, files, tags, hub
reachability (bounded: a 3 s probe) and, for weights on disk, one safe load of them, so a bad checkpoint
is a one-line error (the bundled synthetic-tiny is not loaded there: its weights ship with the package);
:func:`load_clip` builds the model on a worker, :func:`shared_clip` once per worker process, and
:class:`Deferred` in the background while the worker's other steps start. Which judgments a model's scores
are trusted for is its card's business (:mod:`clip_curate.models.cards`).
"""
from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import logging
import os
import pickle
import socket
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import apache_beam as beam
import numpy as np

from clip_curate.fields import ConfigError, opt
from clip_curate.process_cache import ProcessCache

log = logging.getLogger(__name__)

SYNTHETIC_TINY = "synthetic-tiny"
TEST_TINY_RANDOM = "test-tiny-random"
HF_HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
RANDOM_INIT_SEED = 0
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
RANDOM_PRETRAINED = "none"  # --clip-pretrained none: random weights on purpose

#: Random-init tiny config for tests (``--clip-model test-tiny-random``): ~1.8 M parameters, 32 px.
TEST_TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TEST_TINY_PREPROCESS_CFG: dict[str, Any] = {
    "size": 32, "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic", "resize_mode": "shortest",
}

#: ``--min-clip-score`` recommended per model (cosine), as the models' cards say (clip_curate.models.cards):
#: synthetic-tiny measured on fresh worlds (docs/model-card-synthetic-tiny.md); ViT-B-32 with the OpenAI
#: weights: LAION-5B's English threshold.
RECOMMENDED_THRESHOLDS: dict[str, float] = {
    SYNTHETIC_TINY: 0.77,
    "ViT-B-32 openai": 0.28,
}


@dataclass(frozen=True)
class ModelConfig:
    """The CLIP model of the embedding stage (``--clip-model none`` skips the stage)."""

    clip_model: str | None = opt(None, "CLIP model: an open_clip architecture name (with --clip-pretrained), "
                                       "hf-hub:org/repo, local-dir:DIR or a checkpoint path, synthetic-tiny "
                                       "(the bundled model of the synthetic demo world only), or none to run "
                                       "without the model stages; unset = ViT-B-32 with --clip-pretrained "
                                       "laion2b_s34b_b79k (open_clip's hub download and cache)")
    clip_pretrained: str | None = opt(None, "open_clip pretrained tag for an architecture name "
                                            "(e.g. laion2b_s34b_b79k, openai), a local weights file, or none "
                                            "for random weights on purpose (benchmarks)")
    device: str = opt("auto", "where the model runs: auto (cuda when visible), cpu, cuda",
                      choices=("auto", "cpu", "cuda"))
    precision: str = opt("fp32", "inference precision: fp32, bf16 or fp16 (autocast; fp16 on CPU runs fp32)",
                         choices=("fp32", "bf16", "fp16"))
    batch_size: int = opt(64, "images per forward pass (RunInference max batch size)")
    accelerator: str | None = opt(None, "Beam resource hint for the embedding step, e.g. "
                                        "'type:nvidia-tesla-t4;count:1;install-nvidia-driver' (Dataflow GPU)")
    share_model: bool = opt(False, "load one model copy per machine shared by all worker processes "
                                   "(Beam large_model; for big models on GPU workers)")
    reuse_embeddings: bool = opt(True, "keep stored image/text embeddings of input rows made by the same "
                                       "model (embed_model) instead of recomputing them")

    def __post_init__(self):
        if self.clip_model is None:  # the default: the field's standard model
            object.__setattr__(self, "clip_model", DEFAULT_MODEL)
            if self.clip_pretrained is None:
                object.__setattr__(self, "clip_pretrained", DEFAULT_PRETRAINED)
        if not str(self.clip_model or "").strip():
            raise ConfigError("--clip-model: empty; pass an open_clip name with --clip-pretrained, "
                              "hf-hub:org/repo, local-dir:DIR, synthetic-tiny, or none")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device: {self.device!r} is not one of auto, cpu, cuda")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"--precision: {self.precision!r} is not one of fp32, bf16, fp16")

    @property
    def enabled(self) -> bool:
        return self.clip_model.strip().lower() not in ("none", "")


@dataclass
class LoadedClip:
    """A loaded open_clip model in eval mode with its own preprocessing and tokenizer."""

    model: Any            # open_clip CLIP / CustomTextCLIP
    preprocess: Callable  # PIL image -> float tensor [3, S, S] (the model's eval transform)
    tokenizer: Callable   # list[str] -> LongTensor [N, context_length]
    model_id: str         # stable identity of the weights (see model_id())
    embed_dim: int
    device: Any = None    # torch.device the model sits on
    precision: str = "fp32"  # effective precision (fp16 on CPU becomes fp32)


# ---------------------------------------------------------------------------------------------
# Name resolution (cheap, no torch model built)

@dataclass(frozen=True)
class _Spec:
    kind: str                 # synthetic | test | arch | hf | dir
    name: str                 # arch name / hub id / path
    pretrained: str | None = None   # tag (arch); None with weights (a file) or random weights
    weights: str | None = None      # weights file (dir, or arch + file)


def synthetic_tiny_dir() -> Path:
    """Directory of the bundled ``synthetic-tiny`` checkpoint."""
    from importlib import resources

    return Path(str(resources.files("clip_curate.data").joinpath(SYNTHETIC_TINY)))


def _looks_like_path(name: str) -> bool:
    return (os.sep in name or "/" in name or name.startswith((".", "~"))
            or name.lower().endswith(WEIGHT_SUFFIXES) or name.startswith("local-dir:"))


def _find_weights_in_dir(d: Path) -> str | None:
    for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors",
                  "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "pytorch_model.bin",
                  "model.pth"):
        if (d / fname).is_file():
            return str(d / fname)
    found = sorted(p for p in d.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    found.sort(key=lambda p: p.suffix != ".safetensors")
    return str(found[0]) if found else None


def _open_clip_models() -> list[str]:
    return open_clip_catalogue().models()


class _Catalogue:
    """open_clip's architecture names, their configs and their pretrained tags, read without importing torch.

    ``import open_clip`` imports torch, torchvision and timm (~3 CPU s, ~650 MB); a launcher that only checks
    ``--clip-model``/``--clip-pretrained`` then cannot fork its DirectRunner workers (they must not inherit
    torch). The names and configs are the package's ``model_configs/*.json``; the tags come from its
    ``pretrained.py`` loaded on its own, under another package name, with ``safetensors.torch`` hidden (the one
    import there that needs torch). Where open_clip is already imported, or anything here fails, the real
    module answers."""

    _ALIAS = "_clip_curate_open_clip_catalogue"

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._pretrained: Any = None
        self._lock = threading.Lock()

    def _package_dir(self) -> Path | None:
        if self._dir is None:
            import importlib.util

            spec = importlib.util.find_spec("open_clip")
            origin = getattr(spec, "origin", None)
            self._dir = Path(origin).parent if origin else Path()
        return self._dir if (self._dir / "model_configs").is_dir() else None

    def _configs_dir(self) -> Path | None:
        """The package's ``model_configs`` directory, or None when the real module should answer."""
        d = None if "open_clip" in sys.modules else self._package_dir()
        return None if d is None else d / "model_configs"

    def models(self) -> list[str]:
        """Architecture names (``open_clip.list_models()``)."""
        d = self._configs_dir()
        if d is None:
            return list(import_open_clip().list_models())
        return sorted(p.stem for p in d.glob("*.json"))

    def model_config(self, arch: str) -> dict | None:
        """An architecture's config (``open_clip.get_model_config``)."""
        d = self._configs_dir()
        if d is None:
            return import_open_clip().get_model_config(arch)
        path = d / f"{arch}.json"
        if not path.is_file():
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def tags(self, arch: str) -> list[str]:
        """The pretrained tags open_clip knows for ``arch`` (``open_clip.list_pretrained_tags_by_model``)."""
        module = None if "open_clip" in sys.modules else self._pretrained_module()
        if module is None:
            return list(import_open_clip().list_pretrained_tags_by_model(arch))
        return list(module.list_pretrained_tags_by_model(arch))

    def _pretrained_module(self):
        with self._lock:
            if self._pretrained is None:
                self._pretrained = self._load_pretrained() or False
            return self._pretrained or None

    def _load_pretrained(self):
        import importlib.util
        import types

        d = self._package_dir()
        if d is None or not (d / "pretrained.py").is_file():
            return None
        hide = "safetensors.torch" not in sys.modules
        package = types.ModuleType(self._ALIAS)
        package.__path__ = [str(d)]  # type: ignore[attr-defined]  # relative imports resolve beside it
        sys.modules[self._ALIAS] = package
        if hide:
            sys.modules["safetensors.torch"] = None  # type: ignore[assignment]  # its ``import`` raises ImportError
        try:
            spec = importlib.util.spec_from_file_location(f"{self._ALIAS}.pretrained", d / "pretrained.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.list_pretrained_tags_by_model("ViT-B-32")
            return module
        except Exception as exc:  # noqa: BLE001 - another open_clip layout: the real import answers
            log.debug("open_clip catalogue: pretrained tags through open_clip itself (%s)", exc)
            return None
        finally:
            if hide and sys.modules.get("safetensors.torch", 0) is None:
                del sys.modules["safetensors.torch"]
            for name in [n for n in sys.modules if n == self._ALIAS or n.startswith(self._ALIAS + ".")]:
                del sys.modules[name]


_CATALOGUE = _Catalogue()


def open_clip_catalogue() -> _Catalogue:
    """The process's :class:`_Catalogue` of open_clip architectures and pretrained tags (torch-free)."""
    return _CATALOGUE


def _resolve(cfg: ModelConfig) -> _Spec:
    """Classify ``--clip-model``/``--clip-pretrained``; raises ConfigError for unknown names/files."""
    name = cfg.clip_model.strip()
    pretrained = (cfg.clip_pretrained or "").strip() or None
    if pretrained and pretrained.lower() == RANDOM_PRETRAINED and not (
            name.replace("/", "-") in _open_clip_models() and not _looks_like_existing_path(name)):
        raise ConfigError(f"--clip-pretrained none: random weights exist only for an open_clip architecture "
                          f"name, not for --clip-model {name}; drop --clip-pretrained")
    if name == SYNTHETIC_TINY or name == TEST_TINY_RANDOM:
        if pretrained:
            raise ConfigError(f"--clip-pretrained: not used with --clip-model {name}; drop it")
        if name == SYNTHETIC_TINY:
            d = synthetic_tiny_dir()
            weights = _find_weights_in_dir(d) if (d / CONFIG_FILE).is_file() else None
            if weights is None:
                raise ConfigError(f"--clip-model synthetic-tiny: the bundled checkpoint is missing from {d}; "
                                  "reinstall clip-curate or train it with `clip-curate train-tiny --output DIR` "
                                  "and pass --clip-model DIR")
            return _Spec("synthetic", str(d), weights=weights)
        return _Spec("test", name)
    if name.startswith(HF_HUB_PREFIX):
        if pretrained:
            raise ConfigError("--clip-pretrained: not used with an hf-hub: model (the repo holds the weights); drop it")
        if not name[len(HF_HUB_PREFIX):].strip("/"):
            raise ConfigError("--clip-model hf-hub:: missing repo id; use hf-hub:org/repo")
        return _Spec("hf", name[len(HF_HUB_PREFIX):])
    models = _open_clip_models()
    arch = name.replace("/", "-")
    if arch in models and not _looks_like_existing_path(name):
        tags = open_clip_catalogue().tags(arch)
        if pretrained is None:
            raise ConfigError(f"--clip-model {arch}: no --clip-pretrained tag, which would mean random weights; "
                              f"pass one of {', '.join(tags) or '(none known)'}, a weights file, or none "
                              "for random weights on purpose")
        if pretrained.lower() == RANDOM_PRETRAINED:
            return _Spec("arch", arch)
        if pretrained in tags:
            return _Spec("arch", arch, pretrained=pretrained)
        if _looks_like_path(pretrained) or os.path.exists(pretrained):
            path = os.path.expanduser(pretrained)
            if not os.path.isfile(path):
                raise ConfigError(f"--clip-pretrained: weights file not found: {pretrained}")
            return _Spec("arch", arch, pretrained=None, weights=path)
        close = difflib.get_close_matches(pretrained, tags, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"--clip-pretrained: unknown tag {pretrained!r} for {arch}; {hint}available: "
                          f"{', '.join(tags) or 'none (pass a weights file)'}")
    if name.startswith("local-dir:"):
        name = name[len("local-dir:"):]
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"--clip-model {name}: directory has no {CONFIG_FILE} (open_clip local-dir layout: "
                              f"{CONFIG_FILE} with model_cfg + weights)")
        weights = _find_weights_in_dir(path)
        if weights is None:
            raise ConfigError(f"--clip-model {name}: no weights (*.safetensors, *.pt, *.bin) in the directory")
        if pretrained:
            raise ConfigError("--clip-pretrained: not used with a checkpoint directory; drop it")
        return _Spec("dir", str(path), weights=weights)
    if path.is_file():
        if pretrained:
            raise ConfigError("--clip-pretrained: not used with a checkpoint file; drop it")
        if not (path.parent / CONFIG_FILE).is_file():
            raise ConfigError(f"--clip-model {name}: a bare weights file needs its architecture: put {CONFIG_FILE} "
                              "beside it, or pass --clip-model ARCH --clip-pretrained FILE")
        return _Spec("dir", str(path.parent), weights=str(path))
    if _looks_like_path(name):
        raise ConfigError(f"--clip-model: checkpoint not found: {name}")
    close = difflib.get_close_matches(name, [SYNTHETIC_TINY] + models, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"--clip-model: unknown model {name!r}; {hint}use an open_clip architecture "
                      "(python -c 'import open_clip; print(open_clip.list_models())') with --clip-pretrained, "
                      "hf-hub:org/repo, local-dir:DIR, synthetic-tiny, or none")


def resolve_model(cfg: ModelConfig) -> _Spec:
    """What ``--clip-model``/``--clip-pretrained`` name: ``kind`` (synthetic, test, arch, hf, dir), the
    architecture / hub id / directory, the pretrained tag and the weights file. ConfigError for unknown
    names, missing files and an architecture without a tag."""
    return _resolve(cfg)


def describe_model(cfg: ModelConfig) -> str:
    """How lines and warnings name the model: ``synthetic-tiny``, ``ViT-B-32 laion2b_s34b_b79k``,
    ``ViT-B-32 with random weights``, ``hf-hub:org/repo``, ``local-dir:/path``."""
    spec = _resolve(cfg)
    if spec.kind == "synthetic":
        return SYNTHETIC_TINY
    if spec.kind == "test":
        return f"{TEST_TINY_RANDOM} (random weights)"
    if spec.kind == "hf":
        return HF_HUB_PREFIX + spec.name
    if spec.kind == "dir":
        return f"local-dir:{spec.name}"
    if spec.weights:
        return f"{spec.name} {spec.weights}"
    return f"{spec.name} {spec.pretrained}" if spec.pretrained else f"{spec.name} with random weights"


def is_random_init(cfg: ModelConfig) -> bool:
    """Whether the model runs with random weights (``--clip-pretrained none``, ``test-tiny-random``)."""
    spec = _resolve(cfg)
    return spec.kind == "test" or (spec.kind == "arch" and not spec.pretrained and not spec.weights)


def model_warning(cfg: ModelConfig) -> str | None:
    """The one warning a run logs about its model, if any (synthetic-tiny on real data, random weights)."""
    spec = _resolve(cfg)
    if spec.kind == "synthetic":
        return ("--clip-model synthetic-tiny knows only the synthetic world's coloured shapes: its scores mean "
                "nothing on photos (for real data use the default ViT-B-32 laion2b_s34b_b79k, or local-dir:DIR)")
    if is_random_init(cfg):
        return (f"--clip-model {describe_model(cfg)}: every CLIP score, concept and zero-shot judgment of this run "
                "is meaningless (random initialisation, for benchmarks)")
    return None


def _looks_like_existing_path(name: str) -> bool:
    return _looks_like_path(name) and os.path.exists(os.path.expanduser(name))


def _file_digest(path: str, chunk: int = 4 << 20) -> str:
    """sha256 of a weights file (files over 256 MiB: size + first and last 4 MiB), 12 hex chars."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= 256 << 20:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(chunk))
            f.seek(-chunk, os.SEEK_END)
            h.update(f.read(chunk))
    return h.hexdigest()[:12]


def model_id(cfg: ModelConfig) -> str:
    """Stable identity of the model weights, without building the model.

    ``synthetic-tiny@<sha12>``, ``ViT-B-32@laion2b_s34b_b79k``, ``ViT-B-32@random-init``,
    ``hf-hub:org/repo``, ``<dir or file name>@<sha12>``, ``test-tiny-random@random-init``.
    """
    spec = _resolve(cfg)
    if spec.kind in ("synthetic", "dir"):
        label = SYNTHETIC_TINY if spec.kind == "synthetic" else Path(spec.weights).name
        return f"{label}@{_file_digest(spec.weights)}"
    if spec.kind == "test":
        return f"{TEST_TINY_RANDOM}@random-init"
    if spec.kind == "hf":
        return f"{HF_HUB_PREFIX}{spec.name}"
    if spec.weights:
        return f"{spec.name}@{Path(spec.weights).name}@{_file_digest(spec.weights)}"
    return f"{spec.name}@{spec.pretrained or 'random-init'}"


def embed_model_key(cfg: ModelConfig) -> str:
    """What rows record in ``embed_model``: model id + effective precision (``.../fp32``)."""
    return f"{model_id(cfg)}/{effective_precision(cfg, resolve_device(cfg.device, check=False))}"


def recommended_threshold(name: str) -> float | None:
    """Recommended ``--min-clip-score`` for a model name (None when unknown)."""
    return RECOMMENDED_THRESHOLDS.get(name)


# ---------------------------------------------------------------------------------------------
# Devices and precision

def resolve_device(device: str, *, check: bool = True) -> str:
    """``auto`` -> ``cuda`` when visible else ``cpu``. ``cuda`` without a visible GPU raises
    (never a silent CPU fallback) unless ``check`` is false. ``cpu`` imports no torch, and neither does ``auto``
    on a Linux machine without GPU device files (torch's import alone costs a worker process about 450 MB)."""
    if device == "cpu":
        return device
    if device == "auto" and "torch" not in sys.modules and not gpu_device_files():
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and check and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to this process; use --device cpu or auto "
                          "(on Dataflow set --accelerator so workers get a GPU)")
    return device


def gpu_device_files() -> bool:
    """Whether a GPU may be visible: True unless on Linux with no NVIDIA (``/dev/nvidia*``) or AMD ROCm
    (``/dev/kfd``) device files, or with ``CUDA_VISIBLE_DEVICES`` set to none. Without them
    ``torch.cuda.is_available()`` is False, so ``auto`` can mean cpu without importing torch."""
    if not sys.platform.startswith("linux"):
        return True
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    try:
        return any(n.startswith("nvidia") for n in os.listdir("/dev")) or os.path.exists("/dev/kfd")
    except OSError:
        return True


def import_open_clip():
    """``import open_clip``; on a machine without GPU device files (:func:`gpu_device_files`), with triton
    hidden while it loads. open_clip imports torchvision and timm, which import torch's compiler stack, which
    imports triton when installed (its library maps about 75 MB per process); triton compiles GPU kernels
    only, and torch remembers it as missing, so nothing on a CPU-only machine loads it later."""
    with _IMPORT_LOCK:  # one thread imports; the others wait for the whole module, not a partial one
        hide = "open_clip" not in sys.modules and "triton" not in sys.modules and not gpu_device_files()
        if hide:
            sys.modules["triton"] = None  # type: ignore[assignment]  # ``import triton`` raises ImportError
        try:
            import open_clip
        finally:
            if hide and "triton" in sys.modules and sys.modules["triton"] is None:
                del sys.modules["triton"]
    return open_clip


_IMPORT_LOCK = threading.Lock()


def effective_precision(cfg: ModelConfig, device: str) -> str:
    """fp16 on CPU runs in fp32 (CPU fp16 matmuls are slow or missing); the rest as asked."""
    return "fp32" if cfg.precision == "fp16" and device == "cpu" else cfg.precision


def precision_note(cfg: ModelConfig, device: str) -> str | None:
    """The message logged when a precision is adjusted or unusual on this device."""
    if cfg.precision == "fp16" and device == "cpu":
        return "--precision fp16: not supported on CPU; the embedding stage runs in fp32 there"
    if cfg.precision == "bf16" and device == "cpu":
        return ("--precision bf16 on CPU: runs under torch CPU autocast (bfloat16); often slower than fp32 "
                "on CPUs without bf16 instructions")
    return None


def autocast_context(device: str, precision: str):
    """``torch.autocast`` for bf16/fp16 (CPU: bf16 only), else a null context."""
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    if precision == "fp16" and device != "cpu":
        return torch.autocast(device_type=device, dtype=torch.float16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Validation (pipeline construction time)

def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hub_offline_reason(timeout_s: float = 3.0) -> str | None:
    """Why the hub can't be reached (HF_HUB_OFFLINE set, or a failed probe), else None.

    The probe (name lookup + TCP connect) runs in a daemon thread and is given ``timeout_s`` in all: a
    system resolver that hangs (no network, no DNS) costs the launcher at most that long."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    url = urllib.parse.urlsplit(_hub_endpoint())
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result: list[str | None] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(None)
        except OSError as exc:
            result.append(f"cannot connect to {url.scheme}://{host}:{port} ({exc.__class__.__name__}: {exc})")

    t = threading.Thread(target=probe, name="clip-curate-hub-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    if not result:
        return f"no answer from {url.scheme}://{host}:{port} within {timeout_s:g} s"
    return result[0]


def _hf_cached(repo_id: str, filenames: Sequence[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for fname in filenames:
        hit = try_to_load_from_cache(repo_id, fname)
        if isinstance(hit, str) and os.path.isfile(hit):
            return True
    return False


_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                    "open_clip_pytorch_model.bin")


def _weights_cached(spec: _Spec) -> bool:
    if spec.kind == "hf":
        return _hf_cached(spec.name, (CONFIG_FILE,)) and _hf_cached(spec.name, _HF_WEIGHT_FILES)
    from open_clip.pretrained import get_pretrained_cfg

    pcfg = get_pretrained_cfg(spec.name, spec.pretrained) or {}
    hub = pcfg.get("hf_hub", "")
    if hub:
        repo, fname = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = [fname, fname.replace(".bin", ".safetensors")] if fname else list(_HF_WEIGHT_FILES)
        if _hf_cached(repo, [n for n in names if n]):
            return True
    url = pcfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


def offline_error(cfg: ModelConfig, reason: str) -> str:
    """The one line for hub weights that are not cached and can't be fetched: it names the ways on."""
    what = cfg.clip_model + (f" --clip-pretrained {cfg.clip_pretrained}" if cfg.clip_pretrained else "")
    return (f"--clip-model {what}: the weights are not cached and can't be fetched ({reason}); use "
            "--clip-model local-dir:DIR (open_clip weights on disk), --clip-model none (run without the model "
            "stages) or --clip-model synthetic-tiny (the synthetic demo world only), or fetch them once where "
            "the hub is reachable")


def validate_model_config(cfg: ModelConfig, *, check_network: bool = True, load_local: bool = True) -> None:
    """Checks before any work: name/tag/file, hub reachability for weights not yet cached (bounded), the
    device, and (``load_local``) one safe load of weights on disk, so a refused or mismatched checkpoint
    is a one-line ConfigError in the launcher, never a worker traceback. Logs precision notes."""
    if not cfg.enabled:
        return
    spec = _resolve(cfg)
    if check_network and (spec.kind == "hf" or (spec.kind == "arch" and spec.pretrained)):
        if not _weights_cached(spec):
            reason = _hub_offline_reason()
            if reason:
                raise ConfigError(offline_error(cfg, reason))
    if cfg.device == "cuda" and not cfg.accelerator:
        resolve_device("cuda")  # raises without a GPU; with --accelerator the workers are checked on load
    if cfg.precision != "fp32":  # fp32 needs no note: torch is not imported for it here
        note = precision_note(cfg, resolve_device(cfg.device, check=False))
        if note:
            log.warning(note)
    if load_local and spec.weights and spec.kind != "synthetic":  # the bundled model's weights are the package's
        st = os.stat(spec.weights)
        _check_local_weights(spec, cfg.clip_model, cfg.clip_pretrained, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _check_local_weights(spec: _Spec, clip_model: str, clip_pretrained: str | None, size: int,
                         mtime_ns: int) -> None:
    """Build the model on the CPU with its weights (read safely), once per file version."""
    load_clip(ModelConfig(clip_model=clip_model, clip_pretrained=clip_pretrained, device="cpu"))


# ---------------------------------------------------------------------------------------------
# Loading (on the worker)

def _safe_state_dict(path: str) -> dict[str, Any]:
    """Weights from ``.safetensors`` or a torch file read with ``weights_only=True``.

    A torch file holding pickled objects other than tensors/containers raises ConfigError: it is
    never unpickled."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad checkpoint
            raise ConfigError(f"--clip-model: cannot read safetensors checkpoint {path}: {exc}") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ConfigError(f"--clip-model: refusing to unpickle {path}: it holds objects other than weights "
                          f"({first[:160]}); convert it to .safetensors or a plain state_dict") from None
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"--clip-model: cannot read checkpoint {path}: {exc.__class__.__name__}: {exc}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ConfigError(f"--clip-model: {path} holds no state_dict")
    return sd


def _apply_state_dict(model, sd: dict[str, Any], path: str) -> None:
    """open_clip's checkpoint conversions, then a strict load."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    if next(iter(sd)).startswith("module."):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        if key in sd and getattr(model, key, None) is not None and model.state_dict()[key].ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(model.state_dict()[key].shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None and "logit_scale" in sd:
        import torch

        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"--clip-model: {path} does not match the model config: "
                          f"{str(exc).splitlines()[0][:300]}") from None


def _seeded(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with torch's RNG seeded (random init identical in every worker process)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return fn()


def _transform(model, fallback_cfg: dict[str, Any] | None = None):
    import open_clip

    return _transform_from_cfg(dict(open_clip.get_model_preprocess_cfg(model) or fallback_cfg or {}))


class _QuietNoWeights(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


_QUIET_NO_WEIGHTS = _QuietNoWeights()


def load_clip(cfg: ModelConfig, device: str | None = None) -> LoadedClip:
    """Build the model (eval mode, on its device) with its preprocessing and tokenizer.

    Raises ConfigError for user mistakes (bad names, refused or mismatched checkpoints, cuda
    without a GPU)."""
    open_clip = import_open_clip()
    import torch

    spec = _resolve(cfg)
    dev = resolve_device(device or cfg.device)
    note = precision_note(cfg, dev)
    if note:
        log.info(note)
    mid = model_id(cfg)
    if spec.kind == "test":
        model = _seeded(lambda: open_clip.CLIP(**copy.deepcopy(TEST_TINY_MODEL_CFG)))
        open_clip.set_model_preprocess_cfg(model, dict(TEST_TINY_PREPROCESS_CFG))
        tokenizer = open_clip.get_tokenizer("ViT-B-32",
                                            context_length=TEST_TINY_MODEL_CFG["text_cfg"]["context_length"])
    elif spec.kind in ("synthetic", "dir"):
        local = f"local-dir:{spec.name}"
        try:  # weights are loaded just below, safely; open_clip's "initialized randomly" warning is moot
            logging.getLogger().addFilter(_QUIET_NO_WEIGHTS)
            model = _seeded(lambda: open_clip.create_model(local, load_weights=False))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--clip-model {spec.name}: bad {CONFIG_FILE}: {exc}") from None
        _apply_state_dict(model, _safe_state_dict(spec.weights), spec.weights)
        tokenizer = open_clip.get_tokenizer(local)
    elif spec.kind == "hf":
        model = open_clip.create_model(HF_HUB_PREFIX + spec.name, weights_only=True, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(HF_HUB_PREFIX + spec.name)
    else:  # architecture name
        if spec.pretrained:
            model = open_clip.create_model(spec.name, pretrained=spec.pretrained, weights_only=True,
                                           require_pretrained=True)
        else:
            model = _seeded(lambda: open_clip.create_model(spec.name))
            if spec.weights:
                _apply_state_dict(model, _safe_state_dict(spec.weights), spec.weights)
            else:
                log.info("--clip-model %s --clip-pretrained none: random weights (seed %d), on purpose",
                         spec.name, RANDOM_INIT_SEED)
        tokenizer = open_clip.get_tokenizer(spec.name)
    preprocess = _transform(model, TEST_TINY_PREPROCESS_CFG if spec.kind == "test" else None)
    model = model.to(torch.device(dev)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    embed_dim = _probe_dim(model, dev)
    return LoadedClip(model, preprocess, tokenizer, mid, embed_dim, torch.device(dev), effective_precision(cfg, dev))


# ---------------------------------------------------------------------------------------------
# One model per worker process, loaded in the background

_SHARED = ProcessCache()


def shared_clip(cfg: ModelConfig, device: str | None = None) -> LoadedClip:
    """:func:`load_clip` once per process for each (model, weights, device, precision): the embedding stage,
    the safety concept prompts and the audit's zero-shot prompts of one worker share one model copy."""
    key = (cfg.clip_model, cfg.clip_pretrained, device or cfg.device, cfg.precision)
    return _SHARED.get(key, lambda: load_clip(cfg, device))


class Deferred:
    """A value that ``factory()`` builds in a background thread, started at construction.

    :meth:`get` waits for it and re-raises the factory's exception; other attribute lookups go to the value
    (``deferred.embed(...)`` waits, then calls). A model handler returns one from ``load_model`` so that a
    worker's set-up does not wait for the model: the steps before it (caption rules, downloads, decoding)
    start at once, and the first batch waits only for what is still loading."""

    def __init__(self, factory: Callable[[], Any], name: str = "clip-curate-load"):
        self._factory = factory
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self._value = self._factory()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever calls get()
            self._error = exc
        finally:
            self._done.set()

    def ready(self) -> bool:
        return self._done.is_set()

    def get(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.get(), name)


def _probe_dim(model, dev: str) -> int:
    import torch

    size = open_clip_image_size(model)
    with torch.inference_mode():
        return int(model.encode_image(torch.zeros(1, 3, size, size, device=dev)).shape[-1])


def open_clip_image_size(model) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _transform_from_cfg(pcfg: dict[str, Any]):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    known = set(PreprocessCfg.__dataclass_fields__)
    return image_transform_v2(PreprocessCfg(**{k: (tuple(v) if isinstance(v, list) else v)
                                               for k, v in pcfg.items() if k in known}), is_train=False)


def load_preprocess(cfg: ModelConfig) -> tuple[Callable, Callable]:
    """``(eval transform, tokenizer)`` of the model without loading its weights (same values as
    :func:`load_clip` gives): for the CPU preprocessing step that runs before the forward pass."""
    from dataclasses import asdict

    open_clip = import_open_clip()
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    spec = _resolve(cfg)
    pcfg = asdict(PreprocessCfg())
    if spec.kind == "test":
        model_cfg, tok = TEST_TINY_MODEL_CFG, open_clip.get_tokenizer(
            "ViT-B-32", context_length=TEST_TINY_MODEL_CFG["text_cfg"]["context_length"])
        pcfg = merge_preprocess_dict(pcfg, TEST_TINY_PREPROCESS_CFG)
    elif spec.kind in ("synthetic", "dir"):
        with open(os.path.join(spec.name, CONFIG_FILE), encoding="utf-8") as f:
            local = json.load(f)
        model_cfg = local["model_cfg"]
        pcfg = merge_preprocess_dict(pcfg, local.get("preprocess_cfg", {}))
        tok = open_clip.get_tokenizer(f"local-dir:{spec.name}")
    elif spec.kind == "hf":
        from open_clip.factory import _get_hf_config

        hub_cfg = _get_hf_config(spec.name)
        model_cfg = hub_cfg["model_cfg"]
        pcfg = merge_preprocess_dict(pcfg, hub_cfg.get("preprocess_cfg", {}))
        tok = open_clip.get_tokenizer(HF_HUB_PREFIX + spec.name)
    else:
        from open_clip.pretrained import get_pretrained_cfg

        model_cfg = open_clip.get_model_config(spec.name) or {}
        if spec.pretrained:
            pcfg = merge_preprocess_dict(pcfg, get_pretrained_cfg(spec.name, spec.pretrained) or {})
        tok = open_clip.get_tokenizer(spec.name)
    pcfg["size"] = model_cfg.get("vision_cfg", {}).get("image_size", pcfg["size"])
    return _transform_from_cfg(pcfg), tok


def _l2(x):
    import torch

    return torch.nn.functional.normalize(x.float(), dim=-1)


def embed_in_batches(encode: Callable[[Any], Any], items: Sequence[Any], to_input: Callable[[Sequence[Any]], Any],
                     dim: int, device: Any, precision: str = "fp32", batch_size: int = 256) -> np.ndarray:
    """L2-normalised embeddings ``[N, dim]`` (float32): ``encode(to_input(batch))`` per batch of ``items``,
    under inference mode and the precision's autocast. The one loop behind every encode in the package."""
    import torch

    out = []
    for i in range(0, len(items), batch_size):
        x = to_input(items[i:i + batch_size])
        with torch.inference_mode(), autocast_context(device.type, precision):
            out.append(_l2(encode(x)).cpu().numpy())
    if not out:
        return np.zeros((0, dim), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def encode_texts(loaded: LoadedClip, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """L2-normalised text embeddings ``[N, D]`` (float32) with the loaded model."""
    return embed_in_batches(loaded.model.encode_text, list(texts),
                            lambda batch: loaded.tokenizer(list(batch)).to(loaded.device),
                            loaded.embed_dim, loaded.device, loaded.precision, batch_size)


def encode_images(loaded: LoadedClip, images: Sequence[Any], batch_size: int = 256) -> np.ndarray:
    """L2-normalised image embeddings ``[N, D]`` (float32) of PIL images with the model's preprocessing."""
    import torch

    return embed_in_batches(loaded.model.encode_image, list(images),
                            lambda batch: torch.stack([loaded.preprocess(im) for im in batch]).to(loaded.device),
                            loaded.embed_dim, loaded.device, loaded.precision, batch_size)


def preprocess_description(cfg: ModelConfig) -> str | None:
    """The model's image transform as one line (its torchvision repr); None when it cannot be built now."""
    try:
        return " ".join(repr(load_preprocess(cfg)[0]).split())
    except Exception as exc:  # noqa: BLE001 - e.g. a hub config that cannot be fetched now
        log.debug("preprocess of %s not recorded: %s", cfg.clip_model, exc)
        return None


class EmbeddingIdentity(Mapping):
    """What makes a run's embeddings (recorded in stats.json ``embedding``): ``embed_model``, the key rows
    carry (model id + precision), and ``preprocess``, the model's image transform
    (:func:`preprocess_description`). ``preprocess`` is built on first use: it needs open_clip and so torch,
    which a launcher that forks its workers must not import (it is read when stats.json is written, in a
    worker, or by a re-filter deciding whether stored embeddings are reused)."""

    KEYS = ("embed_model", "preprocess")

    def __init__(self, cfg: ModelConfig):
        self._cfg = cfg
        self._values: dict[str, Any] = {"embed_model": embed_model_key(cfg)}

    def __getitem__(self, key: str) -> Any:
        if key == "preprocess" and key not in self._values:
            self._values[key] = preprocess_description(self._cfg)
        return self._values[key]

    def __iter__(self):
        return iter(self.KEYS)

    def __len__(self) -> int:
        return len(self.KEYS)


def embedding_identity(cfg: ModelConfig) -> EmbeddingIdentity:
    """This run's :class:`EmbeddingIdentity`."""
    return EmbeddingIdentity(cfg)


# ---------------------------------------------------------------------------------------------
# Prompt sets (the safety concept check and the audit's zero-shot attributes)

def has_clip_model(model_config: ModelConfig | None) -> bool:
    """Whether a run has a CLIP model (a config, and not ``--clip-model none``)."""
    return model_config is not None and model_config.enabled


def encode_prompts(model_config: Any, prompts: Sequence[str]) -> np.ndarray:
    """L2-normalised text embeddings of ``prompts`` with the run's CLIP model (one copy per process)."""
    loaded = shared_clip(model_config)
    return np.asarray(encode_texts(loaded, list(prompts)), dtype=np.float32)


def _encode_prompt_sets(_, model_config: Any, sets: dict[str, tuple[str, ...]]) -> dict[str, np.ndarray]:
    prompts = [p for ps in sets.values() for p in ps]
    embs = encode_prompts(model_config, prompts)
    out, i = {}, 0
    for name, ps in sets.items():
        out[name] = embs[i:i + len(ps)]
        i += len(ps)
    return out


class EmbedPromptSets(beam.PTransform):
    """One-element PCollection ``{name: (n_prompts, dim) array}``: the prompts embedded once per run.

    Used as a side input, so the CLIP model is loaded by one worker for the prompts, not per DoFn.
    """

    def __init__(self, model_config: Any, sets: dict[str, Sequence[str]]):
        super().__init__()
        self._model_config = model_config
        self._sets = {k: tuple(v) for k, v in sets.items()}

    def expand(self, pbegin):
        return (pbegin
                | "Once" >> beam.Create([None])
                | "Encode" >> beam.Map(_encode_prompt_sets, self._model_config, self._sets))


