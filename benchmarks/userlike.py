"""MNIST digits rendered the way users' own pictures of digits look: the proof that preprocessing works.

Each MNIST image becomes a "photo" or "scan": scaled up to a 200-600 px picture, dark ink on light paper
(grey, cream or white), off-centre with margins, slightly rotated, lit by a gradient, often crossed by a soft
shadow, with paper texture, sensor noise, a few specks, sometimes the table beyond the page's edge, then
encoded as a user would send it: JPEG (colour or grey), PNG (colour, grey, 16-bit) or PNG with transparency
(a cut-out page, or strokes on a transparent canvas as drawing apps export).

Seeded per image: image i of `make_userlike(images, seed)` is the same whatever else is generated, so a
test on the first 1,000 and a benchmark on all 10,000 see identical pictures. Only the generator lives in
the repo, never the pictures.

`hard_variants()` adds the pictures that used to defeat preprocessing, one function per kind (name ->
function(digit (28, 28) uint8, rng) -> PIL image): tight crops whose strokes touch every edge, digits
stretched to fill their box, binary 16x16 and 8x8 scans enlarged with blocky pixels, thick marker, faint
pencil, white ink on a transparent canvas (palette PNG and RGBA), and a digit written inside a drawn box.

Used by the tests and benchmarks only (import it as `benchmarks.userlike` from the repository root, or as
`userlike` from a script in benchmarks/).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# What fraction of the pictures gets each encoding (cumulative thresholds drawn against one uniform number).
KINDS = (
    (0.50, "jpeg-rgb"),
    (0.65, "jpeg-gray"),
    (0.77, "png-rgb"),
    (0.85, "png-gray"),
    (0.90, "png-gray16"),
    (0.95, "png-rgba-cutout"),
    (1.00, "png-rgba-canvas"),
)


@dataclass
class Render:
    """One rendered picture: encoded bytes, file format ("jpeg" or "png") and how it was made."""

    data: bytes
    format: str
    kind: str


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _ink_map(digit: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The MNIST digit as pen strokes: scaled to size x size, edges sharpened, slightly rotated."""
    up = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
    angle = float(rng.uniform(-8, 8))
    up = up.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0)
    u = np.asarray(up, dtype=np.float32) / 255.0
    # MNIST's soft grey edges become a pen's sharper ones; the threshold also varies the stroke width a bit.
    low = float(rng.uniform(0.25, 0.45))
    return _smoothstep((u - low) / 0.3)


def _low_frequency(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field in about [-1, 1] (paper texture, uneven lighting)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)


