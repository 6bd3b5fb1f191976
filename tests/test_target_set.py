"""Image-based filter (--target-set): keep rows in the pool clusters nearest to a target set; composes with
the CLIP-score filter (intersection)."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate.fields import ConfigError
from clip_curate.stages.clip_score import ClipFilterConfig, ClipScoreFilter, fit_target_model, target_verdict


def _world(seed=0, per=60, dim=16):
    """Three well separated concepts: unit vectors around three orthogonal directions."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:3]
    rows = []
    for c, name in enumerate("abc"):
        for i in range(per):
            v = centres[c] + 0.15 * rng.standard_normal(dim).astype(np.float32)
            rows.append({"uid": f"{name}{i:03d}", "image_embedding": (v / np.linalg.norm(v)).tolist(),
                         "clip_score": 0.1 if i % 10 == 0 else 0.5})
    return rows, centres


def test_fit_keeps_the_clusters_nearest_to_the_targets():
    rows, centres = _world()
    pool = np.array([r["image_embedding"] for r in rows], dtype=np.float32)
    one = fit_target_model(pool, centres[:1] + 0.01, k=6)      # one target item: its nearest cluster only
    kept = [r["uid"][0] for r in rows if target_verdict(r["image_embedding"], one)[0] is None]
    assert set(kept) == {"a"} and len(one.allowed) == 1 and 0 < len(kept) < 60
    spread = centres[0] + 0.15 * np.random.default_rng(2).standard_normal((40, centres.shape[1])).astype(np.float32)
    model = fit_target_model(pool, spread, k=6)                 # a target set like the concept: all of it
    kept = [r["uid"][0] for r in rows if target_verdict(r["image_embedding"], model)[0] is None]
    assert kept == ["a"] * 60
    with pytest.raises(ValueError, match="dimensions"):
        fit_target_model(pool, np.ones((2, 8), np.float32), k=3)


def test_target_set_with_clip_score_is_an_intersection(run_transform, tmp_path):
    rows, centres = _world()
    rng = np.random.default_rng(1)
    target = centres[0] + 0.1 * rng.standard_normal((20, centres.shape[1])).astype(np.float32)
    pq.write_table(pa.table({"image_embedding": [list(map(float, t)) for t in target]}), tmp_path / "target.parquet")
    rows.append({"uid": "noemb", "clip_score": 0.5})       # no embedding: not judged by the target filter
    cfg = ClipFilterConfig(min_clip_score=0.2, target_set=str(tmp_path / "target.parquet"), target_clusters=3)
    ran = run_transform(rows, ClipScoreFilter(cfg))
    kept = {r["uid"] for r in ran.kept}
    reasons = {r["uid"]: r["reason"] for r in ran.rejected}
    assert len(kept) + len(reasons) == len(rows)
    assert kept == {f"a{i:03d}" for i in range(60) if i % 10} | {"noemb"}
    assert all(reasons[f"a{i:03d}"] == "low_clip_score" for i in range(0, 60, 10))
    assert {reasons[f"{c}{i:03d}"] for c in "bc" for i in range(60) if i % 10} == {"off_target"}
    assert all(r["stage"] == "clip" for r in ran.rejected)


def test_bad_target_flags_are_one_line_errors():
    with pytest.raises(ConfigError, match="--target-clusters"):
        ClipFilterConfig(target_set="x", target_clusters=1)
    assert ClipFilterConfig(target_set="t.parquet").active
