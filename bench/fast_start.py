"""Start-up of ``clip-curate demo``: time to the first image downloaded, wall time, peak RSS per process.

    python bench/fast_start.py                       # the demo's defaults: 600 rows, one in-process worker
    python bench/fast_start.py --workers 2           # two DirectRunner worker processes
    python bench/fast_start.py --repeat 3 --rows 600 --json /tmp/fast_start.json
    python bench/fast_start.py -- --workers 1        # extra `clip-curate demo` flags after --

Each repeat runs ``clip-curate demo`` in a fresh child process (this script with ``--child``: the same CLI
entry point, ``clip_curate.cli.main(["demo", ...])``, with one observer added: the demo's synthetic web
server hands over its request log as the demo stops it).

Signals (all wall-clock ``time.time()``, one machine, one clock):

* **start**: just before the child process is spawned (interpreter start and imports count).
* **first image downloaded**: the arrival time of the first request for an image path in the demo web
  server's own request log (``WebServer.request_log``; ``/robots.txt`` excluded). It is server-side, so it
  does not depend on log lines, progress intervals or output files; the body follows within milliseconds on
  loopback.
* **world ready**: when the demo prints its ``synthetic web:`` line (world generated and served).
* **wall**: until the child exits (the whole demo: run, summary, audit report).
* **peak RSS**: ``VmHWM`` (the kernel's high-water mark) of every process of the child's tree, read from
  ``/proc`` every 0.1 s; with the highest **PSS** (shared pages split among the processes mapping them) and
  **USS** (private pages only) seen in ``/proc/PID/smaps_rollup`` at those samples; Beam's DirectRunner workers are the processes running ``sdk_worker_main`` (a process
  a worker forks has the same command line: it is counted apart, as a worker child, in the JSON).

Prints a markdown table (one row per repeat, then the median) and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# child: the demo, with its web server observed

def child(result_path: str, demo_argv: list[str]) -> int:
    sys.path.insert(0, ROOT)
    from clip_curate.synthetic.webserver import WebServer

    logs: list = []
    close = WebServer.__exit__

    def observed_close(self, *exc):  # the request log, read just before the demo stops its server
        logs.append(self.request_log())
        return close(self, *exc)

    WebServer.__exit__ = observed_close
    from clip_curate.cli import main as cli_main

    try:
        rc = cli_main(["demo"] + demo_argv)
    except SystemExit as e:  # the CLI exits with its code
        rc = e.code if isinstance(e.code, int) else 1
    log = logs[0] if logs else []
    images = [r.at for r in log if not r.path.startswith("/robots.txt")]
    with open(result_path, "w") as f:
        json.dump({"rc": rc, "requests": len(log), "first_request_at": min((r.at for r in log), default=None),
                   "first_image_at": min(images, default=None), "end_at": time.time()}, f)
    return rc or 0


# ---------------------------------------------------------------------------------------------
# parent: spawn, sample /proc, report

def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rollup_kb(pid: int) -> tuple[int, int]:
    """(PSS, USS) now, in kB, from ``/proc/PID/smaps_rollup``: shared pages split among the processes that
    map them (PSS), or left out (USS: private clean + private dirty)."""
    pss = uss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                    uss += int(line.split()[1])
    except OSError:
        pass
    return pss, uss


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def role(pid: int, root: int, cmd: str, parent_cmd: str = "") -> str:
    """launcher, worker (a DirectRunner worker process), worker-child (a process a worker forked: same command
    line), other."""
    if pid == root:
        return "launcher"
    if "sdk_worker_main" in cmd and not cmd.startswith("/bin/sh"):
        return "worker-child" if "sdk_worker_main" in parent_cmd and not parent_cmd.startswith("/bin/sh") else "worker"
    return "other"


def measure(rows: int, workers: int, extra: list[str], keep: str | None = None, log: str | None = None) -> dict:
    """One demo run in a child process: timings (s from spawn) and peak RSS (bytes) per process."""
    out = keep or tempfile.mkdtemp(prefix="fast-start-")
    result_path = os.path.join(tempfile.mkdtemp(prefix="fast-start-result-"), "result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", result_path, "--",
           "--output", os.path.join(out, "demo"), "--overwrite", "--rows", str(rows), "--workers", str(workers)] + extra
    peaks: dict[int, tuple[str, int]] = {}
    shared: dict[int, tuple[int, int]] = {}  # pid -> (peak PSS, peak USS), bytes
    parents: dict[int, int] = {}
    done = threading.Event()
    lines: list[tuple[float, str]] = []
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def sample():
        while not done.is_set():
            for pid in _tree(proc.pid):
                hwm = _status_kb(pid, "VmHWM") * 1024
                if hwm:
                    cmd_ = _cmdline(pid) or peaks.get(pid, ("", 0))[0]  # re-read: a fork becomes its exec
                    peaks[pid] = (cmd_, max(hwm, peaks.get(pid, ("", 0))[1]))
                    parents[pid] = _ppid(pid) or parents.get(pid, 0)
                    pss, uss = _rollup_kb(pid)
                    old = shared.get(pid, (0, 0))
                    shared[pid] = (max(old[0], pss * 1024), max(old[1], uss * 1024))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        lines.append((time.time(), line.rstrip("\n")))
    proc.wait()
    done.set()
    sampler.join()
    wall = time.time() - t0
    if log:
        with open(log, "a") as f:
            f.writelines(f"+{t - t0:6.1f}s {text}\n" for t, text in lines)
    if proc.returncode:
        tail = "\n".join(text for _, text in lines[-40:])
        raise SystemExit(f"demo failed (exit {proc.returncode}):\n{tail}")
    with open(result_path) as f:
        res = json.load(f)
    world = next((t for t, text in lines if text.startswith("synthetic web:")), None)
    roles = {pid: role(pid, proc.pid, c, peaks.get(parents.get(pid, 0), ("", 0))[0]) for pid, (c, _) in peaks.items()}
    by_role: dict[str, list[int]] = {}
    pss_role: dict[str, list[tuple[int, int]]] = {}
    for pid, (cmdline, peak) in peaks.items():
        by_role.setdefault(roles[pid], []).append(peak)
        pss_role.setdefault(roles[pid], []).append((peak, *shared.get(pid, (0, 0))))
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "world_ready_s": world - t0 if world else None,
            "first_request_s": res["first_request_at"] - t0 if res["first_request_at"] else None,
            "first_image_s": res["first_image_at"] - t0 if res["first_image_at"] else None,
            "requests": res["requests"],
            "launcher_peak_rss": max(by_role.get("launcher", [0])),
            "worker_peak_rss": sorted(by_role.get("worker", []), reverse=True),
            # per worker, in the order of worker_peak_rss: peak PSS and peak USS (sampled, so at most the
            # peak RSS's moment)
            "worker_peak_pss": [p for _, p, _ in sorted(pss_role.get("worker", []), reverse=True)],
            "worker_peak_uss": [u for _, _, u in sorted(pss_role.get("worker", []), reverse=True)],
            "launcher_peak_pss_uss": max(pss_role.get("launcher", [(0, 0, 0)]))[1:],
            "worker_child_peak_rss": sorted(by_role.get("worker-child", []), reverse=True),
            "other_peak_rss": sorted(by_role.get("other", []), reverse=True),
            "processes": [{"pid": pid, "ppid": parents.get(pid), "role": roles[pid], "cmd": c[:300], "peak_rss": peak}
                          for pid, (c, peak) in sorted(peaks.items())]}


def _mib(b: int) -> str:
    return f"{b / 2**20:,.0f}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        rest = argv[2:]
        return child(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=600, help="the demo's --rows")
    ap.add_argument("--workers", type=int, default=1, help="the demo's --workers (1: in-process; N > 1: N worker "
                                                          "processes)")
    ap.add_argument("--repeat", type=int, default=1, help="runs (the table adds their median)")
    ap.add_argument("--keep", default=None, help="keep the demo's outputs in this directory")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--log", default=None, help="append the demo's output here, each line with its time from start")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    results = [measure(args.rows, args.workers, extra, args.keep, args.log) for _ in range(args.repeat)]
    load1 = os.getloadavg()
    print(f"hardware: {os.cpu_count()} x {platform.machine()} cores; load average before {load0[0]:.2f}, "
          f"after {load1[0]:.2f} (1 min)")
    print(f"clip-curate demo --rows {args.rows} --workers {args.workers} {' '.join(extra)}".rstrip())
    print()
    print("| run | world ready s | first request s | first image downloaded s | wall s | launcher peak RSS MiB "
          "| worker peak RSS MiB (each) | worker peak PSS / USS MiB |")
    print("|---|---:|---:|---:|---:|---:|---|---|")

    def row(name, r):
        workers = ", ".join(_mib(b) for b in r["worker_peak_rss"]) or "-"
        shares = ", ".join(f"{_mib(p)} / {_mib(u)}" for p, u in zip(r.get("worker_peak_pss", []),
                                                                   r.get("worker_peak_uss", []))) or "-"
        fmt = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
        print(f"| {name} | {fmt(r['world_ready_s'])} | {fmt(r['first_request_s'])} | {fmt(r['first_image_s'])} | "
              f"{r['wall_s']:.1f} | {_mib(r['launcher_peak_rss'])} | {workers} | {shares} |")

    for i, r in enumerate(results):
        row(str(i + 1), r)
    if len(results) > 1:
        med = {k: statistics.median([r[k] for r in results]) for k in
               ("wall_s", "world_ready_s", "first_request_s", "first_image_s", "launcher_peak_rss")}
        for key in ("worker_peak_rss", "worker_peak_pss", "worker_peak_uss"):
            med[key] = [int(statistics.median(b)) for b in zip(*[r[key] for r in results])]
        row("median", med)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load_before": load0, "load_after": load1, "rows": args.rows, "workers": args.workers,
                       "extra": extra, "runs": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
