"""A cross-domain test set: digits 0-9 rendered with handwriting-style fonts from Debian packages.

Not MNIST, not tuned on: a development/test set to measure how well a model reads handwriting it was not
trained on. Each font in FONT_PACKAGES renders every digit several times, varying size, slant (shear),
stroke width, a small rotation, ink darkness and one of three presentations (the `styles` list):

    tight   a tight crop, ink touching all four edges
    box     inside a drawn rectangle with some margin, as in a box on a paper form
    scan16  reduced to 16x16, binarised, enlarged back with NEAREST (blocky, like a low-resolution scan)

Dark ink on white paper, grayscale ("L") PIL images of about 64-160 px. Everything is drawn from one
numpy Generator, so the same seed and fonts give the same pixels.

    python -m benchmarks.font_digits docs/img/font-digits.png          # contact sheet + fonts and counts
    python -m benchmarks.font_digits /tmp/sheet.png --seed 1 --per-font-digit 10

The fonts are installed by `apt-get install` of the packages in FONT_PACKAGES (CI does it, see .ci/run).
"""

from __future__ import annotations

import argparse
import collections
import functools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Debian package -> the font files of it that are used. Picked by looking at every digit of every candidate:
# legible, handwriting-like digits, several with flagged 1s and crossed 7s. Left out: fonts-ecolier-court
# (copperplate hairlines that vanish when thinned or reduced to 16 px), fonts-femkeklaver
# (hollow outline glyphs), fonts-cabinsketch (hatched fill), fonts-levien-typoscript (no digits), setofont-ex
# (blank digits), fonts-kristi (its 4 reads as a 9), fonts-joscelyn (digits with long flourishes into the
# neighbours), fonts-comic-neue / fonts-lobster / fonts-leckerli-one (typeset display faces), fonts-klee,
# fonts-kiloji, fonts-seto, fonts-yusei-magic (large CJK packages, their digits add nothing the others lack).
FONT_PACKAGES: dict[str, tuple[str, ...]] = {
    "fonts-dkg-handwriting": ("dkg.ttf",),
    "fonts-breip": ("breipfont.ttf",),
    "fonts-bwht": ("BecauseWeLearn-Regular.otf",),
    "fonts-rufscript": ("Rufscript010.ttf",),
    "fonts-sjfonts": ("Delphine.ttf", "SteveHand.ttf"),
    "fonts-tomsontalks": ("TomsonTalks.ttf",),
    "fonts-dancingscript": ("DancingScript-Regular.otf",),
    "fonts-kaushanscript": ("KaushanScript-Regular.otf",),
    "fonts-tlwg-purisa-otf": ("Purisa.otf",),
    "fonts-havana": ("Havana-Regular.otf",),
}

FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))
STYLES = ("tight", "box", "scan16")
DIGITS = "0123456789"
INK_THRESHOLD = 128  # a pixel darker than this is ink (for crops and for the checks of the tests)


