"""Model cards decide which model judgments run: synthetic-tiny's bundled card, the built-in open_clip
table, an optional clip_curate_card.json beside local-dir: weights; uncovered judgments are off by default
(one line each in the run's judgments) and run with a warning when asked for."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from clip_curate.config import parse_run_args
from clip_curate.fields import ConfigError
from clip_curate.models.cards import BUILTIN_CARDS, CARD_FILE, card_for
from clip_curate.models.clip import RECOMMENDED_THRESHOLDS, ModelConfig, synthetic_tiny_dir


def _cfg(*flags):
    return parse_run_args(["--input", "urls.parquet", "--output", "out", *flags])[0]


@pytest.fixture()
def tiny_copy(tmp_path):
    """synthetic-tiny's weights and config in a directory of its own, without a card."""
    d = tmp_path / "model"
    d.mkdir()
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy(synthetic_tiny_dir() / name, d / name)
    return d


def test_synthetic_tiny_card_covers_only_the_clip_score():
    card = card_for(ModelConfig(clip_model="synthetic-tiny"))
    assert card.model == "synthetic-tiny" and card.origin == "bundled"
    assert card.covers("clip_score") and card.threshold("clip_score") == RECOMMENDED_THRESHOLDS["synthetic-tiny"]
    for judgment in ("nsfw_concept", "audit_zero_shot", "semantic_dedup"):
        assert not card.covers(judgment)


def test_builtin_table_claims_only_published_calibrations():
    import open_clip

    for (arch, tag), card in BUILTIN_CARDS.items():
        assert tag in open_clip.list_pretrained_tags_by_model(arch), (arch, tag)
        assert not any(card.covers(j) for j in ("nsfw_concept", "audit_zero_shot", "semantic_dedup"))
    assert BUILTIN_CARDS[("ViT-B-32", "openai")].threshold("clip_score") == 0.28
    assert BUILTIN_CARDS[("ViT-L-14", "openai")].top_fraction("clip_score") == 0.3
    default = card_for(ModelConfig())  # ViT-B-32 laion2b_s34b_b79k: no published threshold for its scores
    assert default.model == "ViT-B-32 laion2b_s34b_b79k" and not default.covers("clip_score")
    other = card_for(ModelConfig(clip_model="ViT-B-32", clip_pretrained="metaclip_400m"))
    assert other.origin == "none" and not other.judgments


