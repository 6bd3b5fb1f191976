"""Politeness benchmark: clip-curate's downloader vs img2dataset on one synthetic web of many hosts.

The web: ``--hosts`` loopback addresses (127.0.0.2, ...) served by one server process; half of the URLs on
3 hosts (a CDN-dominated pool), the rest spread evenly; ``--slow-fraction`` of the URLs answer after
``--slow-s`` seconds. Both tools run with the same process and thread counts; the server counts, for every
request, how many requests its host was already answering (per-host concurrency), and we report images/s,
the p99 and maximum of that per-host concurrency, and the maximum on the busiest host.

    python bench/polite_web.py                     # 2000 URLs, 100 hosts, 2 % slow
    python bench/polite_web.py --urls 1000 --skip-img2dataset

Prints a markdown table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from clip_curate.synthetic.webserver import Route, WebServer, loopback_hosts, tiny_jpeg


def build_web(n_urls: int, n_hosts: int, slow_fraction: float, slow_s: float, seed: int = 0):
    rng = random.Random(seed)
    bodies = [tiny_jpeg(rng.randint(300, 640), rng.randint(240, 480), seed=i) for i in range(16)]
    hosts = loopback_hosts(n_hosts)
    heavy, light = hosts[:3], hosts[3:]
    routes, urls = {}, []
    for i in range(n_urls):
        host = heavy[i % 3] if i < n_urls // 2 else light[i % len(light)]
        slow = rng.random() < slow_fraction
        path = f"/{'slow' if slow else 'img'}/{i}.jpg"
        routes[path] = Route(bodies[i % len(bodies)], content_type="image/jpeg", delay_s=slow_s if slow else 0.0)
        urls.append((host, path))
    rng.shuffle(urls)
    return routes, hosts, urls


def concurrency_figures(srv: WebServer, hosts) -> dict:
    hist: dict[int, int] = {}
    busiest = 0
    for h in hosts:
        st = srv.stats(h)
        for k, v in st.concurrency_seen.items():
            hist[k] = hist.get(k, 0) + v
        busiest = max(busiest, st.max_active)
    total = sum(hist.values())
    p99, acc = 0, 0
    for k in sorted(hist):
        acc += hist[k]
        if acc >= 0.99 * total:
            p99 = k
            break
    return {"requests": total, "p99": p99, "max": max(hist) if hist else 0, "busiest_max": busiest}


def run_img2dataset(url_file: str, out: str, args) -> tuple[int, float]:
    cmd = ["img2dataset", "--url_list", url_file, "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "parquet", "--output_folder", out,
           "--processes_count", str(args.workers), "--thread_count", str(args.threads), "--resize_mode", "no",
           "--timeout", "10", "--retries", "0", "--enable_wandb", "False"]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    ok = sum(json.load(open(f)).get("successes", 0) for f in glob.glob(os.path.join(out, "*_stats.json")))
    return ok, wall


def run_clip_curate(url_file: str, out: str, args, extra: list[str]) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "clip_curate.cli", "run", "--input", url_file, "--output", out,
           "--stages", "download", "--allow-private-addresses", "--threads", str(args.threads),
           "--progress-seconds", "0", "--log-level", "WARNING",
           f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing", *extra]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    stats = json.load(open(os.path.join(out, "stats.json")))
    return stats["curated_rows"], wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--urls", type=int, default=2000)
    p.add_argument("--hosts", type=int, default=100)
    p.add_argument("--slow-fraction", type=float, default=0.02)
    p.add_argument("--slow-s", type=float, default=2.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--skip-img2dataset", action="store_true")
    args = p.parse_args(argv)

    routes, hosts, urls = build_web(args.urls, args.hosts, args.slow_fraction, args.slow_s)
    tmp = tempfile.mkdtemp(prefix="polite-web-")
    rows = []
    with WebServer(routes, hosts=hosts, process=True) as srv:
        url_file = os.path.join(tmp, "urls.parquet")
        full = [f"http://{h}:{srv.port}{path}" for h, path in urls]
        pq.write_table(pa.table({"url": full, "caption": [f"image {i}" for i in range(len(full))]}), url_file)
        runs = []
        if not args.skip_img2dataset:
            runs.append(("img2dataset 1.47", "no per-host limits", lambda o: run_img2dataset(url_file, o, args)))
        runs.append(("clip-curate", "defaults: 4 conn/host/worker, 10 req/s/host/worker",
                     lambda o: run_clip_curate(url_file, o, args, [])))
        per_worker = max(1, 4 // args.workers)
        runs.append(("clip-curate", f"{per_worker} conn/host/worker (<= 4 per host in all), no req/s limit",
                     lambda o: run_clip_curate(url_file, o, args, ["--per-host-connections", str(per_worker),
                                                                  "--per-host-rps", "0"])))
        for i, (tool, setting, fn) in enumerate(runs):
            srv.reset_stats()
            ok, wall = fn(os.path.join(tmp, f"out{i}"))
            conc = concurrency_figures(srv, hosts)
            rows.append((tool, setting, ok, wall, ok / wall, conc))
            print(f"# {tool} [{setting}]: {ok} images in {wall:.1f} s; per-host concurrency {conc}", file=sys.stderr)

    print(f"\n{args.urls} URLs on {args.hosts} loopback hosts (half on 3 hosts), {args.slow_fraction:.0%} answer "
          f"after {args.slow_s:g} s; {args.workers} processes x {args.threads} threads, {os.cpu_count()} CPUs.\n")
    print("| tool | setting | images | wall s | images/s | per-host concurrency p99 | max | busiest host max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for tool, setting, ok, wall, ips, c in rows:
        print(f"| {tool} | {setting} | {ok} | {wall:.1f} | {ips:.0f} | {c['p99']} | {c['max']} | {c['busiest_max']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
