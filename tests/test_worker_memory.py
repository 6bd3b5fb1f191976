"""Worker memory: what a worker process loads and keeps for its stages.

Behaviour only (the figures are measured by bench/fast_start.py): the opennsfw session's memory-lean options
and CPU forward size, one forward at a time, device ``auto`` without torch where no GPU can be visible,
open_clip without triton on a CPU-only machine, and the heap trimmed after loads.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from clip_curate import process_cache
from clip_curate.models import clip as clip_mod
from clip_curate.models import nsfw as nsfw_mod
from clip_curate.models.nsfw import CPU_FORWARD_IMAGES, NSFWModel


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one ``RESULT <json>`` line."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------------------------------
# The opennsfw session

def test_session_options_are_memory_lean():
    import onnxruntime as ort

    opts = nsfw_mod.session_options(ort, threads=3)
    assert opts.enable_cpu_mem_arena is False        # activations freed after each run, not kept for the next
    assert opts.enable_mem_pattern is False
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # the reference's scores
    assert opts.intra_op_num_threads == 3
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_classifier_session_is_built_with_those_options(monkeypatch):
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def spy(model, sess_options=None, providers=None, **kw):
        seen.append(sess_options)
        return real(model, sess_options=sess_options, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    trims = []
    monkeypatch.setattr(nsfw_mod, "trim_heap", lambda: trims.append(1) or True)
    NSFWModel("cpu")
    assert len(seen) == 1 and seen[0].enable_cpu_mem_arena is False and seen[0].enable_mem_pattern is False
    assert trims == [1]  # the ONNX protobuf and its serialized copy are handed back once the session exists


class _SlowSession:
    """Records the batch size of each run and how many runs overlap."""

    def __init__(self):
        self.sizes, self.active, self.max_active = [], 0, 0
        self._lock = threading.Lock()

    def run(self, outputs, feeds):
        (x,) = feeds.values()
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.sizes.append(len(x))
        time.sleep(0.01)
        with self._lock:
            self.active -= 1
        return [np.tile([[0.9, 0.1]], (len(x), 1)).astype(np.float32)]


@pytest.fixture(scope="module")
def cpu_model() -> NSFWModel:
    return NSFWModel("cpu")


def test_cpu_forwards_are_small_and_one_at_a_time(cpu_model, monkeypatch):
    fake = _SlowSession()
    monkeypatch.setattr(cpu_model, "_session", fake)
    out = []
    threads = [threading.Thread(target=lambda: out.append(cpu_model.scores(np.zeros((20, 224, 224, 3), np.uint8))))
               for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert CPU_FORWARD_IMAGES == 8
    assert sorted(fake.sizes) == sorted([8, 8, 4] * 3)   # each batch of 20 split into passes of <= 8
    assert fake.max_active == 1                          # the DoFn threads' passes take turns
    assert [len(o) for o in out] == [20] * 3 and all(np.allclose(o, 0.1) for o in out)


def test_split_forwards_score_like_one_pass(cpu_model):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (CPU_FORWARD_IMAGES + 3, 224, 224, 3), dtype=np.uint8)
    (whole,) = cpu_model._session.run([cpu_model._output], {nsfw_mod.INPUT: pixels})
    np.testing.assert_array_equal(cpu_model.scores(pixels), whole[:, 1].astype(np.float64))


# ---------------------------------------------------------------------------------------------
# What a worker imports

def test_no_gpu_device_files_means_cpu_without_torch():
    res = _fresh("""
        import json, sys
        from clip_curate.models import clip
        clip.gpu_device_files = lambda: False     # as on a machine without /dev/nvidia* or /dev/kfd
        from clip_curate.models.nsfw import NSFWModel
        m = NSFWModel("auto")
        print("RESULT " + json.dumps({"device": m.device, "torch": "torch" in sys.modules}))
    """)
    assert res == {"device": "cpu", "torch": False}


def test_gpu_device_files(monkeypatch, tmp_path):
    monkeypatch.setattr(clip_mod.sys, "platform", "linux")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert clip_mod.gpu_device_files() is False          # no device visible, whatever /dev holds
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(clip_mod.os, "listdir", lambda d: ["null", "nvidiactl", "nvidia0"])
    assert clip_mod.gpu_device_files() is True
    monkeypatch.setattr(clip_mod.os, "listdir", lambda d: ["null", "tty"])
    monkeypatch.setattr(clip_mod.os.path, "exists", lambda p: p == "/dev/kfd")
    assert clip_mod.gpu_device_files() is True           # ROCm
    monkeypatch.setattr(clip_mod.os.path, "exists", lambda p: False)
    assert clip_mod.gpu_device_files() is False
    monkeypatch.setattr(clip_mod.sys, "platform", "darwin")
    assert clip_mod.gpu_device_files() is True           # elsewhere torch decides


def test_open_clip_without_triton_on_a_cpu_only_machine():
    res = _fresh("""
        import json, sys, threading
        from clip_curate.models import clip
        clip.gpu_device_files = lambda: False
        from clip_curate.models.clip import ModelConfig, load_preprocess, shared_clip, Deferred
        cfg = ModelConfig(clip_model="synthetic-tiny", device="cpu")
        a, b = Deferred(lambda: load_preprocess(cfg)), Deferred(lambda: shared_clip(cfg))  # two threads at once
        a.get(), b.get()
        import torch.utils._triton as t
        print("RESULT " + json.dumps({"triton": "triton" in sys.modules, "has_triton": t.has_triton_package(),
                                      "dynamo": "torch._dynamo" in sys.modules}))
    """)
    assert res == {"triton": False, "has_triton": False, "dynamo": True}


def test_open_clip_with_triton_where_a_gpu_may_be():
    pytest.importorskip("triton")
    res = _fresh("""
        import json, sys
        from clip_curate.models import clip
        clip.gpu_device_files = lambda: True
        clip.import_open_clip()
        print("RESULT " + json.dumps({"triton": "triton" in sys.modules}))
    """)
    assert res == {"triton": True}


def test_embed_model_load_trims_the_heap(monkeypatch):
    from clip_curate.models.clip import ModelConfig
    from clip_curate.stages import embed as embed_mod

    trims = []
    monkeypatch.setattr(embed_mod, "trim_heap", lambda: trims.append(1) or True)
    monkeypatch.setattr(embed_mod, "ClipEmbedder", lambda cfg: type("E", (), {
        "loaded": type("L", (), {"model_id": "m"})(), "device": "cpu", "precision": "fp32"})())
    handler = embed_mod._ClipHandler.__new__(embed_mod._ClipHandler)
    handler._config = ModelConfig(clip_model="synthetic-tiny", device="cpu")
    handler._load_embedder()
    assert trims == [1]


def test_trim_heap_on_glibc():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert process_cache.trim_heap() is True


def test_run_with_safety_but_no_embed_imports_no_torch(tmp_path):
    """The safety stage's classifier alone: onnxruntime, and no torch (device auto, no GPU visible)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(4)],
                             "caption": ["a red circle", "a blue square", "two cats", "a dog"]}), urls)
    flags = ["--input", str(urls), "--output", str(tmp_path / "out"), "--stages", "download,image,safety",
             "--clip-model", "none", "--allow-private-addresses", "--retries", "0", "--no-respect-robots-txt"]
    code = f"""
        import json, sys
        from clip_curate.run import run
        stats = run({flags!r})
        heavy = sorted(m for m in ("torch", "open_clip", "torchvision", "onnxruntime") if m in sys.modules)
        print("RESULT " + json.dumps({{"stats": stats, "imported": heavy}}))
    """
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU visible, also on a machine that has one
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert res["imported"] == ["onnxruntime"]           # the classifier was built, and torch never loaded
    st = res["stats"]
    assert st["input_rows"] == 4 and st["curated_rows"] + st["rejected_rows"] == 4
    assert sum(st["rejected_by"].get("download", {}).values()) == 4


