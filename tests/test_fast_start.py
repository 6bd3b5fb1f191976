"""Fast start: a worker loads only what its stages need, once per process, and not before its downloads.

Behaviour only (timings are measured by bench/fast_start.py): which heavy modules a run imports, which
languages the detector is built for, that the CLIP model is shared per process and loaded in the background.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate.fields import ConfigError
from clip_curate.process_cache import ProcessCache
from clip_curate.models import clip as clip_mod
from clip_curate.models.clip import Deferred, ModelConfig, shared_clip, validate_model_config
from clip_curate.stages import caption as caption_mod
from clip_curate.stages.caption import CaptionConfig, build_detector, detector_key, shared_detector


# ---------------------------------------------------------------------------------------------
# The language detector: only the asked languages, full models only when they decide rows

class _FakeBuilder:
    """Stands in for lingua's LanguageDetectorBuilder and records how it was used."""

    calls: list = []

    def __init__(self, how, codes=()):
        self.how, self.codes, self.low = how, tuple(codes), False

    @classmethod
    def from_iso_codes_639_1(cls, *codes):
        return cls("codes", codes)

    @classmethod
    def from_all_languages(cls):
        return cls("all")

    def with_low_accuracy_mode(self):
        self.low = True
        return self

    def build(self):
        _FakeBuilder.calls.append((self.how, tuple(c.name.lower() for c in self.codes), self.low))
        return object()


@pytest.fixture
def fake_lingua(monkeypatch):
    import lingua

    _FakeBuilder.calls = []
    monkeypatch.setattr(lingua, "LanguageDetectorBuilder", _FakeBuilder)
    monkeypatch.setattr(caption_mod, "_DETECTORS", ProcessCache())
    return _FakeBuilder.calls


def test_detector_built_only_for_the_asked_languages(fake_lingua):
    # filtering: the candidates asked for (plus the --languages codes), full models
    build_detector(CaptionConfig(languages=("en", "fr"), language_candidates=("en", "de")))
    assert fake_lingua[-1] == ("codes", ("de", "en", "fr"), False)
    # only recorded (no --languages): the default web candidates, lingua's low-accuracy mode
    build_detector(CaptionConfig())
    assert fake_lingua[-1] == ("codes", tuple(sorted(caption_mod.WEB_LANGUAGES)), True)
    # explicit choices win over auto
    build_detector(CaptionConfig(language_candidates=("en", "de"), language_accuracy="high"))
    assert fake_lingua[-1] == ("codes", ("de", "en"), False)
    build_detector(CaptionConfig(languages=("en",), language_candidates=("en", "de"), language_accuracy="low"))
    assert fake_lingua[-1] == ("codes", ("de", "en"), True)
    build_detector(CaptionConfig(language_candidates=("all",)))
    assert fake_lingua[-1] == ("all", (), True)


def test_language_accuracy_choices():
    assert CaptionConfig().low_accuracy is True
    assert CaptionConfig(languages=("en",)).low_accuracy is False
    with pytest.raises(ConfigError, match="--language-accuracy"):
        CaptionConfig(language_accuracy="medium")


def test_one_detector_per_process_and_key(fake_lingua):
    a = shared_detector(CaptionConfig(language_candidates=("en", "de")))
    b = shared_detector(CaptionConfig(language_candidates=("de", "en")))  # same languages, other order
    c = shared_detector(CaptionConfig(languages=("en",), language_candidates=("en", "de")))  # high accuracy
    assert a is b and a is not c
    assert len(fake_lingua) == 2
    assert detector_key(CaptionConfig(language_candidates=("en", "de"))) == (("de", "en"), True)


def test_caption_dofns_share_the_detector(fake_lingua):
    from clip_curate.stages.caption import _CaptionRules

    cfg = CaptionConfig(language_candidates=("en", "de"))
    first, second = _CaptionRules(cfg), _CaptionRules(cfg)
    first.setup()
    second.setup()
    assert first._detector is second._detector
    assert len(fake_lingua) == 1


# ---------------------------------------------------------------------------------------------
# What a run imports: nothing its stages do not need

