"""Host work per image: CPU milliseconds a curation run spends per image on everything but neural-network
forward passes.

Curates a pool of real-photo JPEGs on disk (Parquet with a ``jpg`` column: mosaics of crops of scikit-image's
photos, 300–900 px, quality 90, no two alike; no network) with the default stages (caption, image, embed, clip, dedup, safety,
balance) and the bias audit, in this process on the DirectRunner (``in_memory``, one worker), with
``ViT-B-32 --clip-pretrained none`` (open_clip's preprocessing and tokenizer for that model). Every network's
forward pass is replaced, inside this process only, by a stub returning fixed outputs of the right shape:

- CLIP image + text towers: ``ClipEmbedder.embed`` returns fixed L2-normalised embeddings;
- the opennsfw classifier (and any other ONNX network): ``onnxruntime.InferenceSession.run`` returns
  arrays of the graph's output shapes filled with 0.01.

Everything else is real: decode, resize, JPEG encode, CLIP preprocessing and tokenizing, NSFW preprocessing,
hashes and dedup keys, caption rules and language detection, safety word lists, the audit, Parquet writing,
Beam itself. CPU = user + system time of this process and its children (``resource.getrusage``) over the
``run()`` call (imports are done before). Two runs: ``--images`` and ``--small`` images; the last line is
the per-image cost between them (start-up excluded), ``host_ms_per_image: X``. The stages' busy time per
image (their ``<stage>_msecs`` counters) is printed as a breakdown; "Beam, writing, audit, other" is the rest.

    python bench/host_cost.py                      # 4000 images (+ a 200-image run for the start-up)
    python bench/host_cost.py --images 1000 --small 100
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import numpy as np  # noqa: E402

from image_decode import PHOTOS, real_photos  # noqa: E402

WORDS = ("dog", "cat", "mountain", "city street", "bowl of coffee", "rocket launch", "astronaut", "garden",
         "beach at sunset", "old car", "red bicycle", "wooden table", "bird on a branch", "market stall")
PLACES = ("in the morning", "at night", "in winter", "on a sunny day", "near the river", "in the studio")


def photo_mosaics(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEGs (300–900 px, quality 90) made of real-photo pieces: each is a 2x2 to 3x3 grid of
    tiles, each tile a crop of one of scikit-image's photos (random place, scale, flip) blended with a crop of
    another. Crops of a handful of photos alone would be near duplicates of each other (the keypoint dedup
    finds crops), and most rows would stop at the dedup stage."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = [Image.open(io.BytesIO(b)).convert("RGB") for b in real_photos(len(PHOTOS), seed=seed)]
    sources = [s.resize((s.width * 2, s.height * 2), Image.BICUBIC) for s in sources]
    out = []
    for _ in range(n):
        w, h = int(rng.integers(300, 901)), int(rng.integers(300, 901))
        k = int(rng.integers(2, 4))
        canvas = Image.new("RGB", (w, h))
        xs, ys = np.linspace(0, w, k + 1).astype(int), np.linspace(0, h, k + 1).astype(int)
        for i in range(k):
            for j in range(k):
                tw, th = xs[i + 1] - xs[i], ys[j + 1] - ys[j]
                src = sources[int(rng.integers(len(sources)))]
                scale = float(rng.uniform(0.35, 1.0))
                cw, ch = max(8, min(src.width, round(tw / scale))), max(8, min(src.height, round(th / scale)))
                x0, y0 = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
                tile = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((tw, th), Image.BILINEAR)
                other = sources[int(rng.integers(len(sources)))]
                ox, oy = int(rng.integers(0, other.width - tw + 1)), int(rng.integers(0, other.height - th + 1))
                # blended with a crop of another photo: no two tiles share their local features (keypoints)
                tile = Image.blend(tile, other.crop((ox, oy, ox + tw, oy + th)), float(rng.uniform(0.35, 0.65)))
                if rng.random() < 0.5:
                    tile = tile.transpose(Image.FLIP_LEFT_RIGHT)
                canvas.paste(tile, (xs[i], ys[j]))
        buf = io.BytesIO()
        canvas.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def build_pool(path: str, n: int, seed: int = 0) -> None:
    """``n`` distinct real-photo JPEGs with short English captions, as a Parquet pool (``jpg`` column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    photos = photo_mosaics(n, seed=seed)
    captions = [f"a photo of a {WORDS[rng.integers(len(WORDS))]} {PLACES[rng.integers(len(PLACES))]}, "
                f"picture {i}" for i in range(n)]
    urls = [f"https://images.example/{i}.jpg" for i in range(n)]
    tmp = path + ".tmp"
    pq.write_table(pa.table({"url": urls, "caption": captions, "jpg": photos}), tmp, row_group_size=256)
    os.replace(tmp, path)


def install_stubs() -> dict[str, int]:
    """Replace the networks' forward passes in this process; returns call counters."""
    import onnxruntime as ort

    from clip_curate.stages import embed

    calls = {"clip": 0, "onnx": 0}

    def clip_embed(self, images, tokens):
        calls["clip"] += len(images)
        dim = int(getattr(self.loaded.model, "text_projection", np.zeros((1, 512))).shape[-1])
        v = np.full((len(images), dim), 1.0 / np.sqrt(dim), dtype=np.float32)
        return v.copy(), v.copy()

    def onnx_run(self, output_names, input_feed, run_options=None):
        calls["onnx"] += 1
        batch = len(next(iter(input_feed.values())))
        outs = [o for o in self.get_outputs() if output_names is None or o.name in output_names]
        return [np.full([d if isinstance(d, int) else batch for d in o.shape], 0.01, dtype=np.float32)
                for o in outs]

    embed.ClipEmbedder.embed = clip_embed
    ort.InferenceSession.run = onnx_run
    return calls


#: CPU seconds (of the calling thread) per part, from the wrappers below; "of which" parts run inside others.
TIMES: dict[str, float] = {}
PARTS: list[tuple[str, str]] = []  # (label, parent label or "")


def _timed(owner, attr: str, label, parent: str = "", materialise: bool = False) -> None:
    """Wrap ``owner.attr`` to add the calling thread's CPU time to ``TIMES[label]`` (``label`` may be a function
    of the call's first argument, e.g. a DoFn's stage name). ``materialise``: the wrapped function returns an
    iterator (a DoFn's ``process``): it is run to its end inside the timing."""
    import functools

    fn = getattr(owner, attr, None)
    if fn is None:  # a part this version of the package does not have
        return

    @functools.wraps(fn)
    def wrapper(*a, **k):
        t0 = time.thread_time()
        try:
            out = fn(*a, **k)
            return list(out) if materialise and out is not None else out
        finally:
            name = label(a[0]) if callable(label) else label
            TIMES[name] = TIMES.get(name, 0.0) + time.thread_time() - t0

    setattr(owner, attr, wrapper)
    if isinstance(label, str):
        PARTS.append((label, parent))


def install_timers() -> None:
    """CPU time per part of the pipeline (measurement only: each wrapper costs about a microsecond)."""
    from clip_curate import pipeline, writers
    from clip_curate.audit import assemble
    from clip_curate.models import nsfw
    from clip_curate.stages import balance, base, dedup, embed, image, safety
    from clip_curate.stages.dedup import exact, near

    _timed(base.RowFilter, "process", lambda fn: f"stage {fn.stage} (row filter)", materialise=True)
    PARTS.extend([("stage caption (row filter)", ""), ("stage image (row filter)", ""),
                  ("stage clip (row filter)", "")])
    for part in ("_decode_jpeg_fast", "resize", "encode_jpeg", "phash_hex", "orb_keypoints"):
        _timed(image, part, f"image: {part.strip('_')}", "stage image (row filter)")
    _timed(safety.CaptionSafety, "process", "safety: caption word lists", materialise=True)
    _timed(safety._SafetyDoFn, "process", "safety: NSFW batch (preprocessing + stubbed forward)", materialise=True)
    _timed(nsfw, "stack_pixels", "nsfw: preprocessing (stack_pixels)", "safety: NSFW batch (preprocessing + "
                                                                        "stubbed forward)")
    _timed(embed._Prepare, "process", "embed: CLIP preprocessing (decode, resize/crop, tokenize)", materialise=True)
    _timed(embed._Attach, "process", "embed: attach embeddings", materialise=True)
    for owner, attr in ((dedup, "_compact"), (dedup, "_count_in"), (dedup, "fill_hashes")):
        _timed(owner, attr, "dedup: compact rows")
    _timed(dedup._Decide, "process", "dedup: decide (join)", materialise=True)
    _timed(exact, "_exact_keyed", "dedup: exact keys", materialise=True)
    for cls in (getattr(near, n, None) for n in ("_NearKeys", "_LocalKeys", "_LocalMatch", "_LocalVerify")):
        _timed(cls, "process", "dedup: near keys + keypoint matching", materialise=True)
    for mod in (exact, near):
        _timed(mod, "decide_bucket", "dedup: bucket decisions", materialise=True)
    _timed(balance._Match, "process", "balance: entry matching", materialise=True)
    _timed(assemble._Features, "process", "audit: per-row features", materialise=True)
    _timed(pipeline.ProgressLog, "process", "progress counters", materialise=True)
    _timed(writers._Project, "process", "writing: project rows", materialise=True)
    for attr in ("add", "close"):
        _timed(writers._RowFile, attr, "writing: Arrow batches + Parquet")


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def curate(pool: str, out: str, extra: list[str]) -> tuple[float, float, dict]:
    """One in-process run over ``pool``; (CPU seconds, wall seconds, stats.json)."""
    from clip_curate.run import run

    shutil.rmtree(out, ignore_errors=True)
    args = ["--input", pool, "--output", out, "--clip-model", "ViT-B-32", "--clip-pretrained", "none",
            "--device", "cpu", "--audit", "--progress-seconds", "0", "--log-level", "WARNING",
            "--direct_num_workers=1", "--direct_running_mode=in_memory", *extra]
    c0, t0 = cpu_seconds(), time.monotonic()
    run(args)
    cpu, wall = cpu_seconds() - c0, time.monotonic() - t0
    with open(os.path.join(out, "stats.json")) as f:
        return cpu, wall, json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--small", type=int, default=200, help="images of the start-up run (0: no start-up run; "
                                                          "the figure is then the whole run's CPU / images)")
    p.add_argument("--pool-dir", default=os.path.join(tempfile.gettempdir(), "clip-curate-host-cost"),
                   help="where the pools are built (kept and reused)")
    p.add_argument("--keep", action="store_true", help="keep the outputs")
    p.add_argument("extra", nargs="*", help="more clip-curate run flags (after --)")
    args = p.parse_args(argv)

    os.makedirs(args.pool_dir, exist_ok=True)
    pools = {}
    for n in sorted({args.images, args.small} - {0}):
        path = os.path.join(args.pool_dir, f"pool-{n}.parquet")
        if not os.path.exists(path):
            t0 = time.monotonic()
            build_pool(path, n)
            print(f"built {path} ({n} images) in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        pools[n] = path
    import clip_curate.run  # noqa: F401 - imports before any measurement
    calls = install_stubs()
    install_timers()
    outs = tempfile.mkdtemp(prefix="host-cost-")
    results, times = {}, {}
    try:
        for n in sorted(pools):
            TIMES.clear()
            results[n] = curate(pools[n], os.path.join(outs, f"out-{n}"), args.extra)
            times[n] = dict(TIMES)
    finally:
        if not args.keep:
            shutil.rmtree(outs, ignore_errors=True)
    if not calls["clip"] or not calls["onnx"]:
        print(f"warning: a stub was never called ({calls}): a network ran for real or a stage was off",
              file=sys.stderr)

    n = args.images
    cpu, wall, stats = results[n]
    print(f"\n{n} real-photo JPEGs (300–900 px) from a Parquet pool; default stages + audit; forward passes "
          f"stubbed ({calls['clip']} CLIP rows, {calls['onnx']} ONNX batches); in-process DirectRunner, one "
          f"worker; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"stages: {', '.join(stats.get('stages', []))}; curated {stats['curated_rows']}, rejected "
          f"{stats['rejected_rows']} {json.dumps(stats['rejected_by'], sort_keys=True)}")
    print(f"run: {cpu:.1f} CPU s, {wall:.1f} wall s = {cpu / n * 1000:.2f} CPU ms per image (start-up included)")
    per = cpu / n * 1000
    spent = times[n]
    children = {}
    for label, parent in PARTS:
        children.setdefault(parent, [])
        if label not in children[parent]:
            children[parent].append(label)
    print("\n| part (CPU of the worker thread) | CPU ms per image | share |")
    print("|---|---:|---:|")
    top = sorted((lab for lab in children[""] if spent.get(lab)), key=lambda lab: -spent[lab])
    for label in top:
        print(f"| {label} | {spent[label] / n * 1000:.2f} | {100 * spent[label] / cpu:.0f} % |")
        for sub in sorted((c for c in children.get(label, []) if spent.get(c)), key=lambda c: -spent[c]):
            print(f"| &nbsp;&nbsp;of which {sub} | {spent[sub] / n * 1000:.2f} | {100 * spent[sub] / cpu:.0f} % |")
    rest = cpu - sum(spent[lab] for lab in top)
    print(f"| Beam (shuffles, coders, RunInference batching, bundles), pipeline build, rest | "
          f"{rest / n * 1000:.2f} | {100 * rest / cpu:.0f} % |")
    print(f"| **all** | {per:.2f} | 100 % |")
    timings = {k: v for k, v in stats.get("timings", {}).items() if k.endswith("_msecs")}
    print("stage busy time (<stage>_msecs counters), ms per image: "
          + ", ".join(f"{k[:-6]} {v / n:.2f}" for k, v in sorted(timings.items(), key=lambda kv: -kv[1])))
    figure = per
    if args.small and args.small < n:
        cpu0, wall0, _ = results[args.small]
        figure = (cpu - cpu0) / (n - args.small) * 1000
        print(f"\nstart-up run: {args.small} images, {cpu0:.1f} CPU s, {wall0:.1f} wall s; per image between the "
              f"two runs (start-up excluded): {figure:.2f} CPU ms")
    print(f"host_ms_per_image: {figure:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
