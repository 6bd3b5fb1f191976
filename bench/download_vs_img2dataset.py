"""Download + resize throughput: clip-curate vs img2dataset 1.47 on the same local web, in one run.

Serves ``--images`` JPEG photos of 300–900 px (crops of scikit-image's real photos, quality 90) from nginx in
its own process on 127.0.0.1, then runs, one after the other:

- img2dataset: ``--processes_count 2 --thread_count 32 --image_size 256 --resize_mode keep_ratio
  --output_format parquet`` (``--number_sample_per_shard`` = images / 8, so both processes get shards);
- ``clip-curate run --stages download,image`` with the same size, mode, threads and worker count
  (``--direct_num_workers 2 --direct_running_mode multi_processing``), per-host politeness off (one host).

For each: images written, wall time (process start to exit), images/s, the first download (seconds from the
process start to the first request in nginx's access log), and peak memory of the whole process
tree sampled every 0.25 s from /proc: the sum of RSS (counts pages shared by forked workers once per process)
and the sum of PSS (shared pages split between their users). Prints a markdown table and the ratios.

nginx is required (Debian: ``apt-get install -y nginx-light``): a Python server on the same two cores is
slower than either tool and would decide the figure. Without nginx the bench says how to install it and
falls back to the project's asyncio web server, marking every figure as server-bound.

    apt-get install -y nginx-light                          # once
    python bench/download_vs_img2dataset.py --images 4000   # default 4000 images
    python bench/download_vs_img2dataset.py --images 500 --server python   # server-bound, for a quick look
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, ROOT)  # the checkout's clip_curate, also when the package is not installed
from image_decode import real_photos  # noqa: E402  (same folder)

NGINX_INSTALL = "apt-get install -y nginx-light"

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format first '$msec';
    access_log {tmp}/access.log first buffer=64k flush=5s;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ image/jpeg jpg; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NginxServer:
    """nginx in the foreground (its own process), serving ``root`` on 127.0.0.1."""

    def __init__(self, root: str, tmp: str):
        self.root, self.tmp, self.port, self.proc = root, tmp, _free_port(), None

    def __enter__(self):
        conf = os.path.join(self.tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(tmp=self.tmp, root=self.root, port=self.port))
        self.proc = subprocess.Popen([shutil.which("nginx"), "-c", conf, "-p", self.tmp, "-e",
                                      os.path.join(self.tmp, "nginx-error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nginx failed: {self.proc.stderr.read().decode()[-500:]}")
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("nginx did not start")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # nginx's own session: master + its worker
            self.proc.wait(10)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class PythonServer:
    """The project's asyncio web server in a spawned process (when nginx is not installed)."""

    def __init__(self, bodies: dict[str, bytes]):
        from clip_curate.synthetic.webserver import Route, WebServer

        self.server = WebServer({p: Route(b, content_type="image/jpeg") for p, b in bodies.items()}, process=True)

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop()

    def url(self, path: str) -> str:
        return self.server.url(path)


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over a process and all its descendants."""
    rss = pss = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """user + system CPU seconds of each live process (from /proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[p] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


#: (epoch start, epoch end) of every command run_measured ran, in order: the first request nginx logged inside a
#: window is that run's first download
RUN_WINDOWS: list[tuple[float, float]] = []


def first_requests(access_log: str, windows: list[tuple[float, float]]) -> list[float | None]:
    """Seconds from each window's start to the first request nginx logged in it (None: none logged)."""
    try:
        with open(access_log) as f:
            stamps = sorted(float(line) for line in f if line.strip())
    except OSError:
        return [None] * len(windows)
    out = []
    for start, end in windows:
        inside = [t for t in stamps if start <= t <= end]
        out.append(inside[0] - start if inside else None)
    return out


def run_measured(cmd: list[str], env: dict | None = None, *, log_path: str | None = None, interval: float = 0.25,
                 on_sample: Callable[[float, int, int], None] | None = None) -> tuple[float, int, int, float]:
    """Run ``cmd``; (wall seconds, peak RSS sum, peak PSS sum, CPU seconds) of its process tree.

    CPU seconds: the last sampled user+system time of every process of the tree, plus what the tool's
    reaped children reported (``RUSAGE_CHILDREN``), whichever is larger; a shared machine's load barely
    changes it, unlike wall time. ``log_path``: the command's stdout and stderr go there (else stdout is
    dropped and stderr kept for the error message). ``on_sample(seconds, rss, pss)`` sees every sample."""
    import resource

    peak_rss = peak_pss = 0
    cpu_by_pid: dict[int, float] = {}
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = open(log_path, "w") if log_path else None
    t0, epoch0 = time.monotonic(), time.time()
    proc = subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                            env=env)
    done = threading.Event()
    err_chunks: list[bytes] = []

    def drain():
        for chunk in iter(lambda: proc.stderr.read(65536), b""):
            err_chunks.append(chunk)

    def sample():
        nonlocal peak_rss, peak_pss
        while not done.is_set():
            rss, pss = tree_memory(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            cpu_by_pid.update(cpu_seconds(_tree(proc.pid)))
            if on_sample:
                on_sample(time.monotonic() - t0, rss, pss)
            done.wait(interval)
    threads = [threading.Thread(target=sample, daemon=True)]
    if not log:
        threads.append(threading.Thread(target=drain, daemon=True))
    for t in threads:
        t.start()
    proc.wait()
    wall = time.monotonic() - t0
    RUN_WINDOWS.append((epoch0, time.time()))
    done.set()
    for t in threads:
        t.join()
    if log:
        log.close()
    if proc.returncode:
        if log_path:
            with open(log_path, errors="replace") as f:
                tail = f.read()[-3000:]
        else:
            tail = b"".join(err_chunks).decode(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{tail}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped = (after.ru_utime - children_before.ru_utime) + (after.ru_stime - children_before.ru_stime)
    return wall, peak_rss, peak_pss, max(reaped, sum(cpu_by_pid.values()))


def run_img2dataset(url_file: str, out: str, args) -> tuple[int, float, int, int, dict]:
    exe = shutil.which("img2dataset")
    cmd = ([exe] if exe else [sys.executable, "-m", "img2dataset"]) + [
        "--url_list", url_file, "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
        "--output_format", "parquet", "--output_folder", out,
        "--processes_count", str(args.workers), "--thread_count", str(args.threads),
        "--number_sample_per_shard", str(max(50, args.images // 8)),
        "--image_size", str(args.image_size), "--resize_mode", "keep_ratio", "--enable_wandb", "False"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    wall, rss, pss, cpu = run_measured(cmd, env)
    ok, errors = 0, {}
    for path in glob.glob(os.path.join(out, "*_stats.json")):
        with open(path) as f:
            stats = json.load(f)
        ok += stats.get("successes", 0)
        for status, n in stats.get("status_dict", {}).items():
            if status != "success":
                errors[status] = errors.get(status, 0) + n
    return ok, wall, rss, pss, cpu, errors


def run_clip_curate(url_file: str, out: str, args) -> tuple[int, float, int, int, dict]:
    cmd = [sys.executable, "-m", "clip_curate.cli"] + [
        "run", "--input", url_file, "--output", out, "--stages", "download,image",
        "--allow-private-addresses", "--no-respect-robots-txt",
        "--threads", str(args.threads), "--per-host-connections", str(args.threads), "--per-host-rps", "0",
        "--image-size", str(args.image_size), "--resize-mode", "keep_ratio", "--no-store-embeddings",
        "--progress-seconds", "0", "--log-level", "WARNING",
        f"--direct_num_workers={args.workers}", f"--direct_running_mode={args.running_mode}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    wall, rss, pss, cpu = run_measured(cmd, env)
    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)
    errors = {f"{stage}/{reason}": n for stage, by in stats.get("rejected_by", {}).items() for reason, n in by.items()}
    return stats["curated_rows"], wall, rss, pss, cpu, errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--unique", type=int, default=300, help="distinct photos (the rest repeat them)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--server", choices=("nginx", "python"), default="nginx",
                   help="nginx (default; falls back to python, marked server-bound, when nginx is missing)")
    p.add_argument("--running-mode", choices=("multi_processing", "multi_threading"), default="multi_processing",
                   help="clip-curate's DirectRunner mode: --workers processes (like img2dataset's), or threads "
                        "of one process")
    p.add_argument("--only", choices=("both", "img2dataset", "clip-curate"), default="both")
    p.add_argument("--keep", action="store_true", help="keep the work folder (outputs, server logs)")
    p.add_argument("--startup-images", type=int, default=16,
                   help="also run each tool on this many images to measure its fixed start-up cost (0 = skip)")
    args = p.parse_args(argv)

    load_start = os.getloadavg()[0]
    photos = real_photos(min(args.images, args.unique))
    bodies = {f"/img/{i}.jpg": photos[i % len(photos)] for i in range(args.images)}
    tmp = tempfile.mkdtemp(prefix="dl-bench-")
    os.chmod(tmp, 0o755)  # nginx workers may run as another user (www-data when started by root)
    use_nginx = args.server == "nginx" and shutil.which("nginx") is not None
    if args.server == "nginx" and not use_nginx:
        print(f"nginx is not installed: install it with `{NGINX_INSTALL}` (Debian) and run again. Falling back "
              "to the Python web server: the figures below are SERVER-BOUND (they measure the server, not the "
              "tools).", file=sys.stderr)
    if use_nginx:
        root = os.path.join(tmp, "www")
        os.makedirs(os.path.join(root, "img"))
        for path, body in bodies.items():
            with open(root + path, "wb") as f:
                f.write(body)
        server = NginxServer(root, tmp)
    else:
        server = PythonServer(bodies)
    results = []
    firsts: list = []
    try:
        with server:
            url_file = os.path.join(tmp, "urls.parquet")
            pq.write_table(pa.table({"url": [server.url(path) for path in bodies],
                                     "caption": [f"image {i}" for i in range(args.images)]}), url_file)
            small_file = os.path.join(tmp, "urls-startup.parquet")
            pq.write_table(pq.read_table(url_file).slice(0, args.startup_images), small_file)
            tools = [("img2dataset 1.47", run_img2dataset), ("clip-curate", run_clip_curate)]
            for name, fn in tools:
                if args.only not in ("both", name.split()[0]):
                    continue
                window = len(RUN_WINDOWS)
                ok, wall, rss, pss, cpu, errors = fn(url_file, os.path.join(tmp, f"{name.split()[0]}-out"), args)
                startup = None
                if args.startup_images:
                    ok0, wall0, _, _, cpu0, _ = fn(small_file, os.path.join(tmp, f"{name.split()[0]}-startup"), args)
                    startup = (ok0, wall0, cpu0)
                results.append((name, ok, wall, rss, pss, cpu, startup, window))
                if ok < args.images:
                    print(f"{name}: {args.images - ok} of {args.images} images failed: {errors}", file=sys.stderr)
        firsts = first_requests(os.path.join(tmp, "access.log"), RUN_WINDOWS)  # nginx flushed its log on exit
    finally:
        if args.keep:
            print(f"work folder kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    mb = sum(map(len, photos)) / len(photos) / 1e3
    print(f"\n{args.images} JPEGs (300–900 px, {len(photos)} distinct, mean {mb:.0f} kB) from "
          f"{'nginx' if use_nginx else 'a Python server (SERVER-BOUND: install nginx, ' + NGINX_INSTALL + ')'} "
          f"on 127.0.0.1 -> {args.image_size} px keep_ratio JPEG; {args.workers} "
          f"{'processes' if args.running_mode == 'multi_processing' else 'threads (clip-curate: one process)'} x "
          f"{args.threads} threads; {os.cpu_count()} CPUs, load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print("| tool | images ok | wall s | images/s | CPU s | first download s | start-up wall s / CPU s | CPU ms per "
          f"image after start-up | images/s on {args.workers} idle cores (projected) | peak RSS (sum) MB | peak PSS "
          "(sum) MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rates = []
    for tool, ok, wall, rss, pss, cpu, startup, window in results:
        first = firsts[window] if window < len(firsts) else None
        start_s = per_image = projected = "n/a"
        proj = float("nan")
        if startup:
            ok0, wall0, cpu0 = startup
            start_s = f"{wall0:.1f} / {cpu0:.1f}"
            if ok > ok0 and cpu > cpu0:
                ms = (cpu - cpu0) / (ok - ok0) * 1000
                proj = args.workers * 1000 / ms
                per_image, projected = f"{ms:.1f}", f"{proj:.0f}"
        rates.append((ok / wall, proj, rss, pss))
        first_s = "n/a" if first is None else f"{first:.1f}"
        print(f"| {tool} | {ok} | {wall:.1f} | {ok / wall:.0f} | {cpu:.1f} | {first_s} | {start_s} | {per_image} | {projected} "
              f"| {rss / 2**20:.0f} | {pss / 2**20:.0f} |")
    if len(rates) == 2:
        (rate_a, proj_a, rss_a, pss_a), (rate_b, proj_b, rss_b, pss_b) = rates
        print(f"\nclip-curate / img2dataset: {rate_b / max(rate_a, 1e-9):.2f}x images/s (wall, start-up included), "
              f"{proj_b / proj_a:.2f}x images/s after start-up (CPU-time projection), "
              f"{rss_b / max(rss_a, 1):.2f}x peak RSS, {pss_b / max(pss_a, 1):.2f}x peak PSS")
    if not use_nginx:
        print(f"SERVER-BOUND: the Python web server decided these figures; install nginx ({NGINX_INSTALL}) "
              "for a comparison of the tools")
    return 0


if __name__ == "__main__":
    sys.exit(main())
