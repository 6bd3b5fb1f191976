"""Decode memory is bounded per worker: decode plans known from the header, the shared pixel budget, strip-wise
reduction, and peak RSS of max-size images measured in a child process (``bench/decode_memory.py``'s)."""
import importlib.util
import io
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_curate.stages import image as image_stage
from clip_curate.stages.image import (DECODE_PIXEL_BUDGET, DECODE_RESERVE_PIXELS, MAX_PIXELS, DecodeResize,
                                      ImageConfig, PixelBudget, open_header, pixel_budget, plan_decode,
                                      process_image)


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "decode_memory.py"
    spec = importlib.util.spec_from_file_location("decode_memory_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
MiB = 1 << 20


def enc(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def forbid_decoding(monkeypatch):
    """``forbid_decoding()``: from then on, fail the test if any decoder runs."""
    def boom(*a, **k):
        raise AssertionError("decoded although the plan was over budget")

    def forbid():
        monkeypatch.setattr(image_stage, "_decode_pillow", boom)
        monkeypatch.setattr(image_stage, "_decode_jpeg_fast", boom)
        monkeypatch.setattr(Image.Image, "load", boom)
    return forbid


# ---------------------------------------------------------------------------------------------
# Defaults and config


def test_max_pixels_default_is_the_largest_rgb_image_the_budget_fits():
    cfg = ImageConfig()
    assert cfg.decode_pixel_budget == DECODE_PIXEL_BUDGET == 1 << 27
    assert cfg.max_pixels == MAX_PIXELS == DECODE_PIXEL_BUDGET - DECODE_RESERVE_PIXELS
    side = int(MAX_PIXELS ** 0.5)
    img = open_header(enc(Image.new("RGB", (64, 64)), "PNG"))
    assert plan_decode(img, side, side, 256, 256).pixels <= cfg.decode_pixel_budget
    assert plan_decode(img, side + 200, side + 200, 256, 256).pixels > cfg.decode_pixel_budget
    from clip_curate.fields import ConfigError
    with pytest.raises(ConfigError, match="--decode-pixel-budget"):
        ImageConfig(decode_pixel_budget=1000)
    with pytest.raises(ConfigError, match="--orb-keypoints"):
        ImageConfig(orb_keypoints=-1)


# ---------------------------------------------------------------------------------------------
# Plans: known from the header, by format and mode


def _header(mode, fmt, size=(64, 48), **kw):
    return open_header(enc(Image.new(mode, size), fmt, **kw))


@pytest.mark.parametrize("mode, fmt, per_px", [
    ("L", "PNG", 1), ("P", "PNG", 1), ("I;16", "PNG", 2), ("RGB", "PNG", 4), ("RGBA", "PNG", 4),
    ("RGB", "WEBP", 16), ("RGB", "BMP", 4), ("P", "GIF", 1)])
def test_plan_holds_the_full_image_in_pillows_mode(mode, fmt, per_px):
    w, h = 6000, 5000
    plan = plan_decode(_header(mode, fmt), w, h, 256, 213)
    assert plan.factor == min(w // 256, h // 213)  # integer box reduction that still covers the target
    image_bytes = w * h * per_px
    assert image_bytes < plan.peak_bytes <= image_bytes + DECODE_RESERVE_PIXELS * 4
    # kept at full size (resize mode no): the reduced copies are full size too
    assert plan_decode(_header(mode, fmt), w, h, w, h).peak_bytes >= w * h * (per_px + 6)


def test_jpeg_plans_scale_and_progressive_ones_hold_all_coefficients():
    w, h = 4000, 3000
    base = plan_decode(_header("RGB", "JPEG"), w, h, 342, 256)
    assert base.factor == 8 and base.peak_bytes < 8 * MiB       # 500 x 375 decoded
    prog = plan_decode(_header("RGB", "JPEG", progressive=True), w, h, 342, 256)
    assert prog.peak_bytes - base.peak_bytes == pytest.approx(w * h * 3, rel=0.01)   # 4:2:0: 1.5 samples x 2 B
    full = plan_decode(_header("RGB", "JPEG", progressive=True, subsampling=0), w, h, 342, 256)
    assert full.peak_bytes - base.peak_bytes == pytest.approx(w * h * 6, rel=0.01)   # 4:4:4
    assert plan_decode(_header("RGB", "JPEG"), w, h, 3000, 2000).factor == 1


# ---------------------------------------------------------------------------------------------
# Over budget: rejected with the size, before any decoding


def test_over_budget_image_is_rejected_before_decoding(forbid_decoding):
    budget = 2 * MiB                                               # 2 Mpx (8 MiB)
    cfg = ImageConfig(decode_pixel_budget=budget)
    png = enc(Image.new("RGB", (2048, 2048), (40, 90, 200)), "PNG")          # 16 MiB to decode
    prog = enc(Image.new("RGB", (2048, 2048), (40, 90, 200)), "JPEG", progressive=True)
    forbid_decoding()
    res = process_image(png, cfg)
    assert res.reason == "too_large_pixels"
    assert "PNG RGB 2048x2048" in res.detail and "decoding needs" in res.detail
    assert f"--decode-pixel-budget {budget}" in res.detail
    # a progressive JPEG holds every DCT coefficient whatever the scale: over budget too
    assert process_image(prog, cfg).reason == "too_large_pixels"
    # the same budget drawn from a worker's shared PixelBudget answers the same
    assert process_image(png, cfg, PixelBudget(budget)).reason == "too_large_pixels"


def test_baseline_jpeg_of_the_same_size_decodes_scaled_within_budget():
    cfg = ImageConfig(decode_pixel_budget=2 * MiB)
    jpg = enc(Image.fromarray(np.random.default_rng(0).integers(0, 255, (2048, 2048, 3), np.uint8)), "JPEG")
    budget = PixelBudget(cfg.decode_pixel_budget)
    res = process_image(jpg, cfg, budget)
    assert res.reason is None and (res.fields["width"], res.fields["height"]) == (256, 256)
    assert 0 < budget.in_use_peak <= cfg.decode_pixel_budget


def test_stage_rejects_over_budget_rows_and_keeps_the_rest(run_transform, jpeg):
    cfg = ImageConfig(decode_pixel_budget=2 * MiB)
    rows = [{"uid": "big", "url": "http://t/big.png", "caption": "c",
             "image_bytes": enc(Image.new("RGB", (2048, 2048)), "PNG")},
            {"uid": "small", "url": "http://t/small.jpg", "caption": "c", "image_bytes": jpeg(7, shape=(300, 400))}]
    ran = run_transform(rows, DecodeResize(cfg))
    assert [r["uid"] for r in ran.kept] == ["small"]
    assert [(r["stage"], r["reason"]) for r in ran.rejected] == [("image", "too_large_pixels")]
    assert "2048x2048" in ran.rejected[0]["detail"]
    assert ran.counters["image_too_large_pixels"] == 1


# ---------------------------------------------------------------------------------------------
# The shared budget


def test_pixel_budget_is_first_come_first_served_and_caps_requests():
    budget = PixelBudget(100)
    order, started = [], []
    held = budget.acquire(60)

    def take(name, n):
        started.append(name)
        with budget.hold(n):
            order.append(name)

    def wait_until(cond):
        done = threading.Event()
        for _ in range(2000):
            if cond():
                return
            done.wait(0.005)
        raise AssertionError("condition not reached")

    big = threading.Thread(target=take, args=("big", 100))
    big.start()
    wait_until(lambda: budget.waits == 1)           # big waits: only 40 free
    small = threading.Thread(target=take, args=("small", 10))
    small.start()
    wait_until(lambda: budget.waits == 2)           # small waits behind big although 40 are free
    assert order == []
    budget.release(held)
    big.join(10)
    small.join(10)
    assert order == ["big", "small"] and budget.in_use_peak == 100
    assert budget.acquire(10**9) == 100             # more than the whole budget: capped, never a deadlock
    budget.release(100)


def test_pixel_budget_bounds_concurrent_holders():
    budget = PixelBudget(1000)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 700, 200).tolist()
    inside, peak, lock = [0], [0], threading.Lock()

    def work(n):
        with budget.hold(n):
            with lock:
                inside[0] += n
                peak[0] = max(peak[0], inside[0])
            with lock:
                inside[0] -= n

    threads = [threading.Thread(target=work, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert peak[0] <= 1000 and budget.in_use_peak <= 1000 and inside[0] == 0


def test_budget_trims_the_heap_after_large_decodes_only(monkeypatch):
    """Decoded buffers of LARGE_DECODE_BYTES or more count towards a heap trim every trim_every bytes (64 MiB,
    or the budget's pixels as bytes when fewer), done when a hold is released; small buffers never trim (a trim
    makes a CPU forward pass in the same worker fault its buffers back in)."""
    trims = []
    monkeypatch.setattr(image_stage, "trim_heap", lambda: trims.append(1) or True)
    budget = PixelBudget(DECODE_PIXEL_BUDGET)
    assert budget.trim_every == image_stage.TRIM_EVERY_BYTES == 64 << 20
    for _ in range(2000):
        with budget.hold(1000):
            budget.freed(image_stage.LARGE_DECODE_BYTES - 1)
    assert trims == [] and budget.trims == 0
    per_trim = budget.trim_every // image_stage.LARGE_DECODE_BYTES   # 16 buffers of 4 MiB
    for k in range(1, 3 * per_trim + 1):
        with budget.hold(1000):
            budget.freed(image_stage.LARGE_DECODE_BYTES)
        assert len(trims) == k // per_trim
    assert budget.trims == 3
    small = PixelBudget(16 << 20)
    assert small.trim_every == 16 << 20
    with small.hold(100):
        small.freed(64 << 20)
    assert small.trims == 1 and len(trims) == 4


def test_stage_counts_what_a_decode_really_held(monkeypatch, jpeg):
    """A baseline JPEG counts its DCT-scaled array, not its plan: a 300-900 px web photo never nears a trim."""
    seen = []
    budget = PixelBudget(DECODE_PIXEL_BUDGET)
    monkeypatch.setattr(budget, "freed", lambda n: seen.append(n))
    process_image(jpeg(1, shape=(880, 660)), ImageConfig(), budget)
    assert len(seen) == 1 and seen[0] < image_stage.LARGE_DECODE_BYTES and seen[0] <= 440 * 330 * 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc counters")
def test_image_stage_leaves_freed_buffers_for_reuse(tmp_path):
    """After the image stage's setup, a freed 8 MiB buffer is reused by the next one instead of being unmapped
    and faulted in again page by page (the stage once made glibc mmap every allocation of 1 MiB or more,
    process-wide, which cost a CPU forward pass of ViT-B-32 ~50 ms of system time per image in the same
    worker)."""
    import subprocess

    child = (
        "import resource, numpy as np\n"
        "from clip_curate.stages.image import ImageConfig, _DecodeResizeFn\n"
        "fn = _DecodeResizeFn(ImageConfig()); fn.setup()\n"
        "for _ in range(3): a = np.ones(1 << 23, np.uint8); del a\n"
        "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(50): a = np.ones(1 << 23, np.uint8); del a\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    faults = int(out.stdout.split()[-1])
    assert faults < 2048, faults      # one 8 MiB buffer is 2,048 pages; the old setting faulted 25,800


def test_one_budget_per_worker_process():
    assert pixel_budget(12345678) is pixel_budget(12345678)
    assert pixel_budget(12345678) is not pixel_budget(22345678)
    fn = image_stage._DecodeResizeFn(ImageConfig(decode_pixel_budget=12345678))
    fn.setup()
    assert fn._budget is pixel_budget(12345678)


# ---------------------------------------------------------------------------------------------
# Strip-wise conversion equals converting the whole image


@pytest.mark.parametrize("mode", ["RGBA", "P-transparent", "I;16", "LA", "RGB"])
def test_strip_decode_equals_whole_image_conversion(mode):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (1400, 1100, 3), np.uint8))
    if mode == "RGBA":
        img = rgb.convert("RGBA")
        img.putalpha(Image.fromarray(rng.integers(0, 255, (1400, 1100), np.uint8)))
    elif mode == "P-transparent":
        img = rgb.convert("P")
        img.info["transparency"] = 3
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (1400, 1100), np.uint16))
    else:
        img = rgb.convert(mode)
    data = enc(img, "PNG")
    factor = 3
    got = image_stage._decode_pillow(open_header(data), factor, 300, 300)
    ref = Image.open(io.BytesIO(data))
    ref.load()
    if ref.mode == "I;16":
        peak = 65535.0 if ref.getextrema()[1] > 255 else 255.0
        ref = Image.fromarray(np.clip(np.asarray(ref, np.float32) * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    elif ref.mode in ("RGBA", "LA") or (ref.mode == "P" and "transparency" in ref.info):
        rgba = ref.convert("RGBA")
        ref = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    elif ref.mode != "RGB":
        ref = ref.convert("RGB")
    assert got.shape[:2] == (-(-1400 // factor), -(-1100 // factor))
    assert np.array_equal(got, np.asarray(ref.reduce(factor)))


# ---------------------------------------------------------------------------------------------
# Peak RSS of max-size images, measured in a child process


@pytest.mark.slow
def test_max_size_png_alone_costs_about_four_bytes_per_pixel(tmp_path):
    """At the defaults, one max-size PNG (11494 x 11494, 132 Mpx) decodes in <= 4 B/px + the reserve; the
    stage before the budget held ~13 B/px (several full-size copies)."""
    side = bench.square_side(MAX_PIXELS)
    paths = bench.make_images(str(tmp_path), side, kinds=("png",))
    res = bench.measure(paths, {}, threads=1, images=1)
    assert res["reasons"] == {"kept": 1}
    grown = res["peak_mb"] - res["base_mb"]
    assert grown * MiB <= 4 * side * side + DECODE_RESERVE_PIXELS * 4 + 32 * MiB, res


@pytest.mark.slow
def test_budget_bounds_a_worker_decoding_max_size_images_on_many_threads(tmp_path):
    """8 threads, a stream of max-size PNGs and JPEGs for a 16 Mpx budget: the peak stays within the budget
    (64 MB) plus small per-thread costs; without the budget the same stream costs several times more."""
    budget = 16_000_000
    side = bench.square_side(budget - DECODE_RESERVE_PIXELS)
    paths = bench.make_images(str(tmp_path), side)
    config = {"max_pixels": side * side, "decode_pixel_budget": budget}
    bounded = bench.measure(paths, config, threads=8, images=16)
    assert bounded["reasons"] == {"kept": 16} and bounded["budget_waits"] > 0
    documented = 4 * budget + 8 * 2 * MiB + 24 * MiB     # 4 B x budget + ~2 MiB per thread + margin
    assert (bounded["peak_mb"] - bounded["base_mb"]) * MiB <= documented, bounded
    unbounded = bench.measure(paths, {**config, "decode_pixel_budget": 1 << 40}, threads=8, images=16)
    assert (unbounded["peak_mb"] - unbounded["base_mb"]) * MiB > documented * 2, unbounded