# ---------------------------------------------------------------------------------------------
# The launcher checks --clip-model without torch (so it can fork its workers)

def test_open_clip_catalogue_matches_open_clip_without_importing_torch():
    got = _fresh("""
        import json, sys
        from clip_curate.models.clip import ModelConfig, open_clip_catalogue, resolve_model
        from clip_curate.fields import ConfigError
        from clip_curate.writers import embedding_dim
        cat = open_clip_catalogue()
        models = cat.models()
        tags = {a: cat.tags(a) for a in models}
        spec = resolve_model(ModelConfig(clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k"))
        dim = embedding_dim(ModelConfig(clip_model="ViT-B-32", clip_pretrained="none"))
        try:
            resolve_model(ModelConfig(clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b78k"))
            error = None
        except ConfigError as exc:
            error = str(exc)
        torch_loaded = "torch" in sys.modules or "open_clip" in sys.modules
        leftovers = [m for m in sys.modules if "catalogue" in m]
        import open_clip
        print("RESULT " + json.dumps({
            "torch_loaded": torch_loaded, "leftovers": leftovers, "spec": [spec.kind, spec.pretrained],
            "dim": dim, "error": error, "n": len(models),
            "same_models": sorted(models) == sorted(open_clip.list_models()),
            "same_tags": all(tags[a] == open_clip.list_pretrained_tags_by_model(a) for a in open_clip.list_models()),
            "same_config": cat.model_config("ViT-B-32") == open_clip.get_model_config("ViT-B-32")}))
    """)
    assert got["torch_loaded"] is False and got["leftovers"] == []
    assert got["spec"] == ["arch", "laion2b_s34b_b79k"] and got["dim"] == 512 and got["n"] > 100
    assert "did you mean laion2b_s34b_b79k" in got["error"]
    assert got["same_models"] and got["same_tags"] and got["same_config"]
