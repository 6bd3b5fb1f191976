"""Caption rules (words, characters, language) and CLIP score filters (absolute, global top fraction)."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest

from clip_curate.stages.caption import CaptionConfig, CaptionFilter, build_detector, caption_verdict
from clip_curate.stages.clip_score import ClipFilterConfig, ClipScoreFilter, clip_verdict, cutoff_from_quantiles
from clip_curate.fields import ConfigError

EN = "A red circle above two blue squares on a striped background"
DE = "Ein roter Kreis über zwei blauen Quadraten auf gestreiftem Hintergrund"
FR = "Un cercle rouge au-dessus de deux carrés bleus sur un fond rayé"
CANDIDATES = ("en", "de", "fr", "es", "it", "nl")


@pytest.fixture(scope="module")
def detector():
    return build_detector(CaptionConfig(language_candidates=CANDIDATES))


def test_word_and_char_rules():
    cfg = CaptionConfig(min_caption_words=3, max_caption_chars=40, detect_language=False)
    assert caption_verdict(None, cfg) == (None, "missing_caption", "caption is null")
    assert caption_verdict(" \t\n", cfg) == (None, "missing_caption", "caption is empty")
    assert caption_verdict("two  words", cfg) == (None, "short_caption", "words=2 < 3")
    assert caption_verdict("three small words", cfg) == (None, None, "")
    assert caption_verdict("x " * 30, cfg) == (None, "long_caption", "chars=60 > 40")
    assert caption_verdict("a" * 40 + " b c", cfg)[1] == "long_caption"
    assert caption_verdict("a" * 36 + " b c", cfg)[1] is None  # exactly 40 chars: kept
    off = CaptionConfig(detect_language=False)
    assert caption_verdict("x", off) == (None, None, "")
    assert caption_verdict("", off)[1] == "missing_caption"


def test_language_detection_en_de_fr(detector):
    cfg = CaptionConfig(language_candidates=CANDIDATES)
    assert [caption_verdict(s, cfg, detector)[0] for s in (EN, DE, FR)] == ["en", "de", "fr"]
    only = CaptionConfig(languages=("en", "DE"), language_candidates=CANDIDATES)
    assert only.languages == ("en", "de")
    assert caption_verdict(EN, only, detector) == ("en", None, "")
    assert caption_verdict(DE, only, detector) == ("de", None, "")
    assert caption_verdict(FR, only, detector) == ("fr", "language", "language=fr not in en,de")
    assert caption_verdict("12345 67", only, detector) == (None, "language", "language=undetermined not in en,de")
    # word rules come before the language rule; the language is still recorded
    short = CaptionConfig(min_caption_words=20, languages=("en",), language_candidates=CANDIDATES)
    assert caption_verdict(FR, short, detector)[:2] == ("fr", "short_caption")


def test_default_detector_all_languages():
    """The default (all lingua languages, high accuracy) on a few captions."""
    cfg = CaptionConfig()
    det = build_detector(cfg)
    assert [caption_verdict(s, cfg, det)[0] for s in (EN, DE, FR)] == ["en", "de", "fr"]
    assert caption_verdict("Фото собаки на пляже", cfg, det)[0] == "ru"


def test_caption_config_errors():
    for kwargs, msg in [(dict(min_caption_words=-1), "--min-caption-words"),
                        (dict(max_caption_chars=-5), "--max-caption-chars"),
                        (dict(languages=("en", "xx")), "--languages: unknown ISO 639-1 code"),
                        (dict(languages=("en",), detect_language=False), "--languages needs language detection"),
                        (dict(language_candidates=("en",)), "at least two"),
                        ]:
        with pytest.raises(ConfigError, match=msg):
            CaptionConfig(**kwargs)
    assert CaptionConfig(languages=("de",), language_candidates=("en", "fr")).language_candidates == ("en", "fr", "de")
    assert CaptionConfig(language_candidates=("all",)).language_candidates == ()


def test_caption_filter_pipeline(run_transform):
    rows = [{"uid": "en", "caption": EN}, {"uid": "de", "caption": DE}, {"uid": "fr", "caption": FR},
            {"uid": "none", "caption": None}, {"uid": "short", "caption": "red circle"},
            {"uid": "long", "caption": EN + " " + EN + " " + EN}]
    cfg = CaptionConfig(min_caption_words=3, max_caption_chars=120, languages=("en", "de"),
                        language_candidates=CANDIDATES)
    kept, rejected, counters, _ = run_transform(rows, CaptionFilter(cfg))
    assert sorted(r["uid"] for r in kept) == ["de", "en"]
    assert {r["uid"]: r["language"] for r in kept} == {"en": "en", "de": "de"}
    rej = {r["uid"]: (r["stage"], r["reason"], r["language"]) for r in rejected}
    assert rej == {"fr": ("caption", "language", "fr"), "none": ("caption", "missing_caption", None),
                   "short": ("caption", "short_caption", "en"), "long": ("caption", "long_caption", "en")}
    assert next(r for r in rejected if r["uid"] == "long")["detail"] == f"chars={len(EN) * 3 + 2} > 120"
    assert counters["caption_in"] == 6 and counters["caption_out"] == 2
    assert counters["caption_language"] == 1 and counters["caption_short_caption"] == 1


def test_clip_verdict_details():
    cfg = ClipFilterConfig(min_clip_score=0.28)
    assert clip_verdict(0.12344, cfg) == ("low_clip_score", "clip_score=0.1234 < 0.28")
    assert clip_verdict(0.28, cfg) == (None, "")
    assert clip_verdict(None, cfg) == (None, "")
    top = ClipFilterConfig(clip_top_fraction=0.3)
    assert clip_verdict(0.2, top, cutoff=0.25) == ("below_top_fraction",
                                                   "clip_score=0.2000 < top-0.3 cutoff 0.2500")
    assert clip_verdict(0.25, top, cutoff=0.25) == (None, "")  # ties at the cutoff are kept
    assert cutoff_from_quantiles([], 0.3) is None
    assert cutoff_from_quantiles([0.0, 0.5, 1.0], 0.5) == 0.5
    assert cutoff_from_quantiles(list(np.linspace(0, 1, 1001)), 0.3) == pytest.approx(0.7)
    for kwargs, msg in [(dict(min_clip_score=1.5), "--min-clip-score"), (dict(clip_top_fraction=0.0), "(0, 1]"),
                        (dict(clip_top_fraction=1.2), "--clip-top-fraction")]:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            ClipFilterConfig(**kwargs)


def _score_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(0.25, 0.06, n), 6)
    scores[:50] = 0.3  # a block of exact ties
    return [{"uid": f"r{i:05d}", "clip_score": float(s)} for i, s in enumerate(scores)]


def test_absolute_threshold_pipeline(run_transform):
    rows = _score_rows(400) + [{"uid": "unscored", "clip_score": None}]
    kept, rejected, counters, _ = run_transform(rows, ClipScoreFilter(ClipFilterConfig(min_clip_score=0.25)))
    assert all(r["clip_score"] is None or r["clip_score"] >= 0.25 for r in kept)
    assert all(r["clip_score"] < 0.25 for r in rejected)
    assert {(r["stage"], r["reason"]) for r in rejected} == {("clip", "low_clip_score")}
    assert len(kept) + len(rejected) == 401 and counters["clip_unscored"] == 1
    assert counters["clip_low_clip_score"] == len(rejected)


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.3])
def test_top_fraction_across_worker_processes(fraction, run_transform):
    rows = _score_rows(6000, seed=1)
    kept, rejected, counters, _ = run_transform(rows, ClipScoreFilter(ClipFilterConfig(clip_top_fraction=fraction)),
                                                options=["--direct_num_workers=2",
                                                         "--direct_running_mode=multi_processing"])
    assert len(kept) + len(rejected) == 6000
    assert abs(len(kept) / 6000 - fraction) <= 0.02
    assert min(r["clip_score"] for r in kept) >= max(r["clip_score"] for r in rejected)
    assert {r["reason"] for r in rejected} == {"below_top_fraction"}
    assert "cutoff" in rejected[0]["detail"]
    # ties share a fate: the 0.3 block is all kept or all rejected
    ties = {r["uid"] for r in kept if r["clip_score"] == 0.3}
    assert len(ties) in (0, 50)


def test_both_filters_and_empty_input(run_transform):
    rows = _score_rows(1000, seed=2)
    cfg = ClipFilterConfig(min_clip_score=0.2, clip_top_fraction=0.5)
    kept, rejected, _, _ = run_transform(rows, ClipScoreFilter(cfg))
    reasons = {r["reason"] for r in rejected}
    assert reasons == {"low_clip_score", "below_top_fraction"}
    assert abs(len(kept) / 1000 - 0.5) <= 0.02  # the fraction is over all scored rows reaching the stage
    kept, rejected, _, _ = run_transform([], ClipScoreFilter(ClipFilterConfig(clip_top_fraction=0.1)))
    assert kept == [] and rejected == []


def _sweep(scores: np.ndarray, bad: np.ndarray) -> str:
    """Precision/recall of 'score < t' for a few thresholds (shown when the world test fails)."""
    lines = []
    for t in np.round(np.arange(-0.1, 0.6, 0.02), 2):
        drop = scores < t
        tp = int((drop & bad).sum())
        lines.append(f"t={t:+.2f} precision={tp / max(drop.sum(), 1):.3f} recall={tp / max(bad.sum(), 1):.3f}")
    return "\n".join(lines)


@pytest.mark.slow
def test_synthetic_tiny_filters_mismatches_in_a_fresh_world(run_transform):
    """Embed + ClipScoreFilter at the recommended threshold on a world seed never used in training.

    Mismatched captions (random and one-attribute-changed together) are dropped with precision and recall
    >= 0.9 (the issue's bar); random ones alone with recall >= 0.9. Hard mismatches alone are the weaker kind
    (held-out AUC 0.979, shape 0.92; docs/model-card-synthetic-tiny.md): their recall is guarded at the measured level."""
    from clip_curate.models import clip as cm
    from clip_curate.stages.embed import Embed

    if not (cm.synthetic_tiny_dir() / cm.CONFIG_FILE).is_file():
        pytest.skip("synthetic-tiny is not bundled in this checkout")
    from clip_curate.synthetic import world

    w = world.generate_world(400, seed=31337, mismatch_random=0.2, mismatch_hard=0.2, dup_exact=0, dup_near=0,
                             unsafe=0, eval_leak=0)
    rows = [{"uid": it.uid, "caption": it.caption, "image": it.image_bytes, "truth_kind": it.kind}
            for it in w.items if it.image_bytes]
    threshold = cm.recommended_threshold("synthetic-tiny")

    class EmbedThenFilter(beam.PTransform):
        def expand(self, pcoll):
            kept, rej_embed = pcoll | Embed(cm.ModelConfig(clip_model="synthetic-tiny", device="cpu"))
            kept, rej_clip = kept | ClipScoreFilter(ClipFilterConfig(min_clip_score=threshold))
            return kept, (rej_embed, rej_clip) | beam.Flatten()

    kept, rejected, _, _ = run_transform(rows, EmbedThenFilter())
    assert len(kept) + len(rejected) == len(rows)
    assert {r["reason"] for r in rejected} <= {"low_clip_score"}
    bad_kinds = ("mismatch_random", "mismatch_hard")
    scores = np.array([r["clip_score"] for r in kept + rejected])
    bad = np.array([r["truth_kind"].split(":")[0] in bad_kinds for r in kept + rejected])
    report = _sweep(scores, bad)
    tp = sum(r["truth_kind"].split(":")[0] in bad_kinds for r in rejected)
    precision = tp / max(len(rejected), 1)
    recall_by_kind = {}
    for kind in bad_kinds:  # each kind of mismatch on its own
        k_total = sum(r["truth_kind"].split(":")[0] == kind for r in kept + rejected)
        recall_by_kind[kind] = sum(r["truth_kind"].split(":")[0] == kind for r in rejected) / k_total
    assert precision >= 0.9, f"threshold {threshold}: P={precision:.3f}\n{report}"
    assert recall_by_kind["mismatch_random"] >= 0.9, f"{recall_by_kind}\n{report}"
    assert recall_by_kind["mismatch_hard"] >= 0.75, f"{recall_by_kind}\n{report}"  # measured 0.89 at 0.77
    # the bar for the bundled model on a fresh world: precision and recall >= 0.9 (measured 1.0 / 0.944)
    assert tp / sum(bad) >= 0.9, f"recall {tp / sum(bad):.3f}\n{report}"
