"""Safety stage: caption word lists, CLIP concept score, opennsfw on real photos, drop/tag policy wiring."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from clip_curate import records
from clip_curate.fields import ConfigError
from clip_curate.models.clip import ModelConfig, load_clip
from clip_curate.stages.safety import (SafetyCheck, SafetyConfig, WordList, caption_unsafe_term, concept_prompts,
                                concept_scores, load_wordlist, parse_wordlist)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat")


@pytest.fixture(scope="module")
def photos(jpeg) -> dict[str, bytes]:
    from skimage import data

    return {name: jpeg(getattr(data, name)(), max_side=256) for name in PHOTOS}


def _row(uid: str, caption: str = "a photo", image: bytes | None = None, emb=None) -> dict:
    return {"uid": uid, "url": f"http://127.0.0.1/{uid}.jpg", "caption": caption, "image": image,
            "width": 256, "height": 256, "language": "en", "clip_score": 0.3, "image_embedding": emb}


def _plain(row: dict) -> dict:
    keep = ("uid", "caption", "nsfw_score", "nsfw_clip_score", "unsafe_caption", "safety_flags",
            "stage", "reason", "detail")
    return {k: row.get(k) for k in keep if k in row}


@pytest.fixture(scope="session")
def run_safety(run_transform):
    def run(rows, cfg, **kwargs):
        """Run SafetyCheck on ``rows`` in a real DirectRunner pipeline; returns (kept, rejected) dicts by uid
        of the rows' safety fields, as JSON."""
        ran = run_transform(rows, SafetyCheck(cfg, **kwargs), options=["--allow_unsafe_triggers"])
        return tuple({r["uid"]: r for r in (json.loads(json.dumps(_plain(row))) for row in out)}
                     for out in (ran.kept, ran.rejected))
    return run


# ---------------------------------------------------------------------------------------------
# caption word lists

def test_whole_word_boundaries():
    wl = WordList(["ass", "gore"])
    assert caption_unsafe_term("a class photo of the passage", wl) is None
    assert caption_unsafe_term("assassin's creed", wl) is None
    assert caption_unsafe_term("kick ass!", wl) == "ass"
    assert caption_unsafe_term("(ass)", wl) == "ass"
    assert caption_unsafe_term("ass-kicking", wl) == "ass"        # hyphen is a boundary
    assert caption_unsafe_term("gore_fest", wl) == "gore"          # underscore is a boundary
    assert caption_unsafe_term("gore2", wl) is None                # digits are word characters
    assert caption_unsafe_term("Gorey details", wl) is None
    assert caption_unsafe_term(None, wl) is None
    assert caption_unsafe_term("", wl) is None


def test_case_and_unicode():
    wl = WordList(["straße", "fine", "nackt", "порно", "pornografía", "色情"])
    assert caption_unsafe_term("DIE STRASSE", wl) == "straße"        # casefold: ß == ss
    assert caption_unsafe_term("ﬁne weather", wl) == "fine"          # NFKC: the ﬁ ligature
    assert caption_unsafe_term("NACKT am Strand", wl) == "nackt"
    assert caption_unsafe_term("ПОРНО видео", wl) == "порно"
    assert caption_unsafe_term("Pornografía española", wl) == "pornografía"
    assert caption_unsafe_term("pornografia", wl) is None           # accents are not stripped
    assert caption_unsafe_term("nacktschnecke", wl) is None          # not inside a longer word
    assert caption_unsafe_term("这是色情片", wl) == "色情"            # no-space scripts: substring
    assert caption_unsafe_term("ＰＯＲＮＯ", ["porno"]) == "porno"      # full-width letters (NFKC)


def test_multi_word_terms():
    wl = WordList(["blow job", "dead body", "self harm"])
    assert caption_unsafe_term("a Blow-Job scene", wl) == "blow job"
    assert caption_unsafe_term("blow   job", wl) == "blow job"
    assert caption_unsafe_term("a dead_body", wl) == "dead body"
    assert caption_unsafe_term("blow jobs", wl) is None
    assert caption_unsafe_term("a job to blow", wl) is None
    assert caption_unsafe_term("self-harm awareness", wl) == "self harm"
    # terms with inner punctuation keep the same boundary rules
    special = WordList(["f*ck", "a.s.s"])
    assert caption_unsafe_term("what the F*CK", special) == "f*ck"
    assert caption_unsafe_term("of*cks", special) is None
    assert caption_unsafe_term("an a.s.s.", special) == "a.s.s"
    # the longest term wins when one term is a prefix of another
    assert caption_unsafe_term("hardcore sex", WordList(["hardcore", "hardcore sex"])) == "hardcore sex"


