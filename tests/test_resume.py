"""``--resume`` after a real crash: SIGKILL the whole process tree of a run, resume, and check that every
input row ends up exactly once in curated ∪ rejected, with stats.json totals equal to the files.

Two crashes: (1) midway through the downloads (nothing written yet: the resumed run redoes everything);
(2) while the sinks write (complete temporary shards exist: the resumed run adopts them and only
processes the rest). The run uses 2 DirectRunner worker processes, which must die with the parent.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from clip_curate import records
from clip_curate.resume import output_counts, temp_files
from clip_curate.stats import merge_counts
from clip_curate.synthetic.webserver import fault_routes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_WORLD = 220
FAULTS = ["/404", "/500", "/reset", "/truncated.jpg", "/random.jpg", "/html-as-image", "/noai.jpg",
          "/500-then-ok.jpg", "/redirect-ok", "/loop-a"]
RUN_FLAGS = ["--stages", "caption,download,image", "--language-candidates", "en,de", "--timeout", "3",
             "--deadline", "6", "--retries", "3", "--retry-backoff", "0.05", "--per-host-connections", "4",
             "--image-size", "64", "--progress-seconds", "2", "--direct_num_workers", "2",
             "--direct_running_mode", "multi_processing"]


@pytest.fixture(scope="module")
def web(tmp_path_factory, served_world):
    tmp = tmp_path_factory.mktemp("resume")
    with served_world(tmp, N_WORLD, 23, routes=fault_routes(), delay_s=0.25, columns=["url", "caption"],
                      faults=FAULTS * 2, fault_caption="fault {i}", broken_404=0.03, broken_not_image=0.02) as served:
        rows = served.table.to_pylist()
        yield tmp, served.urls, {records.make_uid(r["url"], r["caption"]) for r in rows}, served.server


@pytest.fixture(scope="module")
def start(local_net_flags):
    """``start(urls, out, *extra) -> Popen``: ``clip-curate run`` in its own session, logging to ``<out>.log``."""
    def run(urls, out, *extra) -> subprocess.Popen:
        log = open(str(out) + ".log", "a")
        return subprocess.Popen([sys.executable, "-m", "clip_curate.cli", "run", "--input", str(urls), "--output",
                                 str(out), *RUN_FLAGS, *local_net_flags(host_failure_limit=0), *extra], cwd=ROOT,
                                stdout=log, stderr=log, start_new_session=True)
    return run


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the run and its worker processes)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":  # field 6 (session) after pid, comm, state...
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group (parent and worker processes), like an OOM kill or a lost VM."""
    assert len(session_pids(proc.pid)) >= 3, "expected the run and its 2 worker processes"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not session_pids(proc.pid), "worker processes survived the kill"


def finish(proc: subprocess.Popen, out) -> None:
    rc = proc.wait(timeout=400)
    assert rc == 0, open(str(out) + ".log").read()[-4000:]


def check_complete(out, input_uids):
    cur = pq.read_table(out / "curated", columns=["uid"]).column("uid").to_pylist()
    rej = pq.read_table(out / "rejected", columns=["uid", "stage", "reason"]).to_pylist()
    both = cur + [r["uid"] for r in rej]
    assert len(both) == len(set(both)), "a uid is written twice"
    assert set(both) == input_uids, (len(set(both) - input_uids), len(input_uids - set(both)))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == len(input_uids) == stats["curated_rows"] + stats["rejected_rows"]
    assert stats["curated_rows"] == len(cur) and stats["rejected_rows"] == len(rej)
    by: dict = {}
    for r in rej:
        by.setdefault(r["stage"], {}).setdefault(r["reason"], 0)
        by[r["stage"]][r["reason"]] += 1
    assert stats["rejected_by"] == by
    assert not glob.glob(str(out / "*" / "beam-temp-*")), "temporary shards left behind"
    return cur, rej, stats


@pytest.mark.slow
def test_sigkill_midway_then_resume(web, start):
    tmp, urls, input_uids, srv = web
    out = tmp / "midway"
    srv.reset_stats()
    proc = start(urls, out)
    deadline = time.monotonic() + 240
    while srv.stats().requests_total < 0.3 * len(input_uids):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.05)
    kill_tree(proc)
    assert not glob.glob(str(out / "curated" / "*.parquet"))
    finish(start(urls, out, "--resume"), out)
    cur, rej, stats = check_complete(out, input_uids)
    assert stats["resumed"]["previous_rows"] == 0 and stats["resumed"]["new_rows"] == len(input_uids)
    assert len(cur) > 0.6 * N_WORLD
    assert {("download", "http_404"), ("download", "connection_error"), ("image", "decode_error")} <= \
        {(r["stage"], r["reason"]) for r in rej}


