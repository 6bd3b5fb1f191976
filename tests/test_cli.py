"""CLI: exit codes, one-line errors, YAML config, outputs of a read->write run."""
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate import schemas as schema
from clip_curate.config import parse_run_args
from clip_curate.fields import ConfigError


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "clip_curate.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.fixture
def url_list(tmp_path):
    rows = [{"url": f"http://example.test/{i}.jpg", "caption": f"a photo {i}", "source": "s"} for i in range(30)]
    rows += [{"url": "", "caption": "no url", "source": "s"}, {"url": None, "caption": "null url", "source": "s"}]
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.slow
def test_read_write_run_accounts_every_row(tmp_path, url_list):
    out = tmp_path / "out"
    res = cli("run", "--input", url_list, "--output", out, "--stages", "none", "--shard-rows", "10")
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == 32
    assert stats["curated_rows"] == 30 and stats["rejected_rows"] == 2
    assert stats["rejected_by"] == {"read": {"missing_url": 2}}
    assert stats["timings"]["wall_seconds"] > 0
    curated = pq.read_table(out / "curated")
    rejected = pq.read_table(out / "rejected")
    shards = sorted((out / "curated").glob("part-*.parquet"))
    assert len(shards) >= 3 and all(pq.read_metadata(p).num_rows <= 10 for p in shards)  # --shard-rows 10
    assert curated.num_rows == 30 and rejected.num_rows == 2
    # no model (--stages none): no embedding columns
    assert curated.schema.names == schema.curated_schema([pa.field("source", pa.string())], embeddings=False).names
    assert set(rejected.column("reason").to_pylist()) == {"missing_url"}
    assert set(rejected.column("stage").to_pylist()) == {"read"}
    assert "curated rows" in res.stdout and "read / missing_url" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--input", "nope.parquet", "--output", "o"], "input not found"),
    (["--input", "{urls}", "--output", "o", "--url-col", "link"], "column 'link' not found"),
    (["--input", "{urls}"], "no output"),
    (["--input", "{urls}", "--output", "o", "--frobnicate"], "unknown flag --frobnicate"),
    (["--input", "{urls}", "--output", "o", "--language-low-accuracy"], "replaced by --language-accuracy low"),
    (["--input", "{urls}", "--output", "o", "--shard-rows", "many"], "invalid int value"),
    (["--input", "{urls}", "--output", "o", "--stages", "download,teleport"], "unknown stage"),
    (["--input", "{urls}", "--output", "o", "--config", "missing.yaml"], "file not found"),
])
def test_bad_input_is_one_line_error_exit_2(tmp_path, url_list, args, message):
    res = cli("run", *[a.format(urls=url_list) for a in args], cwd=tmp_path)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_yaml_config_sets_flags_and_rejects_unknown_keys(tmp_path, url_list):
    good = tmp_path / "good.yaml"
    good.write_text(f"input: {url_list}\noutput: {tmp_path / 'o'}\nshard-rows: 7\nstages: [none]\n"
                    "beam:\n  direct_num_workers: 1\n")
    cfg, beam_args = parse_run_args(["--config", str(good), "--shard-rows", "9"])
    assert cfg.output.shard_rows == 9          # the command line wins over YAML
    assert cfg.run.stages == ("none",)
    assert beam_args == ["--direct_num_workers=1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: x\noutput: y\nshard_rowz: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'shard_rowz'; did you mean 'shard-rows'"):
        parse_run_args(["--config", str(bad)])
    typed = tmp_path / "typed.yaml"
    typed.write_text("input: x\noutput: y\nshard_rows: lots\n")
    with pytest.raises(ConfigError, match="key 'shard_rows': 'lots' is not of type 'integer'"):
        parse_run_args(["--config", str(typed)])


@pytest.mark.slow
def test_help_documents_every_flag():
    res = cli("run", "--help")
    assert res.returncode == 0
    from clip_curate.config import all_config_classes
    from clip_curate.fields import flag_name
    import dataclasses
    for _, cls in all_config_classes():
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli") is not False:
                assert flag_name(f) in res.stdout, flag_name(f)
    top = cli("--help")
    assert top.returncode == 0 and "demo" in top.stdout and "run" in top.stdout
    assert cli("frobnicate").returncode == 2


def test_declared_config_schema_is_in_sync_with_the_configs():
    import json
    import os

    from clip_curate.docgen import config_json_schema

    path = os.path.join(os.path.dirname(__file__), "..", "clip_curate", "schemas", "config.json")
    with open(path) as f:
        declared = json.load(f)
    assert declared == config_json_schema(), "regenerate: python -m clip_curate.docgen config > clip_curate/schemas/config.json"


def test_beam_worker_echo_keeps_our_lines_and_warnings_only():
    import logging

    from clip_curate.cli import QuietBeamWorkerEcho

    def rec(msg, level=logging.INFO):
        return logging.LogRecord("apache_beam.runners.portability.local_job_service", level, "x", 1, msg, None, None)

    f = QuietBeamWorkerEcho()
    ours = 'Worker: severity: INFO message: "download: DNS lookups 0" log_location: "/work/clip_curate/download.py:840"'
    chatter = 'Worker: severity: INFO message: "No more requests" log_location: "/x/apache_beam/runners/worker/sdk_worker.py:287"'
    warn = 'Worker: severity: WARN message: "slow bundle" log_location: "/x/apache_beam/runners/worker/sdk_worker.py:1"'
    theirs = ('Worker: severity: INFO message: "Loaded model config from: /work/clip_curate/data/synthetic-tiny" '
              'log_location: "/x/site-packages/open_clip/factory.py:350"')  # our path in the text, their line
    assert f.filter(rec(ours)) and f.filter(rec(warn)) and not f.filter(rec(chatter)) and not f.filter(rec(theirs))
    assert f.filter(rec("job failed", logging.ERROR))
    benign = 'Worker: severity: WARN message: "No semi_persistent_directory found: User registered objects"'
    assert not f.filter(rec(benign, logging.WARNING))
