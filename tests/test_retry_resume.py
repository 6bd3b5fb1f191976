"""--retry-from re-runs only transient failures; --resume skips rows already in the output."""
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate.synthetic.webserver import Route, WebServer, tiny_jpeg

pytestmark = pytest.mark.slow


@pytest.fixture
def cli(local_net_flags):
    """``cli(*args)``: ``clip-curate run *args`` (download and image stages, no retries) in a child process."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "clip_curate.cli", "run", *map(str, args), "--stages",
                               "download,image", *local_net_flags(host_failure_limit=0), "--retries", "0",
                               "--progress-seconds", "0"], capture_output=True, text=True, timeout=300)
    return run


def test_retry_from_recovers_rows_whose_server_came_back_and_resume_skips_done_rows(tmp_path, cli):
    img = tiny_jpeg()
    state = {"up": False}

    def routes(req):
        if req.path.startswith("/gone"):
            return Route(b"no", status=404)
        if req.path.startswith("/flaky") and not state["up"]:
            return Route(b"down", status=503)
        return Route(img, content_type="image/jpeg")

    with WebServer(routes) as srv:
        rows = ([{"url": srv.url(f"/ok/{i}.jpg"), "caption": f"ok {i}"} for i in range(10)]
                + [{"url": srv.url(f"/flaky/{i}.jpg"), "caption": f"flaky {i}"} for i in range(6)]
                + [{"url": srv.url(f"/gone/{i}"), "caption": f"gone {i}"} for i in range(4)])
        urls = tmp_path / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(rows), urls)
        first = cli("--input", urls, "--output", tmp_path / "out")
        assert first.returncode == 0, first.stderr[-2000:]
        stats = json.loads((tmp_path / "out" / "stats.json").read_text())
        assert stats["rejected_by"]["download"] == {"http_5xx": 6, "http_404": 4}

        state["up"] = True
        retry = cli("--retry-from", tmp_path / "out", "--output", tmp_path / "retry")
        assert retry.returncode == 0, retry.stderr[-2000:]
        rstats = json.loads((tmp_path / "retry" / "stats.json").read_text())
        assert rstats["input_rows"] == 6 and rstats["curated_rows"] == 6  # only the transient ones, all recovered
        assert rstats["retried_rows"] == 6 and "retried rows recovered" in retry.stdout
        assert sorted(pq.read_table(tmp_path / "retry" / "curated").column("caption").to_pylist()) == \
            sorted(f"flaky {i}" for i in range(6))

        resumed = cli("--input", urls, "--output", tmp_path / "out", "--resume")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    total = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert total["input_rows"] == 20 == total["curated_rows"] + total["rejected_rows"]
    assert total["resumed"]["previous_rows"] == 20 and total["resumed"]["new_rows"] == 0
    assert total["resumed"]["adopted_from_killed_run"]["complete_temp_files"] == 0  # nothing was killed
    uids = (pq.read_table(tmp_path / "out" / "curated").column("uid").to_pylist()
            + pq.read_table(tmp_path / "out" / "rejected").column("uid").to_pylist())
    assert len(uids) == len(set(uids)) == 20
