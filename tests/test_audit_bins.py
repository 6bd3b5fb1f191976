"""The audit follows the model: clip_score histogram bins span the data's range, and the ratio chart draws
in-band, flagged and too-small groups in three styles with a legend entry each."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from clip_curate.audit import report
from clip_curate.audit.assemble import (CLIP_MAX_BINS, AttributeSpec, AuditConfig, Attribute, Group, build_audit,
                                        row_keys)

SPEC = AttributeSpec((Attribute("kind", (Group("dog", ("dog",)), Group("cat", ("cat",)), Group("owl", ("owl",))), label="kind"),))


def _audit(scores_curated, scores_rejected=(), captions=None, cfg=None):
    counts: Counter = Counter()
    rows = [("curated", s) for s in scores_curated] + [("rejected", s) for s in scores_rejected]
    for i, (pop, score) in enumerate(rows):
        caption = captions[i] if captions else "a photo"
        groups = {"kind": {g.name: "caption" for g in SPEC.attributes[0].groups if g.name in caption}}
        row = {"uid": str(i), "caption": caption, "clip_score": score, "stage": "clip", "reason": "low_clip_score"}
        counts.update(row_keys(pop, row, groups, has_emb=False))
    return build_audit(dict(counts), {}, {}, cfg or AuditConfig(), SPEC)


@pytest.mark.parametrize("lo, hi", [(0.70, 0.92), (-0.08, 0.41), (0.801, 0.812), (-0.9, 0.95)])
def test_clip_bins_span_the_data(lo, hi):
    scores = list(np.linspace(lo, hi, 200))
    a = _audit(scores[:150], scores[150:])
    edges, step = a["bins"]["clip_score"], a["bins"]["clip_score_step"]
    hist = a["populations"]["input"]["clip_score_hist"]
    assert len(edges) == len(hist) <= CLIP_MAX_BINS
    assert edges[0] <= lo < edges[0] + step and edges[-1] <= hi < edges[-1] + step + 1e-9
    assert sum(hist) == 200 and hist[0] > 0 and hist[-1] > 0
    assert max(hist) < 0.5 * sum(hist)  # spread over the bins, not piled into one
    cur, rej = (a["populations"][p]["clip_score_hist"] for p in ("curated", "rejected"))
    assert [c + r for c, r in zip(cur, rej)] == hist
    for i, e in enumerate(edges):  # each bin holds exactly the scores in [e, e + step)
        assert hist[i] == sum(1 for s in scores if e - 1e-9 <= s < e + step - 1e-9)


def test_shipped_model_scores_no_longer_pile_into_the_last_bin():
    """synthetic-tiny's matched pairs score ~0.82: the old fixed -0.2..0.5 bins put every row in the last one."""
    rng = np.random.default_rng(0)
    a = _audit(list(np.clip(rng.normal(0.82, 0.04, 300), -1, 1)), list(rng.normal(0.6, 0.05, 100)))
    hist = a["populations"]["input"]["clip_score_hist"]
    assert a["bins"]["clip_score"][0] >= 0.35 and max(hist) < 0.25 * sum(hist)


def test_group_histograms_use_the_same_bins():
    captions = ["dog"] * 5 + ["cat"] * 5
    a = _audit([0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7], captions=captions)
    n = len(a["bins"]["clip_score"])
    for g in ("dog", "cat"):
        hist = a["attributes"]["kind"]["groups"][g]["clip_score"]["input"]["hist"]
        assert len(hist) == n and sum(hist) == 5


def test_no_scores_still_gives_bins():
    a = _audit([None, None])
    assert a["bins"]["clip_score"] and sum(a["populations"]["input"]["clip_score_hist"]) == 0
    assert report.render_report(a).startswith("<!doctype html>")


def _ratio_audit():
    # 30 dogs (22 kept: in band), 30 cats (6 kept: flagged under), 4 owls (0 kept: out of band but too small)
    captions = ["dog"] * 30 + ["cat"] * 30 + ["owl"] * 4 + ["a photo"] * 40
    kept = set(range(22)) | set(range(30, 36)) | set(range(64, 104))
    order = sorted(range(len(captions)), key=lambda i: i not in kept)
    cur = [0.3 for i in order if i in kept]
    rej = [0.1 for i in order if i not in kept]
    return _audit(cur, rej, captions=[captions[i] for i in order], cfg=AuditConfig(min_group_rows=10))


def test_ratio_chart_draws_three_kinds_of_group(monkeypatch):
    a = _ratio_audit()
    cfg = a["config"]
    status = {g: report.group_status(a["attributes"]["kind"]["groups"][g], cfg) for g in ("dog", "cat", "owl")}
    assert status == {"dog": "in_band", "cat": "flagged", "owl": "small"}
    figs = []
    monkeypatch.setattr(report, "_png", lambda fig: figs.append(fig) or "data:image/png;base64,")
    report.plot_ratios(a)
    (fig,) = figs
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[1:] == ["inside the band", "flagged (outside the band)",
                          "outside the band, too few rows to flag (< 10 input rows)"]
    names = [t.get_text().split(": ")[1] for t in ax.get_yticklabels()]
    fills = {names[round(p.get_y() + p.get_height() / 2)]: (p.get_facecolor(), p.get_hatch())
             for bars in ax.containers for p in bars}
    assert len({fills[g] for g in ("dog", "cat", "owl")}) == 3  # three distinct styles
    assert fills["owl"][1] == "///"


def test_report_names_too_small_groups_outside_the_band():
    a = _ratio_audit()
    lines = report.summary_sentences(a)
    assert any("fewer than 10 input rows, too few to flag: kind: owl" in ln for ln in lines)
    html = report.render_report(a)
    assert "src=\"http" not in html and "<script src" not in html  # still self-contained