def _lighting(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A brightness gradient across the page and, usually, a soft shadow (a hand or a phone)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    along = np.cos(theta) * xs + np.sin(theta) * ys
    along = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    light = 1.0 - float(rng.uniform(0.1, 0.4)) * along
    if rng.random() < 0.7:
        # A half-plane through a random point, with a penumbra 5-20% of the picture wide.
        phi = rng.uniform(0, 2 * np.pi)
        py, px = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        distance = np.cos(phi) * (xs - px) + np.sin(phi) * (ys - py)
        soft = float(rng.uniform(0.05, 0.2)) * min(h, w)
        depth = float(rng.uniform(0.15, 0.45))
        light = light * (1.0 - depth * _smoothstep(distance / soft + 0.5))
    return light.astype(np.float32)


def _specks(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A few dots of dirt or pencil, radius 1-3 px."""
    out = np.zeros((h, w), dtype=np.float32)
    ys, xs = np.ogrid[0:h, 0:w]
    for _ in range(int(rng.integers(0, 6))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, 3)
        out = np.maximum(out, ((ys - cy) ** 2 + (xs - cx) ** 2 <= r * r) * float(rng.uniform(0.3, 0.8)))
    return out


def _place(ink: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Put the strokes somewhere on an h x w page, off-centre, keeping a margin of at least 4%."""
    rows, cols = np.nonzero(ink > 0.05)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    tile = ink[top:bottom, left:right]
    th, tw = tile.shape
    my, mx = int(0.04 * h), int(0.04 * w)
    y = int(rng.integers(my, max(my + 1, h - th - my)))
    x = int(rng.integers(mx, max(mx + 1, w - tw - mx)))
    page = np.zeros((h, w), dtype=np.float32)
    region = page[y : y + th, x : x + tw]
    region[...] = tile[: region.shape[0], : region.shape[1]]
    return page


def render(digit: np.ndarray, rng: np.random.Generator) -> Render:
    """One MNIST digit (28, 28) uint8 -> a user-like picture, encoded."""
    h, w = int(rng.integers(200, 601)), int(rng.integers(200, 601))
    box = float(rng.uniform(0.4, 0.7)) * min(h, w)  # the digit's 20 px box becomes this many px
    ink = _place(_ink_map(digit, int(round(box * 28 / 20)), rng), h, w, rng)
    pick = rng.random()
    kind = next(name for limit, name in KINDS if pick < limit)

    if kind == "png-rgba-canvas":
        # A drawing app's export: ink colour everywhere, the strokes in the alpha channel, no paper.
        colour = rng.uniform(0.0, 0.25, size=3)
        rgb = np.broadcast_to(colour, (h, w, 3))
        rgba = np.dstack([rgb, ink])
        return Render(_encode(rgba, "PNG", "RGBA", rng), "png", kind)

    paper = float(rng.uniform(0.72, 0.95))
    ink_level = float(rng.uniform(0.05, 0.3))
    texture = 0.025 * _low_frequency(h, w, 24, rng)
    page = paper + texture
    value = page * (1 - ink) + ink_level * ink  # (h, w) brightness before lighting
    value = np.minimum(value, 1 - _specks(h, w, rng) * (1 - ink_level))
    if rng.random() < 0.2 and kind != "png-rgba-cutout":  # a scan app's crop leaves no table
        # The table beyond the page's edge along one side, never reaching the digit.
        rows, cols = np.nonzero(ink > 0.05)
        side = int(rng.integers(4))
        room = [rows.min(), h - 1 - rows.max(), cols.min(), w - 1 - cols.max()][side]
        depth = int(min(rng.uniform(0.02, 0.07) * (h if side < 2 else w), room - 0.02 * min(h, w)))
        if depth >= 2:
            table = float(rng.uniform(0.05, 0.35))
            edge = [np.s_[:depth, :], np.s_[-depth:, :], np.s_[:, :depth], np.s_[:, -depth:]][side]
            value[edge] = table
    tint = np.array([1.0, rng.uniform(0.96, 1.0), rng.uniform(0.88, 1.0)], dtype=np.float32)  # warm paper
    ink_tint = rng.uniform(0.6, 1.4, size=3).astype(np.float32)  # black, blue-ish or brown-ish ink
    colour = value[..., None] * (tint * (1 - ink[..., None]) + ink_tint * ink[..., None])
    colour = colour * _lighting(h, w, rng)[..., None]
    colour = colour + float(rng.uniform(0.005, 0.03)) * rng.standard_normal(colour.shape, dtype=np.float32)
    colour = np.clip(colour, 0.0, 1.0)

    if kind == "jpeg-rgb":
        return Render(_encode(colour, "JPEG", "RGB", rng), "jpeg", kind)
    if kind == "jpeg-gray":
        return Render(_encode(colour, "JPEG", "L", rng), "jpeg", kind)
    if kind == "png-rgb":
        return Render(_encode(colour, "PNG", "RGB", rng), "png", kind)
    if kind == "png-gray":
        return Render(_encode(colour, "PNG", "L", rng), "png", kind)
    if kind == "png-gray16":
        return Render(_encode(colour, "PNG", "I;16", rng), "png", kind)
    # A scan app's crop: the page a quadrilateral (corners pulled in, never into the digit), the corners
    # beyond it transparent.
    rows, cols = np.nonzero(ink > 0.05)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()

    def inward(limit: int, edge: int) -> float:
        return float(rng.uniform(0, max(0.0, min(0.15 * edge, limit))))

    corners = [
        (inward(left, w), inward(top, h)),
        (w - inward(w - 1 - right, w), inward(top, h)),
        (w - inward(w - 1 - right, w), h - inward(h - 1 - bottom, h)),
        (inward(left, w), h - inward(h - 1 - bottom, h)),
    ]
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(corners, fill=255)
    alpha = np.asarray(mask, dtype=np.float32) / 255.0
    return Render(_encode(np.dstack([colour * alpha[..., None], alpha]), "PNG", "RGBA", rng), "png", kind)


def _encode(pixels: np.ndarray, fmt: str, mode: str, rng: np.random.Generator) -> bytes:
    """Float pixels in [0, 1] -> encoded bytes (JPEG quality 60-92)."""
    buffer = io.BytesIO()
    if mode == "I;16":
        gray = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        image = Image.fromarray(np.rint(gray * 65535).astype(np.uint16))
    else:
        u8 = np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
        image = Image.fromarray(u8[..., :3] if mode in ("RGB", "L") else u8)
        if mode == "L":
            image = image.convert("L")
    # PNGs at zlib level 1: 5x faster to write, the same pixels.
    options = {"quality": int(rng.integers(60, 93))} if fmt == "JPEG" else {"compress_level": 1}
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def make_userlike(images: np.ndarray, seed: int = 0, start: int = 0, workers: int = 1) -> Iterator[Render]:
    """Render MNIST images (N, 28, 28) uint8 as user-like pictures; image i is seeded by (seed, start + i).

    workers > 1 renders on that many threads (numpy and Pillow release the GIL: about 2x on 2 cores), in
    order, with every picture held in memory until it is consumed.
    """

    def one(i: int) -> Render:
        return render(np.asarray(images[i], dtype=np.uint8), np.random.default_rng([seed, start + i]))

    if workers <= 1:
        yield from map(one, range(len(images)))
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(one, range(len(images)))


# ----------------------------------------------------------------------------------------------------------
# Hard variants: the pictures that defeated the first preprocessing (see docs/preprocessing.md)
# ----------------------------------------------------------------------------------------------------------


def _strokes(digit: np.ndarray, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """The digit as pen strokes (float in [0, 1], ink = 1), cropped tight to its ink."""
    ink = _ink_map(digit, size or int(rng.integers(120, 280)), rng)
    rows, cols = np.nonzero(ink > 0.05)
    return ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _paper(ink: np.ndarray, rng: np.random.Generator, pen: float | None = None, noise: float = 0.01) -> Image.Image:
    """Dark ink on light paper, a little sensor noise, grayscale."""
    paper = float(rng.uniform(0.85, 1.0))
    pen = float(rng.uniform(0.0, 0.25)) if pen is None else pen
    value = paper * (1 - ink) + pen * ink + noise * rng.standard_normal(ink.shape)
    return Image.fromarray(np.rint(np.clip(value, 0, 1) * 255).astype(np.uint8))


def tight_crop(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Cropped to the ink's bounding box: strokes touch all four edges (a cut-out, a tight selection)."""
    return _paper(_strokes(digit, rng), rng)


def stretched(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Stretched to fill a square box (aspect ratio changed), as some forms and apps do."""
    ink = _strokes(digit, rng)
    side = int(max(ink.shape) * rng.uniform(0.9, 1.1))
    ink = np.asarray(Image.fromarray(ink).resize((side, side), Image.Resampling.BILINEAR))
    return _paper(np.clip(ink, 0, 1), rng)


def _binary_scan(digit: np.ndarray, rng: np.random.Generator, cells: int) -> Image.Image:
    """Binary cells x cells scan (the digit fills the box vertically, as NIST's forms), enlarged with nearest
    neighbour to 96-160 px: blocky, hard-edged, dark on white."""
    ink = _strokes(digit, rng, size=112)
    h, w = ink.shape
    width = max(1, round(cells * w / h))
    small = np.asarray(Image.fromarray(ink).resize((min(cells, width), cells), Image.Resampling.BOX))
    box = np.zeros((cells, cells), np.float32)
    left = (cells - small.shape[1]) // 2
    box[:, left : left + small.shape[1]] = small > float(rng.uniform(0.3, 0.45))
    side = int(rng.integers(96, 161))
    u8 = np.rint((1 - box) * 255).astype(np.uint8)
    return Image.fromarray(u8).resize((side, side), Image.Resampling.NEAREST)


def binary16(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    return _binary_scan(digit, rng, 16)


def binary8(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    return _binary_scan(digit, rng, 8)


def _grow(ink: np.ndarray, radius: int) -> np.ndarray:
    """A max filter of the given radius (Pillow's, so this file needs no SciPy)."""
    image = Image.fromarray(np.rint(ink * 255).astype(np.uint8))
    return np.asarray(image.filter(ImageFilter.MaxFilter(2 * radius + 1)), dtype=np.float32) / 255.0


def thick_marker(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A felt marker: strokes 2-3x MNIST's width, on a page with margins."""
    ink = _strokes(digit, rng, size=int(rng.integers(120, 200)))
    ink = _grow(np.pad(ink, 12), int(rng.integers(4, 8)))
    margin = int(rng.integers(10, 60))
    return _paper(np.pad(ink, margin), rng)


def faint_pencil(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A hard pencil: grey strokes only 15-30% darker than the paper, some noise."""
    ink = np.pad(_strokes(digit, rng), int(rng.integers(10, 60)))
    paper = float(rng.uniform(0.8, 0.95))
    return _paper(ink, rng, pen=paper * float(rng.uniform(0.7, 0.85)), noise=0.015)


def _white_strokes(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White strokes' coverage (float, antialiased) on a canvas with a margin of 0-40 px (0: the canvas was
    cropped to the drawing)."""
    margin = int(rng.integers(0, 40)) if rng.random() < 0.5 else 0
    return np.pad(_strokes(digit, rng), margin)


def white_on_transparent_rgba(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """White strokes on a transparent canvas (RGBA, antialiased alpha), as a drawing program exports."""
    ink = _white_strokes(digit, rng)
    alpha = np.rint(ink * 255).astype(np.uint8)
    return Image.fromarray(np.dstack([np.full((*ink.shape, 3), 255, np.uint8), alpha]), "RGBA")


def white_on_transparent_palette(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """White strokes on a transparent canvas saved as a palette ("P") PNG with one transparent index, as
    drawing programs save them: the strokes' antialiased rims are blended into the canvas colour (black or
    white) and stored as opaque grey entries; only the canvas itself is transparent."""
    ink = _white_strokes(digit, rng)
    canvas = int(rng.choice([0, 0, 255]))
    levels = np.rint(ink * 4).astype(np.uint8)  # 0: transparent canvas, 1..4: a quarter to full coverage
    palette = [canvas] * 3
    for level in range(1, 5):
        palette += [round(255 * level / 4 + canvas * (1 - level / 4))] * 3
    image = Image.fromarray(levels, "P")
    image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    return Image.open(io.BytesIO(buffer.getvalue()))


def boxed(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Written inside a form's box and cut out: box lines on all four sides, touching the digit or near it,
    the picture cut at the box or a little outside it."""
    ink = _strokes(digit, rng)
    h, w = ink.shape
    gap_y, gap_x = (int(rng.integers(0, 0.12 * h + 1)) for _ in range(2))
    gap_x += max(0, (h - w) // 2) if rng.random() < 0.7 else 0  # form boxes are about square
    line = int(rng.integers(2, 6))
    outside = int(rng.integers(0, 10))
    size_y, size_x = h + 2 * (gap_y + line + outside), w + 2 * (gap_x + line + outside)
    page = np.zeros((size_y, size_x), np.float32)
    page[outside + line + gap_y : outside + line + gap_y + h, outside + line + gap_x : outside + line + gap_x + w] = ink
    box = np.zeros_like(page)
    box[outside : size_y - outside, outside : size_x - outside] = 1.0
    box[outside + line : size_y - outside - line, outside + line : size_x - outside - line] = 0.0
    level = float(rng.uniform(0.0, 0.5))  # the box's lines: black, or grey (a printed form)
    value = np.minimum(1 - page, 1 - box * (1 - level))
    value = value * float(rng.uniform(0.88, 1.0)) + 0.01 * rng.standard_normal(value.shape)
    return Image.fromarray(np.rint(np.clip(value, 0, 1) * 255).astype(np.uint8))


Variant = Callable[[np.ndarray, np.random.Generator], Image.Image]


def hard_variants() -> dict[str, Variant]:
    """name -> function(digit (28, 28) uint8, rng) -> PIL image, one per kind of hard picture."""
    return {
        "tight-crop": tight_crop,
        "stretched": stretched,
        "binary16": binary16,
        "binary8": binary8,
        "thick-marker": thick_marker,
        "faint-pencil": faint_pencil,
        "white-on-transparent-rgba": white_on_transparent_rgba,
        "white-on-transparent-palette": white_on_transparent_palette,
        "boxed": boxed,
    }


def make_hard(images: np.ndarray, name: str, seed: int = 0, start: int = 0) -> Iterator[Image.Image]:
    """The `name` variant of each image; image i is seeded by (seed, variant, start + i)."""
    variant = hard_variants()[name]
    key = sorted(hard_variants()).index(name)
    for i, digit in enumerate(images):
        yield variant(np.asarray(digit, dtype=np.uint8), np.random.default_rng([seed, 1000 + key, start + i]))
