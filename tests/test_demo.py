"""`clip-curate demo` runs the whole pipeline on the synthetic web and scores it against the truth."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    res = subprocess.run([sys.executable, "-m", "clip_curate.cli", "demo", "--output", str(tmp_path), "--rows", "120",
                          "--workers", "1"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "CLIP filter" in out and "precision" in out and "audit report:" in out
    stats = json.loads((tmp_path / "stats.json").read_text())  # outputs directly in --output
    assert stats["input_rows"] == 120 == stats["curated_rows"] + stats["rejected_rows"]
    by = stats["rejected_by"]
    assert by["download"]["http_404"] >= 1 and by["clip"]["low_clip_score"] >= 5
    assert sum(by["dedup"].values()) >= 3
    assert (tmp_path / "audit" / "report.html").stat().st_size > 10_000
    assert (tmp_path / "_world" / "urls.parquet").exists()     # the synthetic web's files apart
    assert f"curated:  {tmp_path / 'curated'}" in out and f"audit report: {tmp_path / 'audit' / 'report.html'}" in out
    line = next(l for l in out.splitlines() if l.startswith("CLIP filter"))
    precision = float(line.split()[3])
    assert precision >= 0.9, line
