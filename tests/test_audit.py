"""Bias audit: numbers against a hand-computed dataset, zero-shot membership, CLI, report rendering."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import apache_beam as beam
import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from clip_curate.audit.assemble import (AuditConfig, BiasAudit, load_attributes, main, parse_attributes,
                               run_audit, zero_shot_group)
from clip_curate.fields import ConfigError
from clip_curate.audit.report import render_report

ATTRS = """
attributes:
  gender:
    label: Gender
    groups:
      f: {terms: [woman], prompts: [a photo of a woman]}
      m: {terms: [man], prompts: [a photo of a man]}
  job:
    label: Job
    cooccur_with: [gender]
    background_prompts: [a photo of a thing]
    groups:
      doctor: {terms: [doctor], prompts: [a photo of a doctor]}
"""


def _c(uid, caption, lang, url, w, h, score):
    return {"uid": uid, "caption": caption, "language": lang, "url": url, "original_width": w,
            "original_height": h, "width": 256 if w else None, "height": 256 if h else None, "clip_score": score}


def _r(uid, caption, stage, reason, url, w=None, h=None, score=None):
    return {**_c(uid, caption, "en", url, w, h, score), "stage": stage, "reason": reason, "detail": ""}


CURATED = [
    _c("c1", "a man doctor", "en", "http://a.example.com/1.jpg", 640, 480, 0.31),
    _c("c2", "a Man", "en", "http://b.example.com/2.jpg", 100, 100, 0.26),
    _c("c3", "a man running", "de", "http://example.org/3.jpg", 200, 400, 0.30),
    _c("c4", "a woman doctor", "en", "http://x.example.co.uk/4.jpg", 1000, 500, 0.33),
    _c("c5", "a cat", "en", "http://example.org/5.jpg", 300, 300, 0.29),
    _c("c6", "a tree", None, "http://127.0.0.1:8000/6.jpg", None, None, None),
]
REJECTED = [
    _r("r1", "a woman", "clip", "low_clip_score", "http://example.org/r1.jpg", 800, 600, 0.10),
    _r("r2", "a woman and a man", "clip", "low_clip_score", "http://example.org/r2.jpg", score=0.12),
    _r("r3", "a woman doctor", "download", "http_404", "https://sub.shop.example.co.uk/r3.jpg"),
    _r("r4", "a dog", "dedup", "duplicate_exact", None, 64, 64),
]


def _options():
    return PipelineOptions(["--allow_unsafe_triggers"])


def run_audit_pipeline(out_dir, curated, rejected, cfg=None, **kwargs) -> dict:
    with beam.Pipeline(options=_options()) as p:
        (p | "C" >> beam.Create(curated), p | "R" >> beam.Create(rejected)) | BiasAudit(str(out_dir), cfg, **kwargs)
    with open(os.path.join(out_dir, "audit.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def spec():
    import yaml

    return parse_attributes(yaml.safe_load(ATTRS), "test.yaml")


@pytest.fixture(scope="module")
def hand_audit(tmp_path_factory, spec):
    out = tmp_path_factory.mktemp("audit")
    audit = run_audit_pipeline(out, CURATED, REJECTED, AuditConfig(min_group_rows=2), spec=spec)
    return out, audit


def test_hand_computed_numbers(hand_audit):
    _, a = hand_audit
    assert a["totals"] == {"input": 10, "curated": 6, "rejected": 4}
    g = a["attributes"]["gender"]["groups"]
    # f: c4 | r1 r2 r3 -> ratio (1/6) / (4/10)
    assert (g["f"]["input"], g["f"]["curated"], g["f"]["rejected"]) == (4, 1, 3)
    assert g["f"]["representation_ratio"] == pytest.approx((1 / 6) / (4 / 10))
    assert g["f"]["flagged"] and g["f"]["direction"] == "under"
    # m: c1 c2 c3 | r2 -> ratio (3/6) / (4/10) = 1.25 exactly: on the band's edge, not flagged
    assert (g["m"]["input"], g["m"]["curated"], g["m"]["rejected"]) == (4, 3, 1)
    assert g["m"]["representation_ratio"] == pytest.approx(1.25)
    assert not g["m"]["flagged"] and g["m"]["direction"] is None
    assert g["f"]["matched_by"] == {"caption": 4, "clip": 0, "both": 0}
    assert g["f"]["rejection_reasons"] == {"clip/low_clip_score": 2, "download/http_404": 1}
    assert g["m"]["rejection_reasons"] == {"clip/low_clip_score": 1}
    assert a["attributes"]["gender"]["unassigned"]["caption"] == {"input": 3, "curated": 2, "rejected": 1}
    d = a["attributes"]["job"]["groups"]["doctor"]
    assert (d["input"], d["curated"]) == (3, 2) and d["representation_ratio"] == pytest.approx((2 / 6) / (3 / 10))
    assert a["cooccurrence"]["job x gender"]["doctor"] == {
        "m": {"input": 1, "curated": 1, "rejected": 0}, "f": {"input": 2, "curated": 1, "rejected": 1}}
    assert [(f["attribute"], f["group"]) for f in a["flagged"]] == [("gender", "f")]
    f = a["flagged"][0]
    assert f["share_input"] == pytest.approx(0.4) and f["share_curated"] == pytest.approx(1 / 6)
    assert f["top_rejection_reasons"][0] == ["clip/low_clip_score", 2]
    assert a["config"]["bases"] == ["caption"] and a["config"]["clip_mode"] == "off"


def test_hand_computed_composition(hand_audit):
    _, a = hand_audit
    pops = a["populations"]
    assert pops["input"]["language"] == {"en": 8, "de": 1, "(unknown)": 1}
    assert pops["curated"]["language"] == {"en": 4, "de": 1, "(unknown)": 1}
    top = {d["domain"]: d["rows"] for d in pops["input"]["domains"]["top"]}
    assert top == {"example.org": 4, "example.com": 2, "example.co.uk": 2, "127.0.0.1": 1, "(unknown)": 1}
    assert pops["input"]["domains"]["distinct"] == 5 and pops["rejected"]["domains"]["distinct"] == 3
    # shorter side bins (0,64,128,256,384,512,...): 480,100,200,500,300 curated; 600,64 rejected
    assert pops["curated"]["size_hist"][:6] == [0, 1, 1, 1, 2, 0]
    assert pops["rejected"]["size_hist"][:6] == [0, 1, 0, 0, 0, 1]
    # aspect bins (0,0.5,0.67,0.8,0.95,1.05,1.25,1.5,2,3): 1.33, 1.0, 0.5, 2.0, 1.0
    assert pops["curated"]["aspect_hist"] == [0, 1, 0, 0, 2, 0, 1, 0, 1, 0]
    assert sum(pops["input"]["clip_score_hist"]) == 7
    m = a["attributes"]["gender"]["groups"]["m"]["clip_score"]["curated"]
    assert m["rows"] == 3 and m["mean"] == pytest.approx((0.31 + 0.26 + 0.30) / 3)
    edges = a["bins"]["clip_score"]  # bins follow the data's range (tests/test_audit_bins.py)
    at = lambda s: max(i for i, e in enumerate(edges) if e <= s + 1e-9)  # noqa: E731
    assert m["hist"] == [sum(at(s) == i for s in (0.31, 0.26, 0.30)) for i in range(len(edges))]
    assert a["rejected_by"] == {"clip/low_clip_score": 2, "dedup/duplicate_exact": 1, "download/http_404": 1}


def test_audit_json_matches_schema(hand_audit):
    from importlib import resources

    schema = json.loads(resources.files("clip_curate.schemas").joinpath("audit.json").read_text("utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(hand_audit[1], schema)


def test_min_group_rows_and_band(spec, tmp_path):
    # the same data with min_group_rows=5: nothing is eligible, nothing flagged
    a = run_audit_pipeline(tmp_path, CURATED, REJECTED, AuditConfig(min_group_rows=5), spec=spec)
    assert a["flagged"] == []
    assert a["attributes"]["gender"]["groups"]["f"]["by_basis"]["caption"]["eligible"] is False
    with pytest.raises(ConfigError, match="--ratio-low"):
        AuditConfig(ratio_low=1.2)
    with pytest.raises(ConfigError, match="--min-group-rows"):
        AuditConfig(min_group_rows=0)


def test_zero_shot_group_pure():
    e = np.eye(4, dtype=np.float32)
    groups = [e[[0]], e[[1]], None]
    assert zero_shot_group(e[0], groups, e[[3]], 100.0, 0.5) == 0
    assert zero_shot_group(e[1], groups, e[[3]], 100.0, 0.5) == 1
    assert zero_shot_group(e[3], groups, e[[3]], 100.0, 0.5) is None      # background wins
    between = (e[0] + e[1]) / np.sqrt(2)
    assert zero_shot_group(between, groups, None, 100.0, 0.6) is None      # a tie is below min_prob
    assert zero_shot_group(e[0], [None, None], None, 100.0, 0.5) is None   # no prompts: no CLIP membership


def test_clip_membership_with_given_embeddings(spec, tmp_path):
    d = 8
    e = np.eye(d, dtype=np.float32)
    prompt_embs = {"a photo of a woman": e[0], "a photo of a man": e[1], "a photo of a doctor": e[2],
                   "a photo of a thing": e[3]}
    curated = [dict(r, image_embedding=None) for r in CURATED]
    curated[4]["image_embedding"] = e[0]            # "a cat" looks like a woman to CLIP -> f via clip
    curated[3]["image_embedding"] = e[0]            # "a woman doctor", CLIP agrees -> both
    curated[0]["image_embedding"] = e[3]            # "a man doctor": background for job, m by caption
    curated[1]["image_embedding"] = np.ones(5, np.float32)  # wrong dimension: caption only, counted
    rejected = [dict(r, image_embedding=None) for r in REJECTED]
    rejected[0]["image_embedding"] = e[1]           # "a woman" caption, CLIP says man -> f (caption) + m (clip)
    a = run_audit_pipeline(tmp_path, curated, rejected, AuditConfig(min_group_rows=1), spec=spec,
                           prompt_embeddings=prompt_embs)
    assert a["config"]["clip_mode"] == "given" and a["config"]["bases"] == ["caption", "caption_or_clip"]
    assert a["embedding_dim_mismatch_rows"] == 1
    assert a["populations"]["input"]["rows_with_embedding"] == 4
    f = a["attributes"]["gender"]["groups"]["f"]
    assert f["matched_by"] == {"caption": 3, "clip": 1, "both": 1}
    assert (f["input"], f["curated"], f["rejected"]) == (5, 2, 3)
    b = f["by_basis"]["caption_or_clip"]        # rows with embeddings: c1 c4 c5 | r1
    assert (b["input"], b["curated"], b["rejected"]) == (3, 2, 1)
    assert b["representation_ratio"] == pytest.approx((2 / 3) / (3 / 4))
    m = a["attributes"]["gender"]["groups"]["m"]["by_basis"]["caption_or_clip"]
    assert (m["input"], m["curated"]) == (2, 1)     # c1 (caption), r1 (clip)
    assert a["attributes"]["job"]["groups"]["doctor"]["matched_by"]["clip"] == 0


def test_attribute_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="--attributes"):
        load_attributes(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    for text, match in (("attributes: [1, 2]\n", "expected a mapping"),
                        ("attributes:\n  a: {groups: {}}\n", "non-empty 'groups:'"),
                        ("attributes:\n  a: {groups: {g: {}}}\n", "neither terms nor prompts"),
                        ("attributes:\n  a: {groups: {g: {terms: [x], colour: red}}}\n", "must be a mapping"),
                        ("attributes:\n  a: {cooccur_with: [b], groups: {g: {terms: [x]}}}\n", "unknown attribute 'b'"),
                        ("attributes: {a: {groups: {g: {terms: [x]}}}}\nextra: 1\n", "unknown top-level"),
                        ("attributes: [\n", "not valid YAML")):
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=re.escape(match)):
            load_attributes(str(bad))
    shipped = load_attributes()
    names = [a.name for a in shipped.attributes]
    assert names == ["gender_presentation", "age", "occupation"]
    assert shipped.attributes[2].cooccur_with == ("gender_presentation", "age")


def test_world_attribute_groups_parse():
    from clip_curate.synthetic.world import attribute_groups

    spec = parse_attributes({"attributes": {"count": {"groups": attribute_groups("count")}}}, "world")
    assert len(spec.attributes[0].groups) == 4


# ---------------------------------------------------------------------------------------------
# clip-curate audit (reads Parquet outputs)

def _write_outputs(out_dir):
    from clip_curate.schemas import curated_schema, rejected_schema, project

    os.makedirs(out_dir / "curated")
    os.makedirs(out_dir / "rejected")
    cs, rs = curated_schema(), rejected_schema()
    pq.write_table(pa.Table.from_pylist([project(r, cs) for r in CURATED], cs), out_dir / "curated" / "part-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([project(r, rs) for r in REJECTED[:2]], rs), out_dir / "rejected" / "part-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([project(r, rs) for r in REJECTED[2:]], rs), out_dir / "rejected" / "part-00001-of-00002.parquet")


def test_cli_audit_on_parquet_outputs(tmp_path, capsys, hand_audit):
    out = tmp_path / "out"
    _write_outputs(out)
    attrs = tmp_path / "attrs.yaml"
    attrs.write_text(ATTRS, encoding="utf-8")
    assert main(["--input", str(out), "--attributes", str(attrs), "--min-group-rows", "2"]) == 0
    assert "report.html" in capsys.readouterr().out
    a = json.loads((out / "audit" / "audit.json").read_text("utf-8"))
    assert (out / "audit" / "report.html").stat().st_size > 10_000
    ref = hand_audit[1]
    for key in ("totals", "flagged", "cooccurrence", "rejected_by"):
        assert a[key] == ref[key], key
    assert a["populations"] == ref["populations"]
    assert a["sources"] == {"input": str(out)}
    # run_audit with an explicit output dir and the shipped attributes
    assert run_audit(str(out), str(tmp_path / "a2"), None) == 0
    assert json.loads((tmp_path / "a2" / "audit.json").read_text("utf-8"))["config"]["attributes_source"].endswith("attributes.yaml")


def test_cli_audit_errors(tmp_path):
    with pytest.raises(ConfigError, match="--input .*no curated"):
        run_audit(str(tmp_path / "nothing"), str(tmp_path / "a"))
    out = tmp_path / "out"
    _write_outputs(out)
    with pytest.raises(ConfigError, match="--attributes"):
        run_audit(str(out), str(tmp_path / "a"), str(tmp_path / "missing.yaml"))
    from clip_curate.cli import main as cli_main

    assert cli_main(["audit", "--input", str(tmp_path / "nothing")]) == 2
    assert cli_main(["audit", "--input", str(out), "--ratio-low", "2"]) == 2
    assert cli_main(["audit", "--input", str(out), "--no-such-flag"]) == 2
    assert cli_main(["audit"]) == 2


# ---------------------------------------------------------------------------------------------
# report.html

def test_report_is_self_contained(hand_audit):
    out, a = hand_audit
    html = (out / "report.html").read_text("utf-8")
    assert html == render_report(a)
    assert "http://" not in html and "https://" not in html
    for m in re.finditer(r"""(?:src|href)\s*=\s*["']([^"']*)""", html):
        assert m.group(1).startswith(("data:image/png;base64,", "#")), m.group(1)[:60]
    assert not re.search(r"<(?:script|link|iframe)\b", html) and "url(" not in html and "@import" not in html
    assert html.count("data:image/png;base64,") >= 4
    assert 'id="flagged-groups"' in html and "under-represented" in html and "Limitations" in html


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(hand_audit, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    from PIL import Image

    out, a = hand_audit
    report = out / "report.html"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--window-size=1280,2000"]
    env = {**os.environ, "HOME": str(tmp_path)}
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", report.as_uri()], check=True, timeout=120, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape == (2000, 1280)
    assert img.std() > 10, "screenshot is blank"
    assert (img < 128).mean() > 0.01          # some dark text/plot pixels
    dom = subprocess.run(flags + ["--dump-dom", report.as_uri()], check=True, timeout=120, env=env,
                         capture_output=True, text=True).stdout
    table = re.search(r'<table id="flagged-groups">(.*?)</table>', dom, re.S)
    assert table, "flagged-group table missing from the rendered page"
    rows = re.findall(r'<tr class="flag">(.*?)</tr>', table.group(1), re.S)
    assert len(rows) == len(a["flagged"]) == 1
    assert "Gender" in rows[0] and ">f<" in rows[0] and "0.42" in rows[0]
