"""What Dataflow/portable workers install (`--setup_file ./setup.py`, or the wheel) carries everything."""
import glob
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = [
    "clip_curate/schemas/curated_row.json", "clip_curate/schemas/rejected_row.json",
    "clip_curate/schemas/stats.json", "clip_curate/schemas/url_list.json", "clip_curate/schemas/audit.json",
    "clip_curate/data/synthetic-tiny/open_clip_config.json",
    "clip_curate/data/synthetic-tiny/open_clip_model.safetensors",
    "clip_curate/data/unsafe_words.txt", "clip_curate/data/attributes.yaml", "clip_curate/data/report.html.j2",
    "clip_curate/pipeline.py", "clip_curate/run.py", "clip_curate/stages/dedup/core.py", "pipelines/curate.py",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    ROOT], check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    return out


def test_wheel_contains_schemas_model_and_package_data(built):
    (wheel,) = glob.glob(str(built / "*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in NEEDED if n not in names]
    assert not missing, missing
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "clip-curate = clip_curate.cli:main" in entry


def test_sdist_contains_schemas_model_and_package_data(built):
    (sdist,) = glob.glob(str(built / "*.tar.gz"))
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    missing = [n for n in NEEDED if n not in names]
    assert not missing, missing
    assert "setup.py" in names and "README.md" in names
