"""The whole pipeline through Beam's portable runner path (the Flink/Spark/Dataflow path), vs DirectRunner.

``PortableRunner`` submits the pipeline proto to a job service (here Beam's Python
``local_job_service_main``); SDK workers then unpickle every DoFn, model handler and side input from
the proto and run them — LOOPBACK: in this process's worker service; EXTERNAL: in a separate
``worker_pool_main`` process, started with no state from the submitting process (as on Flink/Spark).
Pickling or worker-setup mistakes that a cluster would hit fail here. The outcome must equal the
DirectRunner run of the same input: same curated uids, same rejected (uid, stage, reason).
"""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from clip_curate.synthetic.webserver import fault_routes

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = ["/404", "/500", "/reset", "/truncated.jpg", "/random.jpg", "/html-as-image", "/loop-a", "/noai.jpg",
          "/500-then-ok.jpg", "/redirect-ok"]
STAGE_FLAGS = ["--stages", "all", "--clip-model", "synthetic-tiny", "--min-clip-score", "0.6",
               "--dedup", "exact,near", "--nsfw-policy", "drop", "--no-nsfw-concept",
               "--language-candidates", "en,de", "--timeout", "2", "--deadline", "4", "--retries", "3",
               "--retry-backoff", "0.05", "--image-size", "128", "--batch-size", "16", "--progress-seconds", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


@contextlib.contextmanager
def service(args: list[str], port: int):
    """A Beam service subprocess in its own process group, killed (with its children) on exit."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_listening(port, proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        proc.stdout.close()


@pytest.fixture(scope="module")
def curate(local_net_flags):
    """``curate(urls, out, runner_args)``: ``clip-curate run`` with every stage, in a child process."""
    def run(urls, out, runner_args: list[str]) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, "-m", "clip_curate.cli", "run", "--input", str(urls), "--output",
                              str(out), *STAGE_FLAGS, *local_net_flags(host_failure_limit=0), *runner_args],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-4000:]
        return res
    return run


def outcome(out):
    cur = pq.read_table(out / "curated", columns=["uid"]).column("uid").to_pylist()
    rej = pq.read_table(out / "rejected", columns=["uid", "stage", "reason"]).to_pylist()
    stats = json.loads((out / "stats.json").read_text())
    return sorted(cur), sorted((r["uid"], r["stage"], r["reason"]) for r in rej), stats


@pytest.fixture(scope="module")
def web(tmp_path_factory, served_world, curate):
    tmp = tmp_path_factory.mktemp("portable")
    with served_world(tmp, 36, 11, routes=fault_routes(big_bytes=3_000_000), include_uid=False,
                      columns=["url", "caption"], faults=FAULTS, fault_caption="a fault case {i}",
                      broken_404=0.03) as served:
        direct = tmp / "direct"
        curate(served.urls, direct, [])
        yield tmp, served.urls, served.table.num_rows, outcome(direct)


def check_same(got, want, n_rows):
    cur, rej, stats = got
    assert stats["input_rows"] == n_rows == stats["curated_rows"] + stats["rejected_rows"]
    assert len(cur) + len(rej) == n_rows and len({u for u in cur} | {r[0] for r in rej}) == n_rows
    assert cur == want[0]
    assert rej == want[1]
    assert stats["rejected_by"] == want[2]["rejected_by"]


def test_direct_run_exercises_every_stage(web):
    _, _, n_rows, (cur, rej, stats) = web
    stages = {stage for _, stage, _ in rej}
    assert {"download", "image"} <= stages, stages  # faults are rejected where they should be
    assert len(cur) >= 10 and stats["input_rows"] == n_rows
    assert stats["stages"] == ["caption", "download", "image", "embed", "clip", "dedup", "safety", "balance"]


def test_portable_loopback_matches_direct(web, curate):
    tmp, urls, n_rows, want = web
    port = free_port()
    with service(["apache_beam.runners.portability.local_job_service_main", "--port", str(port)], port):
        curate(urls, tmp / "loopback", ["--runner", "PortableRunner", f"--job_endpoint=localhost:{port}",
                                        "--environment_type", "LOOPBACK"])
    check_same(outcome(tmp / "loopback"), want, n_rows)


def test_portable_external_worker_pool_matches_direct(web, curate):
    """SDK workers in a separate worker-pool process: DoFns really cross a process boundary as pickles."""
    tmp, urls, n_rows, want = web
    job_port, pool_port = free_port(), free_port()
    with service(["apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool_port)], pool_port), \
            service(["apache_beam.runners.portability.local_job_service_main", "--port", str(job_port)], job_port):
        curate(urls, tmp / "external", ["--runner", "PortableRunner", f"--job_endpoint=localhost:{job_port}",
                                        "--environment_type", "EXTERNAL",
                                        f"--environment_config=localhost:{pool_port}"])
    check_same(outcome(tmp / "external"), want, n_rows)