def _run_in_fresh_process(tmp_path, flags: list[str]) -> dict:
    """``clip_curate.run.run`` over 5 rows in a new interpreter (DirectRunner in-process); returns the
    stats and which heavy modules were imported by the end."""
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(5)],
                             "caption": ["a red circle on a blue square", "ein roter Kreis", "", "x", "two green cats"]}),
                   urls)
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import json, sys
        from clip_curate.run import run
        stats = run({["--input", str(urls), "--output", str(out)] + flags!r})
        heavy = sorted(m for m in ("lingua", "torch", "open_clip", "onnxruntime") if m in sys.modules)
        print("RESULT " + json.dumps({{"stats": stats, "imported": heavy}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_run_without_detection_or_model_imports_neither(tmp_path):
    res = _run_in_fresh_process(tmp_path, ["--stages", "caption", "--no-detect-language", "--clip-model", "none"])
    assert res["imported"] == []          # no lingua, no torch, no open_clip
    st = res["stats"]
    assert st["input_rows"] == 5 and st["curated_rows"] + st["rejected_rows"] == 5
    assert st["rejected_by"]["caption"] == {"missing_caption": 1}


def test_run_with_detection_but_no_clip_stage_loads_no_model(tmp_path):
    res = _run_in_fresh_process(tmp_path, ["--stages", "caption,download,image", "--clip-model", "synthetic-tiny",
                                           "--language-candidates", "en,de", "--allow-private-addresses",
                                           "--retries", "0", "--no-respect-robots-txt"])
    assert res["imported"] == ["lingua"]  # the detector, and no CLIP model: no torch, no open_clip
    st = res["stats"]
    assert st["curated_rows"] + st["rejected_rows"] == 5
    assert sum(st["rejected_by"].get("download", {}).values()) == 4  # port 9 refuses: the stage really ran


# ---------------------------------------------------------------------------------------------
# The CLIP model: once per process, in the background, never in the launcher for the bundled model

def test_model_loaded_once_per_process_and_shared(monkeypatch):
    calls = []
    real = clip_mod.load_clip

    def counting(cfg, device=None):
        calls.append(cfg.clip_model)
        return real(cfg, device)

    monkeypatch.setattr(clip_mod, "load_clip", counting)
    monkeypatch.setattr(clip_mod, "_SHARED", ProcessCache())
    cfg = ModelConfig(clip_model="test-tiny-random", device="cpu")
    results = []
    threads = [threading.Thread(target=lambda: results.append(shared_clip(cfg))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["test-tiny-random"]
    assert all(r is results[0] for r in results)
    # the prompt sets (safety concepts, audit attributes) use the same copy
    emb = clip_mod.encode_prompts(cfg, ["a photo of a cat", "a photo of a dog"])
    assert emb.shape == (2, results[0].embed_dim) and calls == ["test-tiny-random"]
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)


def test_embed_handler_loads_in_the_background(monkeypatch):
    from clip_curate.stages.embed import ClipEmbedder, ClipModelHandler

    gate = threading.Event()
    real_init = ClipEmbedder.__init__

    def slow_init(self, config):
        gate.wait(30)
        real_init(self, config)

    monkeypatch.setattr(ClipEmbedder, "__init__", slow_init)
    monkeypatch.setattr(clip_mod, "_SHARED", ProcessCache())
    handler = ClipModelHandler(ModelConfig(clip_model="test-tiny-random", device="cpu", batch_size=2))
    model = handler.load_model()          # returns at once: the worker's other steps need not wait
    assert isinstance(model, Deferred) and not model.ready()
    gate.set()
    s = clip_mod.TEST_TINY_PREPROCESS_CFG["size"]
    ctx = clip_mod.TEST_TINY_MODEL_CFG["text_cfg"]["context_length"]
    example = (np.zeros((3, s, s), np.uint8), np.zeros(ctx, np.int64))
    results = list(handler.run_inference([example, example], model))
    assert len(results) == 2 and model.ready()
    img, txt, score = results[0].inference
    assert img.shape == txt.shape and np.isfinite(score)
    # a second handler in the same process shares the loaded model
    other = ClipModelHandler(ModelConfig(clip_model="test-tiny-random", device="cpu", batch_size=2)).load_model()
    assert other.get().loaded is model.get().loaded


def test_deferred_reraises_the_load_error():
    def broken():
        raise ConfigError("--clip-model x: bad weights")

    d = Deferred(broken)
    with pytest.raises(ConfigError, match="bad weights"):
        d.get()
    with pytest.raises(ConfigError):
        d.embed  # noqa: B018 - attribute access waits for the value, and raises its error


def test_launcher_does_not_build_the_bundled_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the launcher built the model")

    monkeypatch.setattr(clip_mod, "load_clip", refuse)
    clip_mod._check_local_weights.cache_clear()
    validate_model_config(ModelConfig(clip_model="synthetic-tiny"))  # no model build, no exception


def test_cpu_device_and_fp32_check_import_no_torch():
    code = ("import sys\n"
            "from clip_curate.models.clip import ModelConfig, resolve_device, validate_model_config\n"
            "assert resolve_device('cpu') == 'cpu'\n"
            "validate_model_config(ModelConfig(clip_model='synthetic-tiny', device='cpu'))\n"
            "print('torch' in sys.modules, 'open_clip' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]