def test_synthetic_tiny_run_turns_uncovered_judgments_off(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = _cfg("--clip-model", "synthetic-tiny", "--audit", "--min-clip-score", "0.77")
    assert cfg.stages.safety.nsfw_concept is False and cfg.stages.safety.nsfw_classifier is True
    assert cfg.audit.audit_clip is False
    assert "nsfw concept check: off (synthetic-tiny is not calibrated for it); image classifier: on" in cfg.judgments
    assert ("audit zero-shot attributes: off (synthetic-tiny is not calibrated for them); caption terms: on"
            in cfg.judgments)
    assert "clip-score filter: on (--min-clip-score 0.77; synthetic-tiny's card: --min-clip-score 0.77)" in cfg.judgments
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "synthetic-tiny" in warnings[0] and "mean nothing on photos" in warnings[0]


def test_uncovered_judgments_asked_for_run_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = _cfg("--clip-model", "synthetic-tiny", "--nsfw-concept", "--audit", "--audit-clip",
                   "--dedup", "exact,semantic")
    assert cfg.stages.safety.nsfw_concept is True and cfg.audit.audit_clip is True
    assert cfg.stages.dedup.semantic_threshold == 0.95
    text = caplog.text
    for what in ("nsfw concept check: on as asked by --nsfw-concept, but synthetic-tiny is not calibrated for it",
                 "audit zero-shot attributes: on as asked by --audit-clip",
                 "semantic dedup: on as asked (--dedup semantic, cosine >= 0.95), but synthetic-tiny"):
        assert what in text
    assert any(line.startswith("nsfw concept check: on (as asked") for line in cfg.judgments)


def test_uncalibrated_clip_score_filter_warns():
    cfg = _cfg("--min-clip-score", "0.28")  # the default model: LAION's 0.28 was measured with OpenAI weights
    (line,) = [x for x in cfg.judgments if x.startswith("clip-score filter")]
    assert line == ("clip-score filter: on as asked (--min-clip-score 0.28), but ViT-B-32 laion2b_s34b_b79k is not "
                    "calibrated for it")
    assert cfg.stages.clip.min_clip_score == 0.28  # it still runs


def test_no_model_means_no_model_judgments():
    cfg = _cfg("--clip-model", "none")
    assert cfg.judgments[0].startswith("model: none")
    assert "nsfw concept check: off (no CLIP model); image classifier: on" in cfg.judgments


def test_local_dir_without_a_card_is_calibrated_for_nothing(tiny_copy):
    for name in (f"local-dir:{tiny_copy}", str(tiny_copy)):
        card = card_for(ModelConfig(clip_model=name))
        assert card.origin == "none" and not card.judgments
    cfg = _cfg("--clip-model", f"local-dir:{tiny_copy}", "--min-clip-score", "0.5")
    assert cfg.stages.safety.nsfw_concept is False
    assert f"nsfw concept check: off (local-dir:{tiny_copy} has no model card, so it is not calibrated for it); " \
           "image classifier: on" in cfg.judgments
    assert any(x.startswith("clip-score filter: on as asked") for x in cfg.judgments)


def test_local_dir_card_switches_judgments_on_with_its_thresholds(tiny_copy, caplog):
    (tiny_copy / CARD_FILE).write_text(json.dumps({
        "model": "my-clip",
        "judgments": {"nsfw_concept": {"calibrated": True, "threshold": 0.3, "source": "our validation set"},
                      "semantic_dedup": {"calibrated": True, "threshold": 0.9},
                      "audit_zero_shot": {"calibrated": True, "threshold": 0.6},
                      "clip_score": {"calibrated": False}}}))
    with caplog.at_level(logging.WARNING):
        cfg = _cfg("--clip-model", f"local-dir:{tiny_copy}", "--dedup", "exact,semantic", "--audit")
    assert caplog.text == ""  # nothing uncovered was asked for
    safety, dedup, audit = cfg.stages.safety, cfg.stages.dedup, cfg.audit
    assert (safety.nsfw_concept, safety.nsfw_concept_threshold) == (True, 0.3)
    assert dedup.semantic_threshold == 0.9 and (audit.audit_clip, audit.zero_shot_min_prob) == (True, 0.6)
    assert f"model: my-clip (card: {tiny_copy / CARD_FILE})" in cfg.judgments
    assert "nsfw concept check: on (my-clip's card, threshold 0.3); image classifier: on" in cfg.judgments
    assert "semantic dedup: on (cosine >= 0.9; my-clip's card)" in cfg.judgments
    # flags still win over the card
    cfg = _cfg("--clip-model", str(tiny_copy), "--no-nsfw-concept", "--semantic-threshold", "0.97",
               "--dedup", "semantic")
    assert cfg.stages.safety.nsfw_concept is False and cfg.stages.dedup.semantic_threshold == 0.97


@pytest.mark.parametrize("card, message", [
    ("{not json", "not valid JSON"),
    ('{"judgments": {"nsfw": {"calibrated": true}}}', "unknown judgment 'nsfw'"),
    ('{"judgments": {"nsfw_concept": {"calibrated": "yes"}}}', "judgments.nsfw_concept.calibrated"),
    ('{"judgments": {"semantic_dedup": {"calibrated": true, "threshold": 2}}}', "threshold: expected a number"),
    ('{"model": "x", "colour": 1}', "unknown key(s) colour"),
])
def test_bad_card_is_one_line(tiny_copy, card, message):
    (tiny_copy / CARD_FILE).write_text(card)
    with pytest.raises(ConfigError) as err:
        _cfg("--clip-model", f"local-dir:{tiny_copy}")
    assert message in str(err.value) and CARD_FILE in str(err.value) and "\n" not in str(err.value)
