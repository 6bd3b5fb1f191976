"""A synthetic image–caption world with ground truth, for the demo, the tests and the tiny model.

Scenes are drawn procedurally (Pillow + numpy): a group of 1–4 identical shapes (``shape``,
``colour``, ``size``) laid out at a ``position`` (left/right/top/bottom column or row, or a centre
cluster) over a ``background`` colour with a ``texture`` (plain, striped, dotted, checkered) and a
random luminance gradient. Captions are compositional and drawn from varied templates, e.g.
``"two small red circles on the left of a striped teal background"``.

:func:`generate_world` mixes items of known kinds (``truth["kind"]``):

==========================  =====================================================================
``matched``                 caption describes the image
``mismatch_random``         caption of another, unrelated scene
``mismatch_hard``           caption with exactly one attribute changed (colour, shape, position or
                            count; ``truth["mismatch_attribute"]`` says which)
``unsafe``                  the image carries the world's unsafe motif (a dark-red "blood splatter":
                            blobs with drips) and, for ``unsafe_caption_fraction`` of them, the
                            caption names it with words from :data:`UNSAFE_CAPTION_TERMS`
``dup_exact_of:<uid>``      byte-identical copy of a matched item under another URL
``dup_near_of:<uid>``       re-encoded / resized / ≤10 % cropped / colour-shifted copy
``eval_leak_of:<uid>``      copy (exact or near) of an item of the world's eval set ``World.eval_items``
``broken_404``              URL that the world server answers with 404
``broken_not_image``        URL that the world server answers with an HTML page
==========================  =====================================================================

``long_tail=R`` makes the world long-tailed: the (colour, shape) concepts of its scenes (:data:`CONCEPTS`,
"red circle" ... "black diamond") follow a Zipf law, ranked in that order, so the head concept is ``R``
times as frequent as the rarest (:func:`long_tail_weights`). Off (0), every concept is equally likely.

Everything is a pure function of ``seed`` (and the other arguments).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------
# Vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 170, 50), "blue": (40, 80, 230), "yellow": (245, 215, 30),
    "purple": (140, 50, 180), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "beige": (205, 185, 145), "pink": (235, 160, 185),
    "teal": (20, 130, 130), "brown": (115, 70, 40), "navy": (25, 35, 95),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
MAX_COUNT = {"small": 4, "large": 3}
#: Attributes a hard mismatch may change (exactly one of them).
HARD_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "position", "count")
#: Attributes usable as zero-shot classes in :meth:`World.heldout`.
LABEL_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "count", "position", "size", "background", "texture")

#: Words the unsafe captions use (a caption word list containing these catches them).
UNSAFE_CAPTION_TERMS: tuple[str, ...] = ("gore", "gory", "blood", "bloody")
#: Zero-shot prompts for the unsafe concept and neutral counterparts (for CLIP concept checks).
UNSAFE_CONCEPT_PROMPTS: tuple[str, ...] = (
    "splattered with blood and gore", "with blood and gore splattered over it", "bloody gore", "blood splatter")
NEUTRAL_CONCEPT_PROMPTS: tuple[str, ...] = (
    "shapes on a plain background", "a clean picture of shapes", "a tidy scene of shapes")
_UNSAFE_PHRASES = (
    "splattered with blood and gore", "covered in gory blood splatter", "with bloody gore",
    "with blood and gore splattered over it",
)
_SPLATTER = (120, 0, 5)

_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_PLURAL = {"cross": "crosses"}
_SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left side", "on the left side"),
    "right": ("on the right", "at the right side", "on the right side"),
    "top": ("at the top", "along the top", "near the top"),
    "bottom": ("at the bottom", "along the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle", "in the center"),
}
_TEXTURE_WORDS = {"plain": ("plain",), "striped": ("striped",), "dotted": ("dotted", "polka dot"),
                  "checkered": ("checkered", "checked")}
# Full templates name every attribute; {obj} is "<count> <size> <colour> <shape(s)>".
_FULL_TEMPLATES = (
    "{obj} {pos} of a {tex} {bg} background",
    "{obj} {pos}, on a {tex} {bg} background",
    "a picture of {obj} {pos} over a {tex} {bg} background",
    "{tex} {bg} background with {obj} {pos}",
    "{pos_cap}: {obj} on a {bg} {tex} background",
    "photo of {obj} placed {pos}, {tex} {bg} backdrop",
    "{obj} {pos}; the background is {bg} and {tex}",
    "there are {obj} {pos} of the picture, background {tex} {bg}",
)
# Short templates (training-time caption variety only) still name colour, shape, count and position.
_SHORT_TEMPLATES = (
    "{obj} {pos}",
    "{obj} {pos} on {bg}",
    "{cobj} {pos}",
    "{cobj} {pos} of a {tex} background",
)


def plural(shape: str, count: int = 2) -> str:
    return shape if count == 1 else _PLURAL.get(shape, shape + "s")


def _choice(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


# ---------------------------------------------------------------------------------------------
# Attributes and captions

def _contrast_ok(colour: str, background: str) -> bool:
    a, b = np.array(COLOURS[colour]), np.array(BACKGROUNDS[background])
    return int(np.abs(a - b).sum()) >= 150


#: The (colour, shape) concepts of a long-tailed world, in Zipf rank order (colour-major over the vocabulary:
#: ``("red", "circle")`` is the head, ``("black", "diamond")`` the rarest).
CONCEPTS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)


def concept_name(colour: str, shape: str) -> str:
    """``("red", "circle")`` -> ``"red circle"`` (the class name of the ``concept`` label attribute)."""
    return f"{colour} {shape}"


def long_tail_weights(ratio: float) -> np.ndarray:
    """Zipf probabilities of :data:`CONCEPTS`: rank k gets ``k**-s``, with ``s`` chosen so that the head concept
    is ``ratio`` times as frequent as the rarest (``ratio`` 100 over 48 concepts: s = 1.19)."""
    if not ratio >= 1.0:
        raise ValueError(f"long_tail must be 0 (off) or a head/tail frequency ratio >= 1, got {ratio}")
    s = math.log(ratio) / math.log(len(CONCEPTS))
    w = np.arange(1, len(CONCEPTS) + 1, dtype=np.float64) ** -s
    return w / w.sum()


def sample_attributes(rng: np.random.Generator, concept_p: np.ndarray | None = None) -> dict[str, Any]:
    """Draw a random valid attribute set (shape, colour, count, size, position, background, texture);
    ``concept_p`` (optional) are the probabilities of :data:`CONCEPTS` for the (colour, shape) pair."""
    size = _choice(rng, SIZES)
    if concept_p is not None:
        colour, shape = CONCEPTS[int(rng.choice(len(CONCEPTS), p=concept_p))]
        backgrounds = [b for b in BACKGROUNDS if _contrast_ok(colour, b)]
        return {"shape": shape, "colour": colour, "count": int(rng.integers(1, MAX_COUNT[size] + 1)), "size": size,
                "position": _choice(rng, POSITIONS), "background": _choice(rng, backgrounds),
                "texture": _choice(rng, TEXTURES)}
    colour = _choice(rng, tuple(COLOURS))
    backgrounds = [b for b in BACKGROUNDS if _contrast_ok(colour, b)]
    return {
        "shape": _choice(rng, SHAPES),
        "colour": colour,
        "count": int(rng.integers(1, MAX_COUNT[size] + 1)),
        "size": size,
        "position": _choice(rng, POSITIONS),
        "background": _choice(rng, backgrounds),
        "texture": _choice(rng, TEXTURES),
    }


def describe(attrs: dict[str, Any], rng: np.random.Generator, *, short: bool = False,
             unsafe: bool = False) -> str:
    """A caption for ``attrs`` from a random template (``short`` ones are for training variety)."""
    count = int(attrs["count"])
    count_word = _COUNT_WORDS[count]
    if count == 1 and rng.random() < 0.5:
        count_word = "a"
    size_word = _choice(rng, _SIZE_WORDS[attrs["size"]])
    shape_word = plural(attrs["shape"], count)
    obj = f"{count_word} {size_word} {attrs['colour']} {shape_word}"
    cobj = f"{count_word} {attrs['colour']} {shape_word}"
    pos = _choice(rng, _POSITION_PHRASES[attrs["position"]])
    tex = _choice(rng, _TEXTURE_WORDS[attrs["texture"]])
    template = _choice(rng, _SHORT_TEMPLATES if short else _FULL_TEMPLATES)
    text = template.format(obj=obj, cobj=cobj, pos=pos, pos_cap=pos[0].upper() + pos[1:], tex=tex,
                           bg=attrs["background"])
    if unsafe:
        text = f"{text}, {_choice(rng, _UNSAFE_PHRASES)}"
    return text


def change_one_attribute(attrs: dict[str, Any], rng: np.random.Generator, attribute: str | None = None,
                         weights: dict[str, float] | None = None) -> tuple[dict[str, Any], str]:
    """Copy of ``attrs`` with exactly one of :data:`HARD_ATTRIBUTES` changed to another valid value
    (``attribute`` given, or drawn uniformly / by ``weights``)."""
    if attribute is None and weights:
        p = np.array([weights.get(a, 0.0) for a in HARD_ATTRIBUTES], dtype=np.float64)
        attribute = HARD_ATTRIBUTES[int(rng.choice(len(HARD_ATTRIBUTES), p=p / p.sum()))]
    attribute = attribute or _choice(rng, HARD_ATTRIBUTES)
    new = dict(attrs)
    if attribute == "colour":
        options = [c for c in COLOURS if c != attrs["colour"] and _contrast_ok(c, attrs["background"])]
    elif attribute == "shape":
        options = [s for s in SHAPES if s != attrs["shape"]]
    elif attribute == "position":
        options = [p for p in POSITIONS if p != attrs["position"]]
    elif attribute == "count":
        options = [c for c in range(1, MAX_COUNT[attrs["size"]] + 1) if c != attrs["count"]]
    else:
        raise ValueError(f"cannot change attribute {attribute!r}; choose from {HARD_ATTRIBUTES}")
    new[attribute] = _choice(rng, options)
    return new, attribute


# ---------------------------------------------------------------------------------------------
# Rendering

def _layout(attrs: dict[str, Any], rng: np.random.Generator) -> list[tuple[float, float]]:
    """Object centres in unit coordinates."""
    count = int(attrs["count"])
    size = 0.13 if attrs["size"] == "small" else 0.24
    step = size * (1.4 if attrs["size"] == "small" else 1.28)
    offsets = [(i - (count - 1) / 2) * step for i in range(count)]
    pos = attrs["position"]
    j = lambda: float(rng.uniform(-0.025, 0.025))  # noqa: E731
    if pos in ("left", "right"):
        x = 0.2 if pos == "left" else 0.8
        return [(x + j(), 0.5 + o + j()) for o in offsets]
    if pos in ("top", "bottom"):
        y = 0.2 if pos == "top" else 0.8
        return [(0.5 + o + j(), y + j()) for o in offsets]
    half = step / 2
    grid = {1: [(0, 0)], 2: [(-half, 0), (half, 0)], 3: [(-half, half * 0.9), (half, half * 0.9), (0, -half * 0.9)],
            4: [(-half, -half), (half, -half), (-half, half), (half, half)]}[count]
    return [(0.5 + dx + j(), 0.5 + dy + j()) for dx, dy in grid]


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def poly(points):
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "square":
        k = r * 0.85
        return poly([(-k, -k), (k, -k), (k, k), (-k, k)])
    if shape == "diamond":
        return poly([(0, -r * 1.05), (r * 0.75, 0), (0, r * 1.05), (-r * 0.75, 0)])
    if shape == "triangle":
        return poly([(0, -r), (r * 0.95, r * 0.7), (-r * 0.95, r * 0.7)])
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        return poly(pts)
    if shape == "cross":
        a, b = r * 0.33, r
        return poly([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                     (-b, a), (-b, -a), (-a, -a)])
    raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=8)
def _unit_grid(px: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32) / px
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _background(attrs: dict[str, Any], rng: np.random.Generator, px: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[attrs["background"]], dtype=np.float32)
    yy, xx = _unit_grid(px)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
    gain = 1.0 + rng.uniform(0.15, 0.35) * ramp * 2  # random luminance gradient
    for _ in range(3):  # uneven "lighting": a few random low-frequency waves give each scene its own look
        fx, fy = rng.uniform(-2.5, 2.5, size=2)
        gain += rng.uniform(0.05, 0.12) * np.cos(2 * math.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * math.pi))
    texture = attrs["texture"]
    mask = np.zeros((px, px), dtype=bool)
    if texture == "striped":
        period = rng.uniform(0.07, 0.13)
        a = _choice(rng, (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4))
        proj = xx * math.cos(a) + yy * math.sin(a) + rng.uniform(0, 1)
        mask = (proj / period) % 1.0 < 0.45
    elif texture == "dotted":
        period = rng.uniform(0.08, 0.12)
        ox, oy = rng.uniform(0, period, size=2)
        dx = ((xx + ox) % period) - period / 2
        dy = ((yy + oy) % period) - period / 2
        mask = dx * dx + dy * dy < (period * 0.28) ** 2
    elif texture == "checkered":
        period = rng.uniform(0.1, 0.16)
        ox, oy = rng.uniform(0, period, size=2)
        mask = ((np.floor((xx + ox) / period) + np.floor((yy + oy) / period)) % 2) == 1
    lum = float(base.mean())
    shade = 0.62 if lum > 110 else 1.7
    alt = np.clip(base * shade + (0 if lum > 110 else 25), 0, 255).astype(np.float32)
    colour = np.where(mask[..., None], alt, base)
    colour *= gain[..., None]
    return np.clip(colour, 0, 255, out=colour).astype(np.uint8)


def _draw_splatter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, px: int) -> None:
    """The world's unsafe motif: dark-red splatter blobs with drips."""
    for _ in range(int(rng.integers(2, 4))):
        cx, cy = rng.uniform(0.15, 0.85, size=2) * px
        r = rng.uniform(0.07, 0.11) * px
        for _ in range(7):
            ox, oy = rng.normal(0, r * 0.55, size=2)
            rr = r * rng.uniform(0.35, 0.75)
            draw.ellipse([cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr], fill=_SPLATTER)
        for _ in range(int(rng.integers(2, 4))):
            x = cx + rng.uniform(-r, r)
            w = rng.uniform(0.012, 0.025) * px
            length = rng.uniform(0.12, 0.25) * px
            draw.rectangle([x - w, cy, x + w, cy + length], fill=_SPLATTER)
            draw.ellipse([x - 1.6 * w, cy + length - 1.6 * w, x + 1.6 * w, cy + length + 1.6 * w], fill=_SPLATTER)