def _package_files(package: str) -> list[Path]:
    """The files dpkg says `package` installed; [] without dpkg or when the package is not installed."""
    if shutil.which("dpkg-query") is None:
        return []
    result = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, check=False)
    return [Path(line) for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []


def find_fonts() -> list[Path]:
    """The chosen font files of FONT_PACKAGES that are installed and have all ten digits, in FONT_PACKAGES order.

    Looks in the file lists of the Debian packages (dpkg), and, for systems without dpkg, under FONT_DIRS.
    """
    found: list[Path] = []
    for package, names in FONT_PACKAGES.items():
        files = _package_files(package)
        for name in names:
            candidates = [f for f in files if f.name == name and f.is_file()]
            if not candidates:
                candidates = sorted(p for d in FONT_DIRS if d.is_dir() for p in d.rglob(name) if p.is_file())
            if candidates and has_digits(candidates[0]):
                found.append(candidates[0])
    return found


def has_digits(path: Path) -> bool:
    """Whether the font draws each of 0-9 as a glyph of its own (not blank, not the missing-glyph box)."""
    try:
        font = ImageFont.truetype(str(path), 48)
    except OSError:
        return False
    missing = _glyph_mask(font, "\ue000")  # a private-use code point: the .notdef box (or nothing)
    masks = [_glyph_mask(font, d) for d in DIGITS]
    if any(
        m is None or (missing is not None and m.shape == missing.shape and np.array_equal(m, missing)) for m in masks
    ):
        return False
    return len({m.tobytes() + bytes(m.shape) for m in masks}) == len(DIGITS)


def _glyph_mask(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray | None:
    mask = font.getmask(char)
    if mask.size[0] == 0 or mask.size[1] == 0:
        return None
    arr = np.asarray(mask, dtype=np.uint8).reshape(mask.size[1], mask.size[0])
    return arr if arr.max() > 0 else None


def ink_bbox(image: Image.Image, threshold: int = INK_THRESHOLD) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels darker than threshold, or None when there are none."""
    arr = np.asarray(image)
    rows, cols = np.nonzero((arr < threshold).any(axis=1))[0], np.nonzero((arr < threshold).any(axis=0))[0]
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _draw_glyph(font_path: Path, digit: str, size: int, stroke: int = 0) -> Image.Image:
    """The digit, black on white, its outline widened by `stroke` px, with a few pixels of paper around it."""
    font = ImageFont.truetype(str(font_path), size)
    left, top, right, bottom = font.getbbox(digit, stroke_width=stroke)
    pad = 6
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 255)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), digit, font=font, fill=0, stroke_width=stroke, stroke_fill=0)
    return canvas


def _faint_fraction(image: Image.Image) -> float:
    """The fraction of the inked pixels that are light (hairlines drawn thinner than a pixel or two)."""
    arr = np.asarray(image)
    inked = int((arr < 230).sum())
    return 1.0 - int((arr < INK_THRESHOLD).sum()) / inked if inked else 0.0


@functools.cache
def _probe_height(font_path: Path, digit: str) -> int:
    """The ink height in pixels of the digit drawn at size 100."""
    box = ink_bbox(_draw_glyph(font_path, digit, 100))
    return max(1, box[3] - box[1]) if box else 70


def stroke_width(image: Image.Image, threshold: int = INK_THRESHOLD) -> float:
    """The mean stroke width of the ink in pixels, estimated as 2 * area / boundary length (0 without ink)."""
    ink = np.asarray(image) < threshold
    area = int(ink.sum())
    if area == 0:
        return 0.0
    padded = np.pad(ink, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    boundary = int((ink & ~interior).sum())
    return 2.0 * area / max(boundary, 1)


def _render_glyph(font_path: Path, digit: str, rng: np.random.Generator) -> Image.Image:
    """One varied rendering of the digit, tightly cropped: size, stroke, slant, rotation, ink darkness."""
    height = int(rng.integers(64, 161))  # the glyph's target height in pixels
    stroke = int(rng.choice([-1, 0, 0, 1, 2]))  # thinner, as drawn, thicker, thicker still
    shear = float(rng.uniform(-0.35, 0.35))
    angle = float(rng.uniform(-12.0, 12.0))
    ink = int(rng.integers(0, 61))

    size = max(8, round(100 * height / _probe_height(font_path, digit)))
    # Stroke: a pen's width at least (hairlines of copperplate school fonts are widened until they are no
    # longer faint), then thinner (MaxFilter: the ink is dark) or thicker (a wider outline).
    base = 0
    image = _draw_glyph(font_path, digit, size)
    while _faint_fraction(image) > 0.2 and base < 4:
        base += 1
        image = _draw_glyph(font_path, digit, size, base)
    if stroke < 0:
        # Thinner only where no stroke vanishes: thickening the thinned ink back must cover the original ink.
        size_filter = 3 if height < 110 else 5
        thinner = image.filter(ImageFilter.MaxFilter(size_filter))
        restored = np.asarray(thinner.filter(ImageFilter.MinFilter(size_filter))) < INK_THRESHOLD
        inked = np.asarray(image) < INK_THRESHOLD
        if (inked & ~restored).sum() <= 0.03 * inked.sum():
            image = thinner
    elif stroke > 0:
        image = _draw_glyph(font_path, digit, size, base + stroke * max(1, round(height / 60)))

    # Slant (x' = x - shear * (y - h/2), so positive shear leans the top to the right), then rotation.
    w, h = image.size
    extra = int(np.ceil(abs(shear) * h / 2)) + 2
    image = image.transform(
        (w + 2 * extra, h),
        Image.Transform.AFFINE,
        (1.0, shear, -extra - shear * h / 2, 0.0, 1.0, 0.0),
        resample=Image.Resampling.BICUBIC,
        fillcolor=255,
    )
    image = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=255)

    # Ink darkness: black -> ink, white stays paper white.
    arr = np.asarray(image, dtype=np.float32)
    arr = ink + (255.0 - ink) * arr / 255.0
    image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")

    box = ink_bbox(image)
    if box is None:
        raise ValueError(f"{font_path.name}: digit {digit} rendered without ink")
    return image.crop(box)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of an array of grays 0-255: the one that best separates the two classes."""
    hist = np.bincount(np.clip(np.rint(values), 0, 255).astype(np.int64).ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(hist * levels)
    mean0 = sum0 / np.maximum(weight0, 1e-9)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1e-9)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(np.argmax(between)) + 0.5


def _fit(glyph: Image.Image, max_w: int, max_h: int) -> Image.Image:
    """The glyph scaled down (never up) to fit max_w x max_h, keeping its aspect ratio."""
    scale = min(max_w / glyph.width, max_h / glyph.height, 1.0)
    if scale >= 1.0:
        return glyph
    size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
    return glyph.resize(size, Image.Resampling.LANCZOS)


def _present_tight(glyph: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The crop itself, scaled down if taller than 160 px; re-cropped so that ink touches all four edges."""
    image = _fit(glyph, 160, 160)
    box = ink_bbox(image)
    return image.crop(box) if box else image


def _present_box(glyph: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The digit inside a drawn rectangle, with a margin between digit and box and a little paper outside."""
    glyph = _fit(glyph, 100, 100)
    margin_x = int(rng.integers(6, 21))
    margin_y = int(rng.integers(6, 21))
    line = int(rng.integers(1, 4))
    outside = int(rng.integers(2, 7))
    box_w = max(64, glyph.width + 2 * margin_x + 2 * line)  # at least 64 px a side, like a field on a form
    box_h = max(64, glyph.height + 2 * margin_y + 2 * line)
    if rng.random() < 0.5:  # half of the boxes square
        box_w = box_h = max(box_w, box_h)
    image = Image.new("L", (box_w + 2 * outside, box_h + 2 * outside), 255)
    shade = int(rng.integers(0, 90))
    ImageDraw.Draw(image).rectangle(
        (outside, outside, outside + box_w - 1, outside + box_h - 1), outline=shade, width=line
    )
    # The digit in the middle half of the free room inside the box, so never touching the frame.
    free_x = box_w - 2 * line - glyph.width
    free_y = box_h - 2 * line - glyph.height
    x = outside + line + int(rng.integers(free_x // 4, free_x - free_x // 4 + 1))
    y = outside + line + int(rng.integers(free_y // 4, free_y - free_y // 4 + 1))
    image.paste(glyph, (x, y))
    return image


def _present_scan16(glyph: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The digit reduced to 16x16 (with a 1-2 px margin), binarised, and enlarged with NEAREST to 96-160 px."""
    margin = int(rng.integers(1, 3))
    inner = 16 - 2 * margin
    side = max(glyph.width, glyph.height)
    square = Image.new("L", (side, side), 255)
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    # Widen every stroke by about a third of a cell first (ink spread on a coarse scan), so that the thin
    # strokes of contrasted script fonts do not break up.
    half = round(side / inner / 6)
    if half >= 1:
        square = square.filter(ImageFilter.MinFilter(2 * half + 1))
    small = square.resize((inner, inner), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.float32)
    # Binarise at Otsu's threshold of the reduced grays (thin strokes give light grays, and a fixed threshold
    # would break them up), moved by a random -15..+15 (lighter or heavier scans).
    threshold = otsu_threshold(arr) + float(rng.uniform(-15.0, 15.0))
    threshold = min(max(threshold, 40.0), 245.0)
    binary = np.where(arr < threshold, 0, 255).astype(np.uint8)
    page = np.full((16, 16), 255, dtype=np.uint8)
    page[margin : margin + inner, margin : margin + inner] = binary
    scale = int(rng.integers(6, 11))  # 96-160 px
    return Image.fromarray(page, "L").resize((16 * scale, 16 * scale), Image.Resampling.NEAREST)


_PRESENT = {"tight": _present_tight, "box": _present_box, "scan16": _present_scan16}


def render_set(
    fonts: list[Path] | None = None, seed: int = 0, per_font_digit: int = 27
) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """Render every digit per_font_digit times with every font: (images, labels, styles).

    Order: font by font (in the order given), then digit 0-9, then the per_font_digit renderings, so image i
    is of fonts[i // (10 * per_font_digit)]; each image's `info` also holds "font" (the file name),
    "digit" and "style". The presentations cycle through STYLES within each font and digit (every style is
    present for each font and digit once per_font_digit >= 3), in an order shuffled by the seed.
    Default: find_fonts(), 27 per font and digit (2970 images with the 11 fonts).
    """
    if fonts is None:
        fonts = find_fonts()
    if per_font_digit < 1:
        raise ValueError(f"per_font_digit must be >= 1, got {per_font_digit}")
    rng = np.random.default_rng(seed)
    images: list[Image.Image] = []
    labels: list[int] = []
    styles: list[str] = []
    for font_path in fonts:
        font_path = Path(font_path)
        for digit in range(10):
            offset = int(rng.integers(0, len(STYLES)))
            for k in range(per_font_digit):
                style = STYLES[(k + offset) % len(STYLES)]
                glyph = _render_glyph(font_path, str(digit), rng)
                image = _PRESENT[style](glyph, rng)
                image.info.update(font=font_path.name, digit=digit, style=style)
                images.append(image)
                labels.append(digit)
                styles.append(style)
    return images, np.asarray(labels, dtype=np.int64), styles


def contact_sheet(fonts: list[Path], seed: int = 0, cell: int = 40) -> Image.Image:
    """One row per font: digits 0-9 in each of the three presentations, each fitted into a cell."""
    label_w = 190
    columns = 10 * len(STYLES)
    gap = 6
    sheet = Image.new("L", (label_w + columns * cell + (len(STYLES) - 1) * gap, 18 + len(fonts) * cell), 255)
    draw = ImageDraw.Draw(sheet)
    for s, style in enumerate(STYLES):
        draw.text((label_w + s * (10 * cell + gap) + 2, 3), style, fill=0)
    images, labels, styles = render_set(fonts, seed=seed, per_font_digit=len(STYLES))
    for row, font_path in enumerate(fonts):
        y = 18 + row * cell
        draw.text((4, y + cell // 2 - 6), Path(font_path).name, fill=0)
        for i in range(row * 10 * len(STYLES), (row + 1) * 10 * len(STYLES)):
            s = STYLES.index(styles[i])
            thumb = images[i].copy()
            thumb.thumbnail((cell - 4, cell - 4), Image.Resampling.LANCZOS)
            x = label_w + s * (10 * cell + gap) + int(labels[i]) * cell
            sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        draw.line((0, y + cell - 1, sheet.width, y + cell - 1), fill=220)
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.font_digits", description=__doc__.split("\n")[0])
    parser.add_argument("sheet", type=Path, help="where to write the contact sheet PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-font-digit", type=int, default=27, help="renderings per font and digit")
    args = parser.parse_args(argv)
    fonts = find_fonts()
    if not fonts:
        print("no font found; install: apt-get install " + " ".join(FONT_PACKAGES), file=sys.stderr)
        return 1
    print(f"{len(fonts)} fonts:")
    for path in fonts:
        print(f"  {path}")
    missing = [n for names in FONT_PACKAGES.values() for n in names if n not in {p.name for p in fonts}]
    if missing:
        print(f"not found: {', '.join(missing)}")
    images, labels, styles = render_set(fonts, seed=args.seed, per_font_digit=args.per_font_digit)
    sizes = np.array([im.size for im in images])
    print(f"{len(images)} images, sizes {sizes.min(axis=0).tolist()} to {sizes.max(axis=0).tolist()} (w, h)")
    print("per style: " + ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(styles).items())))
    print("per digit: " + ", ".join(f"{d} {int((labels == d).sum())}" for d in range(10)))
    args.sheet.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(fonts, seed=args.seed).save(args.sheet)
    print(f"contact sheet: {args.sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