def _complete_temp_shard(out) -> bool:
    for sub in ("curated", "rejected"):
        for path in temp_files(str(out), sub)[1]:
            try:
                pq.read_metadata(path)
                return True
            except Exception:
                pass
    return False


@pytest.mark.slow
def test_sigkill_while_writing_adopts_finished_shards(web, start):
    """Kill when a sink has finished a temporary shard but not yet renamed it; the resumed run adopts it."""
    tmp, urls, input_uids, _ = web
    out = tmp / "writing"
    proc = start(urls, out)
    caught = False
    while proc.poll() is None:
        if glob.glob(str(out / "*" / "beam-temp-*" / "*")):
            os.killpg(proc.pid, signal.SIGSTOP)  # freeze the tree while looking (the window is ~0.2 s)
            if _complete_temp_shard(out):
                caught = True
                kill_tree(proc)
                break
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.003)
    assert caught, "the run finished before a complete temporary shard could be caught"
    left = {sub: temp_files(str(out), sub)[1] for sub in ("curated", "rejected")}
    assert any(left.values())
    finish(start(urls, out, "--resume"), out)
    cur, rej, stats = check_complete(out, input_uids)
    adopted = stats["resumed"]["adopted_from_killed_run"]
    assert adopted["complete_temp_files"] >= 1
    assert sum(adopted["adopted_rows"].values()) == stats["resumed"]["previous_rows"] > 0
    assert stats["resumed"]["new_rows"] == len(input_uids) - stats["resumed"]["previous_rows"]
    names = [os.path.basename(p) for p in glob.glob(str(out / "*" / "*.parquet"))]
    assert any(n.startswith("part-a") for n in names) and any(n.startswith("part-r") for n in names)
    # a second resume finds everything done: no new rows, same totals
    finish(start(urls, out, "--resume"), out)
    _, _, again = check_complete(out, input_uids)
    assert again["resumed"]["new_rows"] == 0 and again["curated_rows"] == stats["curated_rows"]


def test_adoption_skips_incomplete_and_duplicate_temp_files(tmp_path):
    """Pure check of the adoption rules on hand-made leftovers (no pipeline)."""
    import pyarrow as pa

    from clip_curate.resume import adopt_incomplete_outputs

    def write(path, uids, **cols):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(pa.table({"uid": uids, **cols}), path)

    out = tmp_path / "o"
    write(str(out / "curated" / "part-00000-of-00001.parquet"), ["a"])
    t = out / "curated" / "beam-temp-part-x"
    write(str(t / "1.part.parquet"), ["a", "b", "c"])           # a: already final
    write(str(t / "2.part.parquet"), ["c", "d"])                # c: retried bundle
    with open(t / "3.part.parquet", "wb") as f:                 # killed mid-file
        f.write(open(t / "2.part.parquet", "rb").read()[:-12])
    r = out / "rejected" / "beam-temp-part-y"
    write(str(r / "1.part.parquet"), ["d", "e"], stage=["download"] * 2, reason=["timeout"] * 2)
    rep = adopt_incomplete_outputs(str(out), prefix="part-a1")
    assert rep.adopted_rows == {"curated": 3, "rejected": 1}     # b, c, d curated; e rejected (d: curated wins)
    assert rep.incomplete_files == 1 and rep.complete_files == 3 and rep.duplicate_rows == 3
    assert sorted(pq.read_table(out / "curated").column("uid").to_pylist()) == ["a", "b", "c", "d"]
    assert pq.read_table(out / "rejected").column("uid").to_pylist() == ["e"]
    assert not glob.glob(str(out / "*" / "beam-temp-*"))
    counts = output_counts(str(out))
    assert counts == {"curated_rows": 4, "rejected_rows": 1, "rejected_by": {"download": {"timeout": 1}}}
    merged = merge_counts({"input_rows": 2, "curated_rows": 1, "rejected_rows": 1,
                           "rejected_by": {"image": {"decode_error": 1}}}, counts)
    assert merged["input_rows"] == 7 and merged["rejected_by"] == {"download": {"timeout": 1},
                                                                   "image": {"decode_error": 1}}
    assert adopt_incomplete_outputs(str(out)).adopted_rows == {"curated": 0, "rejected": 0}  # idempotent