def render_scene(attrs: dict[str, Any], seed: int | Sequence[int], *, image_px: int = 128,
                 unsafe: bool = False, supersample: int = 2) -> Image.Image:
    """Draw the scene described by ``attrs`` (RGB PIL image, ``image_px`` square).

    ``seed`` fixes the layout jitter, rotation, gradient and texture phase; ``unsafe`` adds the
    world's unsafe motif (dark-red blood splatter with drips).
    """
    rng = np.random.default_rng(seed)
    px = image_px * supersample
    img = Image.fromarray(_background(attrs, rng, image_px), "RGB")
    if supersample > 1:
        img = img.resize((px, px), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    fill = COLOURS[attrs["colour"]]
    rel = 0.13 if attrs["size"] == "small" else 0.24
    for cx, cy in _layout(attrs, rng):
        r = rel * px / 2 * rng.uniform(0.92, 1.08)
        x, y = cx * px, cy * px
        if attrs["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            rot = rng.uniform(-0.2, 0.2)
            draw.polygon(_shape_polygon(attrs["shape"], x, y, r, rot), fill=fill)
    if unsafe:
        _draw_splatter(draw, rng, px)
    if supersample > 1:
        img = img.resize((image_px, image_px), Image.Resampling.LANCZOS)
    return img


def encode_image(img: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


NEAR_DUP_VARIANTS: tuple[str, ...] = ("reencode", "resize", "crop", "colour_shift")


def near_duplicate(image_bytes: bytes, rng: np.random.Generator, variant: str | None = None) -> tuple[bytes, str]:
    """A near-duplicate of an encoded image: ``reencode`` (JPEG quality 55–80), ``resize``
    (×0.6–0.85 or ×1.2–1.5), ``crop`` (removes 2–5 % of each dimension, split over both sides:
    at most ~10 % of the area) or
    ``colour_shift`` (brightness ×0.93–1.07 and a per-channel offset of ±6). Returns (bytes, variant).
    """
    variant = variant or _choice(rng, NEAR_DUP_VARIANTS)
    img = decode_image(image_bytes)
    w, h = img.size
    if variant == "reencode":
        return encode_image(img, "JPEG", int(rng.integers(55, 81))), variant
    if variant == "resize":
        f = rng.uniform(0.6, 0.85) if rng.random() < 0.5 else rng.uniform(1.2, 1.5)
        img = img.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BICUBIC)
    elif variant == "crop":
        fx, fy = rng.uniform(0.02, 0.05, size=2)
        left = int(round(w * fx * rng.uniform(0.3, 0.7)))
        top = int(round(h * fy * rng.uniform(0.3, 0.7)))
        right = w - (int(round(w * fx)) - left)
        bottom = h - (int(round(h * fy)) - top)
        img = img.crop((left, top, right, bottom))
    elif variant == "colour_shift":
        arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.93, 1.07) + rng.uniform(-6, 6, size=3)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    else:
        raise ValueError(f"unknown near-duplicate variant {variant!r}; choose from {NEAR_DUP_VARIANTS}")
    return encode_image(img, "JPEG", int(rng.integers(80, 95))), variant


# ---------------------------------------------------------------------------------------------
# The world

@dataclass(frozen=True)
class WorldItem:
    """One URL of the world. ``image_bytes`` is what the server returns (None: 404)."""

    uid: str
    path: str
    caption: str
    image_bytes: bytes | None
    content_type: str
    truth: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.truth["kind"]


@dataclass(frozen=True)
class LabelledSet:
    """Labelled images for zero-shot evaluation: ``labels[i]`` indexes ``classnames``."""

    attribute: str
    classnames: tuple[str, ...]
    images: tuple[bytes, ...]
    labels: tuple[int, ...]
    items: tuple[WorldItem, ...]

    def prompts(self, classname: str) -> list[str]:
        return zero_shot_prompts(self.attribute, classname)

    def with_attribute(self, attribute: str) -> "LabelledSet":
        """The same images labelled by another attribute."""
        classes = attribute_classes(attribute)
        labels = tuple(classes.index(label_value(it.truth, attribute)) for it in self.items)
        return LabelledSet(attribute, classes, self.images, labels, self.items)


def zero_shot_prompts(attribute: str, value: Any) -> list[str]:
    """Caption-like prompts for one class of ``attribute`` (used for zero-shot classification)."""
    if attribute == "concept":
        colour, shape = str(value).split(" ", 1)
        return [f"a picture of {colour} {plural(shape)}", f"some {colour} {plural(shape)} on a background",
                f"one {colour} {shape}"]
    if attribute == "shape":
        return [f"a picture of {plural(value)}", f"some {plural(value)} on a background", f"one {value}"]
    if attribute == "colour":
        return [f"a picture of {value} shapes", f"some {value} shapes on a background", f"a {value} shape"]
    if attribute == "count":
        n = int(value)
        noun = "shape" if n == 1 else "shapes"
        return [f"{_COUNT_WORDS[n]} {noun}", f"a picture of {_COUNT_WORDS[n]} {noun}"]
    if attribute == "position":
        return [f"shapes {p}" for p in _POSITION_PHRASES[value]]
    if attribute == "size":
        return [f"{value} shapes", f"a picture of {value} shapes"]
    if attribute == "background":
        return [f"shapes on a {value} background", f"a {value} background"]
    if attribute == "texture":
        return [f"shapes on a {w} background" for w in _TEXTURE_WORDS[value]]
    raise ValueError(f"unknown attribute {attribute!r}; choose from {LABEL_ATTRIBUTES}")


def attribute_classes(attribute: str) -> tuple[str, ...]:
    table = {"shape": SHAPES, "colour": tuple(COLOURS), "count": ("1", "2", "3", "4"), "size": SIZES,
             "position": POSITIONS, "background": tuple(BACKGROUNDS), "texture": TEXTURES,
             "concept": tuple(concept_name(c, s) for c, s in CONCEPTS)}
    if attribute not in table:
        raise ValueError(f"unknown attribute {attribute!r}; choose from {LABEL_ATTRIBUTES}")
    return table[attribute]


def attribute_groups(attribute: str = "colour") -> dict[str, dict[str, list[str]]]:
    """Audit groups for one world attribute: ``{class: {"prompts": [...], "terms": [...]}}``."""
    groups = {}
    for value in attribute_classes(attribute):
        if attribute == "shape":
            terms = [value, plural(value)]
        elif attribute == "count":
            terms = [_COUNT_WORDS[int(value)]]
        elif attribute == "position" and value == "centre":
            terms = ["centre", "center", "middle"]
        else:
            terms = [value]
        groups[value] = {"prompts": zero_shot_prompts(attribute, value), "terms": terms}
    return groups


_TRUTH_ATTRS = ("shape", "colour", "count", "size", "position", "background", "texture")


def label_value(attrs: dict[str, Any], attribute: str) -> str:
    """The class name of ``attribute`` for a scene's attributes (``concept``: ``"red circle"``)."""
    if attribute == "concept":
        return concept_name(attrs["colour"], attrs["shape"])
    return str(attrs[attribute])


def _scene(rng: np.random.Generator, seed_key: Sequence[int], image_px: int, *, unsafe: bool = False,
           fmt: str = "JPEG", concept_p: np.ndarray | None = None) -> tuple[dict[str, Any], bytes]:
    attrs = sample_attributes(rng, concept_p)
    img = render_scene(attrs, list(seed_key) + [1], image_px=image_px, unsafe=unsafe)
    return attrs, encode_image(img, fmt)


@dataclass
class World:
    """A generated world: ``items`` (the URL list), ``eval_items`` (its eval set) and parameters."""

    seed: int
    image_px: int
    items: list[WorldItem]
    eval_items: list[WorldItem] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def by_uid(self) -> dict[str, WorldItem]:
        return {it.uid: it for it in self.items}

    def kinds(self) -> dict[str, int]:
        """Counts per kind family (``dup_exact_of:w1`` counts as ``dup_exact``)."""
        out: dict[str, int] = {}
        for it in self.items:
            k = kind_family(it.kind)
            out[k] = out.get(k, 0) + 1
        return out

    def to_url_table(self, base_url: str, *, include_uid: bool = True):
        """pyarrow table: ``url``, ``caption`` (, ``uid``) and ground-truth columns ``truth_*``."""
        import pyarrow as pa

        base = base_url.rstrip("/")
        cols: dict[str, list] = {"url": [base + it.path for it in self.items],
                                 "caption": [it.caption for it in self.items]}
        if include_uid:
            cols["uid"] = [it.uid for it in self.items]
        truth_cols = truth_columns(self.items)
        cols.update(truth_cols)
        return pa.table(cols)

    def heldout(self, n: int, seed: int, attribute: str = "shape") -> LabelledSet:
        """``n`` fresh labelled scenes (classes: one attribute) drawn from ``seed``."""
        return heldout_set(n, seed, attribute=attribute, image_px=self.image_px)

    def write_eval_dir(self, path: str | os.PathLike) -> list[str]:
        """Write ``eval_items`` as image files (``<uid>.jpg``) for ``--decontaminate``; returns paths."""
        os.makedirs(path, exist_ok=True)
        out = []
        for it in self.eval_items:
            p = os.path.join(path, f"{it.uid}.jpg")
            with open(p, "wb") as f:
                f.write(it.image_bytes or b"")
            out.append(p)
        return out


def world_routes(world: World):
    """``{path: Route}`` serving every item of ``world`` (404 and HTML pages for the broken kinds)."""
    from clip_curate.synthetic.webserver import Route

    routes = {"/robots.txt": Route(b"User-agent: *\nAllow: /\n", content_type="text/plain")}
    for it in world.items:
        if it.kind == "broken_404" or it.image_bytes is None:
            routes[it.path] = Route(b"not found", status=404, content_type="text/plain")
        else:
            routes[it.path] = Route(it.image_bytes, content_type=it.content_type)
    return routes


def serve_world(world: World, *, host: str = "127.0.0.1", port: int = 0, hosts: Sequence[str] | None = None,
                process: bool = False):
    """A :class:`clip_curate.synthetic.webserver.WebServer` (not yet started) serving ``world``.

    Use it as a context manager::

        with serve_world(world) as srv:
            table = world.to_url_table(srv.base_url)
    """
    from clip_curate.synthetic.webserver import WebServer

    return WebServer(world_routes(world), host=host, port=port, hosts=hosts, process=process)


def kind_family(kind: str) -> str:
    """``dup_near_of:w000003`` -> ``dup_near``; ``matched`` -> ``matched``."""
    return kind.split(":", 1)[0].removesuffix("_of")


def truth_columns(items: Iterable[WorldItem]) -> dict[str, list]:
    items = list(items)
    cols: dict[str, list] = {
        "truth_uid": [it.uid for it in items],
        "truth_kind": [it.truth["kind"] for it in items],
        "truth_family": [kind_family(it.truth["kind"]) for it in items],
        "truth_of": [it.truth.get("of") or "" for it in items],
        "truth_caption_ok": [bool(it.truth.get("caption_ok", False)) for it in items],
        "truth_unsafe": [bool(it.truth.get("unsafe", False)) for it in items],
        "truth_unsafe_caption": [bool(it.truth.get("unsafe_caption", False)) for it in items],
        "truth_mismatch_attribute": [it.truth.get("mismatch_attribute") or "" for it in items],
        "truth_variant": [it.truth.get("variant") or "" for it in items],
    }
    for a in _TRUTH_ATTRS:
        if a == "count":
            cols["truth_count"] = [int(it.truth.get("count") or 0) for it in items]
        else:
            cols[f"truth_{a}"] = [it.truth.get(a) or "" for it in items]
    return cols


def _counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    total = sum(fractions.values())
    if total > 1.0 + 1e-9:
        raise ValueError(f"kind fractions add up to {total:.3f} > 1: {fractions}")
    for k, v in fractions.items():
        if v < 0:
            raise ValueError(f"{k}={v} must be >= 0")
    return {k: int(round(n * v)) for k, v in fractions.items()}


def generate_world(n: int, seed: int, *, mismatch_random: float = 0.15, mismatch_hard: float = 0.15,
                   dup_exact: float = 0.03, dup_near: float = 0.05, unsafe: float = 0.03,
                   unsafe_caption_fraction: float = 0.7, eval_leak: float = 0.02, eval_size: int = 32,
                   broken_404: float = 0.0, broken_not_image: float = 0.0, png_fraction: float = 0.1,
                   image_px: int = 128, long_tail: float = 0.0) -> World:
    """Generate ``n`` URL items with ground truth; fractions are of ``n`` (the rest are ``matched``).

    Deterministic in all arguments. Duplicates copy ``matched`` items; eval leaks copy
    ``eval_items`` (an eval set of ``eval_size`` scenes from a derived seed). Item order is shuffled.
    ``long_tail`` > 0: scene concepts (and the unrelated scenes random mismatches describe) follow
    :func:`long_tail_weights` of that head/tail ratio; the eval set stays uniform. 0 (default): the uniform world.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    concept_p = long_tail_weights(long_tail) if long_tail else None
    counts = _counts(n, {"mismatch_random": mismatch_random, "mismatch_hard": mismatch_hard,
                         "dup_exact": dup_exact, "dup_near": dup_near, "unsafe": unsafe,
                         "eval_leak": eval_leak, "broken_404": broken_404,
                         "broken_not_image": broken_not_image})
    n_matched = n - sum(counts.values())
    if (counts["dup_exact"] or counts["dup_near"]) and n_matched < 1:
        raise ValueError("duplicates need at least one matched item to copy")
    eval_items = list(heldout_set(eval_size, seed=seed + 7919, attribute="shape", image_px=image_px,
                                  uid_prefix="e").items) if (eval_size and counts["eval_leak"]) else []
    if counts["eval_leak"] and not eval_items:
        raise ValueError("eval_leak > 0 needs eval_size > 0")

    plan = (["matched"] * n_matched + ["mismatch_random"] * counts["mismatch_random"]
            + ["mismatch_hard"] * counts["mismatch_hard"] + ["unsafe"] * counts["unsafe"]
            + ["broken_404"] * counts["broken_404"] + ["broken_not_image"] * counts["broken_not_image"])
    order = np.random.default_rng([seed, 1]).permutation(n)  # uid index of each planned item
    base: list[WorldItem] = []
    for i, kind in enumerate(plan):
        idx = int(order[i])
        rng = np.random.default_rng([seed, 2, idx])
        uid = f"w{idx:06d}"
        fmt = "PNG" if rng.random() < png_fraction else "JPEG"
        is_unsafe = kind == "unsafe"
        attrs, data = _scene(rng, [seed, 3, idx], image_px, unsafe=is_unsafe, fmt=fmt, concept_p=concept_p)
        truth: dict[str, Any] = {"kind": kind, **attrs, "caption_ok": True, "unsafe": is_unsafe}
        ctype = "image/png" if fmt == "PNG" else "image/jpeg"
        if kind == "mismatch_random":
            caption = describe(_unrelated_attributes(attrs, rng, concept_p), rng)
            truth["caption_ok"] = False
        elif kind == "mismatch_hard":
            other, changed = change_one_attribute(attrs, rng)
            caption = describe(other, rng)
            truth.update(caption_ok=False, mismatch_attribute=changed,
                         caption_value=str(other[changed]))
        elif kind == "unsafe":
            named = bool(rng.random() < unsafe_caption_fraction)
            caption = describe(attrs, rng, unsafe=named)
            truth["unsafe_caption"] = named
        elif kind in ("broken_404", "broken_not_image"):
            caption = describe(attrs, rng)
            truth["caption_ok"] = False
            if kind == "broken_404":
                data, ctype = None, "text/plain"
            else:
                data, ctype = b"<!doctype html><html><body>not an image</body></html>", "text/html"
        else:
            caption = describe(attrs, rng)
        ext = {"image/png": "png", "image/jpeg": "jpg"}.get(ctype, "jpg")
        base.append(WorldItem(uid, f"/img/{uid}.{ext}", caption, data, ctype, truth))

    matched = [it for it in base if it.kind == "matched"]
    copies: list[WorldItem] = []
    copy_kinds = (["dup_exact"] * counts["dup_exact"] + ["dup_near"] * counts["dup_near"]
                  + ["eval_leak"] * counts["eval_leak"])
    for j, kind in enumerate(copy_kinds):
        idx = int(order[len(plan) + j])
        rng = np.random.default_rng([seed, 4, idx])
        uid = f"w{idx:06d}"
        src = _choice(rng, eval_items if kind == "eval_leak" else matched)
        src_attrs = {a: src.truth[a] for a in _TRUTH_ATTRS}
        if kind == "dup_exact" or (kind == "eval_leak" and rng.random() < 0.3):
            data, variant, ctype = src.image_bytes, "exact", src.content_type
        else:
            data, variant = near_duplicate(src.image_bytes, rng)
            ctype = "image/jpeg"
        caption = src.caption if rng.random() < 0.5 else describe(src_attrs, rng)
        truth = {"kind": f"{kind}_of:{src.uid}", "of": src.uid, **src_attrs, "caption_ok": True,
                 "unsafe": False, "variant": variant}
        ext = "png" if ctype == "image/png" else "jpg"
        copies.append(WorldItem(uid, f"/img/{uid}.{ext}", caption, data, ctype, truth))

    items = sorted(base + copies, key=lambda it: it.uid)
    params = dict(n=n, seed=seed, mismatch_random=mismatch_random, mismatch_hard=mismatch_hard,
                  dup_exact=dup_exact, dup_near=dup_near, unsafe=unsafe,
                  unsafe_caption_fraction=unsafe_caption_fraction, eval_leak=eval_leak,
                  eval_size=eval_size, broken_404=broken_404, broken_not_image=broken_not_image,
                  png_fraction=png_fraction, image_px=image_px)
    if long_tail:
        params["long_tail"] = long_tail
    return World(seed=seed, image_px=image_px, items=items, eval_items=eval_items, params=params)


def heldout_set(n: int, seed: int, *, attribute: str = "shape", image_px: int = 128,
                uid_prefix: str = "h") -> LabelledSet:
    """``n`` matched labelled scenes from ``seed``; labels are the classes of ``attribute``."""
    classes = attribute_classes(attribute)
    items, labels = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, 5, i])
        attrs, data = _scene(rng, [seed, 6, i], image_px)
        uid = f"{uid_prefix}{i:06d}"
        truth = {"kind": "heldout", **attrs, "caption_ok": True, "unsafe": False}
        items.append(WorldItem(uid, f"/eval/{uid}.jpg", describe(attrs, rng), data, "image/jpeg", truth))
        labels.append(classes.index(label_value(attrs, attribute)))
    return LabelledSet(attribute, classes, tuple(it.image_bytes for it in items), tuple(labels), tuple(items))


# ---------------------------------------------------------------------------------------------
# Training and evaluation pairs for the tiny model

@dataclass(frozen=True)
class ScenePair:
    """One rendered scene with caption variants: matched captions, a random and a hard mismatch."""

    image_bytes: bytes
    captions: tuple[str, ...]
    random_caption: str
    hard_caption: str
    hard_attribute: str
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    unsafe: bool = False


def _captions_and_other(attrs: dict[str, Any], rng: np.random.Generator, n_captions: int, short_fraction: float,
                        unsafe: bool) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``n_captions`` matched captions of ``attrs`` and the attributes of an unrelated scene (for the
    random mismatch), drawn from ``rng`` in this order."""
    caps = []
    for k in range(n_captions):
        short = k > 0 and rng.random() < short_fraction
        caps.append(describe(attrs, rng, short=short, unsafe=unsafe and (k % 2 == 0 or short)))
    return tuple(caps), _unrelated_attributes(attrs, rng)


def _unrelated_attributes(attrs: dict[str, Any], rng: np.random.Generator,
                          concept_p: np.ndarray | None = None) -> dict[str, Any]:
    """Attributes of a random scene that differs from ``attrs`` in at least one of :data:`HARD_ATTRIBUTES`."""
    other = sample_attributes(rng, concept_p)
    while all(other[a] == attrs[a] for a in HARD_ATTRIBUTES):
        other = sample_attributes(rng, concept_p)
    return other


def scene_pair(seed: int, index: int, *, image_px: int = 128, n_captions: int = 4,
               unsafe_fraction: float = 0.03, short_fraction: float = 0.25,
               hard_weights: dict[str, float] | None = None) -> ScenePair:
    """The ``index``-th scene of stream ``seed`` with ``n_captions`` matched captions and mismatches
    (the hard mismatch changes an attribute drawn uniformly, or by ``hard_weights``)."""
    rng = np.random.default_rng([seed, 8, index])
    unsafe = bool(rng.random() < unsafe_fraction)
    fmt = "PNG" if rng.random() < 0.1 else "JPEG"
    attrs, data = _scene(rng, [seed, 9, index], image_px, unsafe=unsafe, fmt=fmt)
    caps, other = _captions_and_other(attrs, rng, n_captions, short_fraction, unsafe)
    hard, changed = change_one_attribute(attrs, rng, weights=hard_weights)
    return ScenePair(data, caps, describe(other, rng), describe(hard, rng), changed, attrs, unsafe)


def scene_twin(pair: ScenePair, seed: int, index: int, *, image_px: int = 128, n_captions: int = 4,
               short_fraction: float = 0.25, hard_weights: dict[str, float] | None = None) -> ScenePair:
    """The minimal-pair twin of ``pair`` (scene ``index`` of stream ``seed``): the same scene — layout
    jitter, background, texture, lighting — drawn with exactly one of :data:`HARD_ATTRIBUTES` changed
    (drawn uniformly or by ``hard_weights``). Its ``hard_caption`` describes the original scene."""
    rng = np.random.default_rng([seed, 10, index])
    attrs, changed = change_one_attribute(pair.attrs, rng, weights=hard_weights)
    img = render_scene(attrs, [seed, 9, index, 1], image_px=image_px, unsafe=pair.unsafe)
    data = encode_image(img, "PNG" if pair.image_bytes[:4] == b"\x89PNG" else "JPEG")
    caps, other = _captions_and_other(attrs, rng, n_captions, short_fraction, pair.unsafe)
    return ScenePair(data, caps, describe(other, rng), describe(pair.attrs, rng), changed, attrs, pair.unsafe)


def scene_pairs(n: int, seed: int, *, workers: int = 1, twins: bool = False, **kwargs: Any) -> list[ScenePair]:
    """``n`` scene pairs of stream ``seed`` (optionally rendered in ``workers`` processes).

    ``twins``: also render each scene's :func:`scene_twin`; the result is then ``2n`` long and item
    ``n + i`` is the twin of item ``i``.
    """
    if workers <= 1 or n < 256:
        chunks = [_scene_pair_chunk(range(n), seed, kwargs, twins)]
    else:
        from concurrent.futures import ProcessPoolExecutor
        import functools

        fn = functools.partial(_scene_pair_chunk, seed=seed, kwargs=kwargs, twins=twins)
        with ProcessPoolExecutor(workers) as pool:
            chunks = list(pool.map(fn, [range(s, min(n, s + 512)) for s in range(0, n, 512)]))
    return [p for c in chunks for p in c[0]] + [t for c in chunks for t in c[1]]


def _scene_pair_chunk(indices: range, seed: int, kwargs: dict,
                      twins: bool = False) -> tuple[list[ScenePair], list[ScenePair]]:
    pairs = [scene_pair(seed, i, **kwargs) for i in indices]
    twin_kwargs = {k: v for k, v in kwargs.items() if k in ("image_px", "n_captions", "short_fraction", "hard_weights")}
    return pairs, ([scene_twin(p, seed, i, **twin_kwargs) for p, i in zip(pairs, indices)] if twins else [])