def test_default_list_and_parse(tmp_path):
    from clip_curate.synthetic.world import UNSAFE_CAPTION_TERMS, generate_world

    wl = load_wordlist()
    assert len(wl) > 100
    for caption in ("free porn video", "Hentai collection", "CHILD PORNOGRAPHY", "a gory scene"):
        assert caption_unsafe_term(caption, wl), caption
    for caption in ("a class photo", "Cocktail bar at night", "breast cancer awareness walk",
                    "blood orange salad", "Passage to India", "a sussex landscape", "Scunthorpe United"):
        assert caption_unsafe_term(caption, wl) is None, caption
    # the synthetic world's unsafe captions are caught, its safe captions are not
    world = generate_world(300, seed=3, unsafe=0.1, unsafe_caption_fraction=1.0)
    for item in world.items:
        hit = caption_unsafe_term(item.caption, wl)
        assert (hit is not None) == bool(item.truth.get("unsafe_caption")), item.caption
    assert set(UNSAFE_CAPTION_TERMS) & {"gore", "gory"}
    assert parse_wordlist("# comment\n\nfoo  \n  bar baz # trailing\n") == ("foo", "bar baz")


def test_custom_wordlist_file_and_errors(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# mine\nwidget\nbig gadget\n", encoding="utf-8")
    wl = load_wordlist(str(path))
    assert wl.terms == ("widget", "big gadget")
    assert caption_unsafe_term("a BIG-gadget", wl) == "big gadget"
    with pytest.raises(ConfigError, match="--unsafe-words"):
        load_wordlist(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no terms"):
        load_wordlist(str(empty))
    with pytest.raises(ConfigError, match="--unsafe-words"):
        SafetyConfig(unsafe_words=str(tmp_path / "missing.txt")).validate_environment()


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="--nsfw-policy"):
        SafetyConfig(nsfw_policy="blur")
    with pytest.raises(ConfigError, match="--nsfw-threshold"):
        SafetyConfig(nsfw_threshold=1.5)
    with pytest.raises(ConfigError, match="--nsfw-concept-threshold"):
        SafetyConfig(nsfw_concept_threshold=-0.1)
    with pytest.raises(ConfigError, match="--nsfw-batch-size"):
        SafetyConfig(nsfw_batch_size=0)
    with pytest.raises(ConfigError, match="--unsafe-concept"):
        SafetyConfig(unsafe_concepts=(" ",))
    bad = tmp_path / "c.yaml"
    bad.write_text("unsafe: [x]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'neutral' must be a non-empty list"):
        SafetyConfig(concepts=str(bad)).validate_environment()
    bad.write_text("unsafe: [x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        SafetyConfig(concepts=str(bad)).validate_environment()
    with pytest.raises(ConfigError, match="--concepts"):
        SafetyConfig(concepts=str(tmp_path / "nope.yaml")).validate_environment()
    good = tmp_path / "good.yaml"
    good.write_text("unsafe: [a red blob]\nneutral: [a blue square, a green field]\n", encoding="utf-8")
    assert concept_prompts(SafetyConfig(concepts=str(good))) == (("a red blob",), ("a blue square", "a green field"))
    assert concept_prompts(SafetyConfig(concepts=str(good), unsafe_concepts=("x",)))[0] == ("x",)
    unsafe, neutral = concept_prompts(SafetyConfig())
    assert len(unsafe) >= 5 and len(neutral) >= 5


def test_config_flags_roundtrip():
    import argparse

    from clip_curate.fields import add_config_arguments, config_from_namespace

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SafetyConfig, "safety")
    ns = parser.parse_args(["--nsfw-policy", "tag", "--nsfw-threshold", "0.6", "--no-caption-safety",
                            "--unsafe-concept", "a red blob", "--unsafe-concept", "gore"])
    cfg = config_from_namespace(SafetyConfig, ns)
    assert (cfg.nsfw_policy, cfg.nsfw_threshold, cfg.caption_safety) == ("tag", 0.6, False)
    assert cfg.unsafe_concepts == ("a red blob", "gore")


# ---------------------------------------------------------------------------------------------
# concept score (pure)

def test_concept_scores_constructed():
    e = np.eye(4, dtype=np.float32)
    unsafe, neutral = e[[0]], e[[1, 2]]
    x = np.stack([e[0], e[1], e[3], (e[0] + e[1]) / np.sqrt(2)])
    s = concept_scores(x, unsafe, neutral, temperature=100.0)
    assert s[0] > 0.999 and s[1] < 0.001
    assert s[2] == pytest.approx(0.5) and s[3] == pytest.approx(0.5)
    # the score does not depend on how many prompts each list has
    s2 = concept_scores(x, unsafe, np.concatenate([neutral, neutral, e[[2]]]), 100.0)
    np.testing.assert_allclose(s, s2)
    # lower temperature = softer
    assert 0.5 < concept_scores(e[0], unsafe, neutral, 1.0)[0] < 0.8


# ---------------------------------------------------------------------------------------------
# Beam stage

def test_opennsfw_real_photos_are_safe(photos, run_safety):
    rows = [_row(name, f"a photo: {name}", img) for name, img in photos.items()]
    kept, rejected = run_safety(rows, SafetyConfig(nsfw_batch_size=4))
    assert rejected == {}
    assert set(kept) == set(PHOTOS)
    for name, r in kept.items():
        assert r["nsfw_score"] is not None and 0.0 <= r["nsfw_score"] < 0.1, (name, r["nsfw_score"])
        assert r["safety_flags"] == "" and r["unsafe_caption"] is False
        assert r["nsfw_clip_score"] is None                    # no CLIP model: concept check skipped
    assert kept["astronaut"]["nsfw_score"] == pytest.approx(0.032, abs=0.02)


def test_threshold_wiring_drop_and_tag(photos, run_safety):
    names = ("astronaut", "coffee", "chelsea")
    rows = [_row(n, "a photo", photos[n]) for n in names]
    rows.append(_row("clean_caption_bad", "free porn here", photos["rocket"]))
    rows.append(_row("broken", "a photo", b"\xff\xd8\xff not really a jpeg"))
    # threshold 0.0 forces every decodable image over the threshold
    kept, rejected = run_safety(rows, SafetyConfig(nsfw_threshold=0.0, nsfw_policy="drop"))
    assert set(rejected) == {*names, "clean_caption_bad"} and set(kept) == {"broken"}
    for uid in names:
        r = rejected[uid]
        assert (r["stage"], r["reason"]) == ("safety", "nsfw_image")
        assert r["detail"].startswith("nsfw_score=") and ">= 0.0" in r["detail"]
        assert r["nsfw_score"] is not None
    # several flags: the first in priority order is the reason, the detail lists all
    both = rejected["clean_caption_bad"]
    assert both["reason"] == "nsfw_image" and "term='porn'" in both["detail"]
    assert kept["broken"]["nsfw_score"] is None               # undecodable: no score, no crash

    kept, rejected = run_safety(rows, SafetyConfig(nsfw_threshold=0.0, nsfw_policy="tag"))
    assert rejected == {} and len(kept) == len(rows)
    assert {kept[n]["safety_flags"] for n in names} == {"nsfw_image"}
    assert kept["clean_caption_bad"]["safety_flags"] == "nsfw_image,unsafe_caption"
    assert kept["clean_caption_bad"]["unsafe_caption"] is True

    # a threshold of 1.0 flags nothing; the caption list still does
    kept, rejected = run_safety(rows, SafetyConfig(nsfw_threshold=1.0))
    assert set(rejected) == {"clean_caption_bad"}
    assert rejected["clean_caption_bad"]["reason"] == "unsafe_caption"
    assert rejected["clean_caption_bad"]["detail"] == "term='porn'"
    # classifier and caption check off: nothing is flagged, nsfw_score stays null
    kept, rejected = run_safety(rows, SafetyConfig(nsfw_classifier=False, caption_safety=False))
    assert rejected == {} and all(r["nsfw_score"] is None for r in kept.values())


def test_concept_check_wiring_with_given_prompt_embeddings(run_safety):
    rng = np.random.default_rng(0)
    d = 16
    unsafe = np.eye(d, dtype=np.float32)[[0, 1]]
    neutral = np.eye(d, dtype=np.float32)[[2, 3, 4]]

    def near(i):
        v = np.eye(d, dtype=np.float32)[i] + 0.05 * rng.normal(size=d).astype(np.float32)
        return v / np.linalg.norm(v)

    rows = [_row("u0", emb=near(0)), _row("u1", emb=near(1)), _row("n0", emb=near(2)), _row("n1", emb=near(4)),
            _row("none", emb=None), _row("wrongdim", emb=np.ones(8, np.float32) / np.sqrt(8))]
    cfg = SafetyConfig(nsfw_classifier=False, nsfw_concept_threshold=0.5)
    kept, rejected = run_safety(rows, cfg, prompt_embeddings={"unsafe": unsafe, "neutral": neutral})
    assert set(rejected) == {"u0", "u1"}
    assert all(r["reason"] == "nsfw_concept" and r["detail"].startswith("nsfw_clip_score=") for r in rejected.values())
    assert rejected["u0"]["nsfw_clip_score"] > 0.99
    assert kept["n0"]["nsfw_clip_score"] < 0.01
    assert kept["none"]["nsfw_clip_score"] is None and kept["wrongdim"]["nsfw_clip_score"] is None
    # tag policy keeps them, flagged
    kept, rejected = run_safety(rows, SafetyConfig(nsfw_classifier=False, nsfw_policy="tag"),
                                prompt_embeddings={"unsafe": unsafe, "neutral": neutral})
    assert rejected == {} and kept["u1"]["safety_flags"] == "nsfw_concept" and kept["n1"]["safety_flags"] == ""


def test_reasons_are_in_vocabulary():
    for reason in ("nsfw_image", "nsfw_concept", "unsafe_caption"):
        records.check_reason("safety", reason)


def _synthetic_model_config():
    from importlib import resources

    if not resources.files("clip_curate.data").joinpath("synthetic-tiny").is_dir():
        return None
    return ModelConfig(clip_model="synthetic-tiny")


@pytest.mark.slow
def test_concept_check_on_synthetic_world(run_safety):
    """The world's unsafe motif (blood splatter) is found by the concept check with its own prompts."""
    model_config = _synthetic_model_config()
    if model_config is None:
        pytest.skip("the bundled synthetic-tiny model is not in this checkout")
    from clip_curate.synthetic.world import NEUTRAL_CONCEPT_PROMPTS, UNSAFE_CONCEPT_PROMPTS, generate_world
    import torch

    world = generate_world(120, seed=11, unsafe=0.2, unsafe_caption_fraction=0.0, mismatch_random=0,
                           mismatch_hard=0, dup_exact=0, dup_near=0, eval_leak=0)
    loaded = load_clip(model_config)
    with torch.no_grad():
        images = torch.stack([loaded.preprocess(Image.open(io.BytesIO(it.image_bytes)).convert("RGB"))
                              for it in world.items])
        embs = loaded.model.encode_image(images).float()
        embs = torch.nn.functional.normalize(embs, dim=-1).numpy()
    rows = [_row(it.uid, it.caption, None, e) for it, e in zip(world.items, embs)]
    cfg = SafetyConfig(nsfw_classifier=False, caption_safety=False, unsafe_concepts=UNSAFE_CONCEPT_PROMPTS,
                       neutral_concepts=NEUTRAL_CONCEPT_PROMPTS, nsfw_concept=True)  # its card leaves it off
    kept, rejected = run_safety(rows, cfg, model_config=model_config)
    truth = {it.uid: bool(it.truth["unsafe"]) for it in world.items}
    flagged = set(rejected)
    unsafe = {u for u, t in truth.items() if t}
    tp = len(flagged & unsafe)
    recall, precision = tp / len(unsafe), tp / max(len(flagged), 1)
    # The bundled tiny model knows the motif only roughly (concept AUC ~0.9 with unsafe prompts alone; the
    # neutral prompts carry no signal for it): recall is high, precision is not. Guard the measured level.
    assert recall >= 0.8 and precision >= 0.25, (precision, recall, len(unsafe), len(flagged))
    assert len(flagged) < len(world.items) * 0.75
