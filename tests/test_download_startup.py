"""Start-up of a multi-process DirectRunner run: workers forked from the main process, not started afresh.

Behaviour only (timings are measured by bench/download_vs_img2dataset.py): the worker command, the zygote's
process contract (environment in, exit code out, killed with its client), when forking is refused, and a
``download,image`` run whose two worker processes are forked.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate import fork_workers
from clip_curate.fork_workers import BEAM_WORKER_MODULE, ForkServer, _replace_worker_command, fork_unsafe_reason


def _report(env):
    """Worker target: write what the forked worker sees, exit with the code asked for."""
    with open(env["REPORT"], "w") as f:
        json.dump({"pid": os.getpid(), "ppid": os.getppid(), "beam_loaded": "apache_beam" in sys.modules,
                   "worker_id": env.get("WORKER_ID")}, f)
    return int(env.get("EXIT_CODE", "0"))


def _sleep_forever(env):
    with open(env["REPORT"], "w") as f:
        json.dump({"pid": os.getpid()}, f)
    time.sleep(600)
    return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_worker_command_runs_a_forked_worker_with_the_clients_environment(tmp_path):
    import apache_beam  # noqa: F401 - loaded here, so a forked worker has it without importing it again

    with ForkServer(target=_report) as server:
        assert server.command.split()[1:3] == ["-I", "-S"]  # the client: standard library only
        for code in (0, 3):
            report = tmp_path / f"report{code}.json"
            env = dict(os.environ, REPORT=str(report), EXIT_CODE=str(code), WORKER_ID=f"worker_{code}")
            done = subprocess.run(server.command, shell=True, env=env, timeout=60)  # as Beam starts it
            assert done.returncode == code
            seen = json.loads(report.read_text())
            assert seen["worker_id"] == f"worker_{code}"       # the client's environment reached the worker
            assert seen["beam_loaded"] is True                  # forked: Beam was already imported
            assert seen["ppid"] == server._pid                  # a child of the zygote, not of the client
            assert seen["pid"] != done.returncode and not _alive(seen["pid"])
        zygote, folder = server._pid, server._dir
    assert not _alive(zygote) and not os.path.exists(folder)  # leaving the context ends the zygote, cleans up


def test_the_zygote_ends_and_cleans_up_when_the_main_process_is_killed(tmp_path):
    code = textwrap.dedent("""
        import os, sys, time
        from clip_curate.fork_workers import ForkServer
        server = ForkServer(target=lambda env: 0).start()
        print(server._pid, server._dir, flush=True)
        time.sleep(600)
    """)
    main = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    zygote, folder = main.stdout.readline().split()
    assert _alive(int(zygote)) and os.path.exists(folder)
    main.kill()
    main.wait(10)
    deadline = time.monotonic() + 30
    while _alive(int(zygote)) or os.path.exists(folder):
        assert time.monotonic() < deadline, "the zygote outlived the main process"
        time.sleep(0.05)


def test_a_killed_client_takes_its_worker_with_it(tmp_path):
    report = tmp_path / "report.json"
    with ForkServer(target=_sleep_forever) as server:
        client = subprocess.Popen(server.command, shell=True, env=dict(os.environ, REPORT=str(report)),
                                  start_new_session=True)
        deadline = time.monotonic() + 30
        while not report.exists() or not report.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        worker = json.loads(report.read_text())["pid"]
        assert _alive(worker)
        os.killpg(client.pid, signal.SIGKILL)
        client.wait(10)
        deadline = time.monotonic() + 30
        while _alive(worker):
            assert time.monotonic() < deadline, "the worker outlived its client"
            time.sleep(0.05)


def test_leaving_the_run_ends_leftover_workers(tmp_path):
    report = tmp_path / "report.json"
    server = ForkServer(target=_sleep_forever).__enter__()
    client = subprocess.Popen(server.command, shell=True, env=dict(os.environ, REPORT=str(report)))
    deadline = time.monotonic() + 30
    while not report.exists() or not report.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker = json.loads(report.read_text())["pid"]
    server.__exit__(None, None, None)     # e.g. the run failed while a worker still ran
    assert not _alive(worker)
    assert client.wait(30) != 0           # Beam sees a failed worker, not a hang


def test_only_beams_own_worker_command_is_replaced():
    from apache_beam.portability import python_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    proto = beam_runner_api_pb2.Pipeline()
    envs = proto.components.environments
    envs["beam"].urn = python_urns.SUBPROCESS_SDK
    envs["beam"].payload = f"{sys.executable} {BEAM_WORKER_MODULE}".encode()
    envs["custom"].urn = python_urns.SUBPROCESS_SDK
    envs["custom"].payload = b"my-worker --flag"
    envs["docker"].urn = "beam:env:docker:v1"
    assert _replace_worker_command(proto, "FORK") == 1
    assert envs["beam"].payload == b"FORK" and envs["custom"].payload == b"my-worker --flag"


def test_forking_refused_after_native_thread_pools_are_loaded(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr("clip_curate.fork_workers._thread_names", lambda: ["MainThread"])  # earlier tests' gRPC
    assert fork_unsafe_reason() is None
    monkeypatch.setitem(sys.modules, "torch", object())
    assert "torch" in fork_unsafe_reason()


def test_forking_refused_while_grpc_runs(monkeypatch):
    import grpc

    from clip_curate.fork_workers import FORK_UNSAFE_MODULES

    for name in FORK_UNSAFE_MODULES:  # earlier tests in this process imported torch: that reason comes first
        monkeypatch.delitem(sys.modules, name, raising=False)

    channel = grpc.insecure_channel("localhost:1")
    try:
        grpc.channel_ready_future(channel).result(timeout=0.2)
    except grpc.FutureTimeoutError:
        pass
    try:
        assert "gRPC" in (fork_unsafe_reason() or "")
    finally:
        channel.close()


def test_runner_choice():
    from apache_beam.options.pipeline_options import PipelineOptions

    from clip_curate.fork_workers import fork_server_for
    from clip_curate.run import _runner

    for flags in (["--direct_running_mode=multi_processing"],
                  ["--runner=DirectRunner", "--direct_running_mode=multi_processing"]):
        safe = fork_unsafe_reason() is None
        with fork_server_for(PipelineOptions(flags)) as server:
            # forked before the pipeline is built where that is safe, else tried again when it runs
            assert isinstance(server, ForkServer) and server.started == safe
            assert isinstance(_runner(PipelineOptions(flags), server), fork_workers.ForkingFnApiRunner)
    for flags in ([], ["--direct_running_mode=multi_threading"],
                  ["--runner=PortableRunner", "--direct_running_mode=multi_processing"]):
        with fork_server_for(PipelineOptions(flags)) as server:
            assert server is None                                           # Beam's own workers
    assert _runner(PipelineOptions([]), None) is None


@pytest.mark.slow
def test_download_image_run_with_forked_worker_processes(tmp_path, jpeg):
    from clip_curate.synthetic.webserver import Route, WebServer

    body = jpeg(7, shape=(48, 64))
    routes = {f"/{i}.jpg": Route(body, content_type="image/jpeg") for i in range(12)}
    with WebServer(routes) as srv:
        urls = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": [srv.url(f"/{i}.jpg") for i in range(12)] + [srv.url("/missing.jpg")],
                                 "caption": [f"image {i}" for i in range(13)]}), urls)
        done = subprocess.run(
            [sys.executable, "-m", "clip_curate.cli", "run", "--input", str(urls), "--output", str(tmp_path / "out"),
             "--stages", "download,image", "--allow-private-addresses", "--no-respect-robots-txt", "--retries", "0",
             "--image-size", "32", "--log-level", "INFO",
             "--direct_num_workers=2", "--direct_running_mode=multi_processing"],
            capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "worker processes forked from the main process" in done.stderr
    assert "sdk_worker_main" not in done.stderr.split("forked from the main process", 1)[1].split("\n", 1)[0]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["input_rows"] == 13 and stats["curated_rows"] == 12 and stats["rejected_rows"] == 1
    assert stats["rejected_by"] == {"download": {"http_404": 1}}
    curated = pq.read_table(tmp_path / "out" / "curated").to_pylist()
    assert len(curated) == 12 and all(min(r["width"], r["height"]) == 32 for r in curated)


# ---------------------------------------------------------------------------------------------
# What the main process (and so every forked worker) imports; Beam's per-call option views

def test_hide_ipython_only_where_it_is_not_loaded(monkeypatch):
    from clip_curate.cli import hide_ipython

    loaded = object()
    monkeypatch.setitem(sys.modules, "IPython", loaded)   # called from a notebook: left alone
    hide_ipython()
    assert sys.modules["IPython"] is loaded
    monkeypatch.delitem(sys.modules, "IPython")
    hide_ipython()
    assert sys.modules["IPython"] is None
    with pytest.raises(ImportError):
        import IPython  # noqa: F401
    monkeypatch.delitem(sys.modules, "IPython")


def test_download_image_run_loads_neither_ipython_nor_torch(tmp_path):
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(3)], "caption": ["a", "b", "c"]}),
                   urls)
    code = textwrap.dedent(f"""
        import json, sys
        from clip_curate.cli import main
        code = main(["run", "--input", {str(urls)!r}, "--output", {str(tmp_path / "out")!r},
                     "--stages", "download,image", "--allow-private-addresses", "--retries", "0",
                     "--no-respect-robots-txt", "--log-level", "WARNING"])
        heavy = [m for m in ("IPython", "torch", "open_clip", "onnxruntime") if sys.modules.get(m) is not None]
        print("RESULT " + json.dumps({{"code": code, "loaded": sorted(set(heavy))}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert res == {"code": 0, "loaded": []}   # the in-process worker ran the stages without them
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rejected_rows"] == 3 and list(stats["rejected_by"]) == ["download"]


def test_option_views_are_kept_and_live():
    import pickle

    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, TypeOptions

    from clip_curate.run import _ViewCachingOptions

    options = _ViewCachingOptions(["--direct_num_workers=2"])
    view = options.view_as(TypeOptions)
    assert options.view_as(TypeOptions) is view                      # built once
    view.allow_unsafe_triggers = True
    assert PipelineOptions.view_as(options, TypeOptions).allow_unsafe_triggers  # a fresh view sees the change
    assert options.view_as(DirectOptions).direct_num_workers == 2
    assert options.get_all_options()["allow_unsafe_triggers"] is True
    restored = pickle.loads(pickle.dumps(options))
    assert "_cached_views" not in restored.__dict__ and restored.view_as(TypeOptions).allow_unsafe_triggers


def test_multi_threading_with_keypoint_near_dedup_is_refused_before_any_work(tmp_path):
    """Beam's FnApiRunner in multi_threading mode with several workers handed the dedup join fewer rows than
    went in (keypoint near dedup on overlapping crops): refused up front with the fix, output untouched."""
    from clip_curate.fields import ConfigError
    from clip_curate.run import run

    src = tmp_path / "urls.csv"
    src.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    out = tmp_path / "out"
    base = ["--input", str(src), "--output", str(out), "--stages", "download,image,dedup",
            "--direct_num_workers=2", "--direct_running_mode=multi_threading"]
    with pytest.raises(ConfigError, match="multi_processing"):
        run(base)
    assert not out.exists()
