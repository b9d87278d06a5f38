"""Turn any picture of one handwritten digit into the 28x28 image an MNIST model expects.

MNIST digits are white ink on black, size-normalised so the longer side fits a 20x20 box (anti-aliased) and
pasted into 28x28 with their centre of mass at the centre. A phone photo is dark ink on grey paper,
off-centre, unevenly lit and large. `preprocess` bridges the two, step by step (see docs/preprocessing.md):

    1. grayscale (alpha composited over a background chosen so the drawing stays visible)
    2. shrink to at most WORK_SIZE px on the longer side (the steps below need no more detail)
    3. polarity: is the ink darker or lighter than the background? make ink bright
    4. flatten lighting: divide by (dark ink) or subtract (light ink) a background estimated by a
       morphological closing/opening far wider than a pen stroke, so gradients and shadows vanish
    5. suppress paper texture and noise: a small blur, then a soft threshold above the noise level
    6. find the digit: connected pieces of ink; drop specks, box lines and page edges (ink at the border is
       a page edge only if the rest of the ink stops short of the opposite side), keep the biggest piece and
       the pieces near it
    7. crop to it; thicken strokes much thinner than MNIST's, thin those much thicker
    8. scale the longer side to 20 px (aspect ratio kept, anti-aliased), paste into 28x28 with the centre
       of mass at pixel (14, 14), as MNIST was made

Images that are already MNIST-like (28x28, dark background, bright ink, centred, digit-sized) pass through
unchanged, so MNIST's own images (from an IDX or PNG file) reach the model exactly as in training.
Only numpy, Pillow and scipy.ndimage are used (no torch), so the ONNX Runtime path can preprocess without
PyTorch.
Everything here is a function of its input alone (no caches, no shared buffers): safe to call from many
threads at once.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from .errors import DigitlabError, first_line

MAX_PIXELS = 40_000_000  # decompression-bomb guard: larger images are refused before they are decoded
WORK_SIZE = 512  # longer side of the working image; a digit needs no more
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MNIST_SIZE = 28
BOX_SIZE = 20  # MNIST's size-normalisation box
CENTRE = 14  # MNIST puts the centre of mass at pixel index (14, 14) (measured: 13.5..14.5 on all 10,000)

# Noise and ink levels, as fractions of the paper's brightness.
MIN_INK_CONTRAST = 0.06  # ink must be at least 6% darker (or lighter) than the paper around it (faint pencil
# on grey paper measures 8-10%; the noise test beside this check is what tells ink from paper texture)
NOISE_SIGMAS = 4.0  # the soft threshold starts this many noise standard deviations above the paper
MIN_NOISE_FLOOR = 0.04
# MNIST's strokes: (ink area / boundary pixels) / longer side is 0.053..0.111 (5th..95th percentile, median
# 0.072). Thinner strokes (a ballpoint pen in a large photo) are thickened to THICKEN_TO before scaling.
THIN_STROKE = 0.035
THICKEN_TO = 0.05  # lands near MNIST's median once the soft edges are counted
# Strokes much thicker than MNIST's (a marker, a bold binary scan, a small digit drawn with a big brush)
# are thinned to THIN_TO: beyond MNIST's 95th percentile they fill loops and read as blobs once scaled.
THICK_STROKE = 0.13
THIN_TO = 0.10
FLAT_PAPER = 0.06  # paper whose brightness varies less than this (10th..90th percentile) is evenly lit
MARGIN = 0.2  # MNIST's 20-px digit has 4 px of margin each side: 20% of the digit's size
BACKGROUND_WINDOW = 0.16  # the background filter's window, as a fraction of the picture's longer side


class ImageError(DigitlabError):
    """A file or buffer that is not a usable image: the message names the input and the defect."""


class PreprocessError(DigitlabError):
    """An image that decodes but holds no digit to read (blank, uniform, empty)."""


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _signature(raw: bytes) -> str | None:
    """The format a file claims by its first bytes, to tell a damaged image from a non-image."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in SIGNATURES.items() if raw.startswith(magic)), None)


def _too_large(name: str, width: int, height: int) -> ImageError:
    return ImageError(
        f"{name}: image too large: {width}x{height} = {width * height / 1e6:.1f} megapixels "
        f"(the limit is {MAX_PIXELS / 1e6:.0f} megapixels)"
    )


def load_image(source: str | Path | bytes | io.IOBase, name: str | None = None) -> Image.Image:
    """Open and decode an image file or encoded bytes: first frame, EXIF orientation applied, size-checked.

    Raises ImageError (naming the input) for a missing, empty, non-image, truncated, corrupt or too large
    (over MAX_PIXELS) input. The pixel count is checked from the header, before anything is decoded.
    """
    if isinstance(source, (str, Path)):
        name = name or str(source)
        path = Path(source)
        if path.is_dir():
            raise ImageError(f"{name}: is a directory, not an image")
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{name}: file not found") from None
        except OSError as exc:
            raise ImageError(f"{name}: cannot read: {exc.strerror or exc}") from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        raw = bytes(source)
    elif hasattr(source, "read"):
        name = name or getattr(source, "name", None) or "<stream>"
        raw = source.read()
    else:
        raise ImageError(f"{name or '<input>'}: expected a path or encoded image bytes, got {type(source).__name__}")
    if not raw:
        raise ImageError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            # Pillow warns above 89 megapixels; our own, lower limit below gives the user the clear message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        kind = _signature(raw)
        if kind:
            raise ImageError(f"{name}: corrupt {kind} data (the header cannot be decoded)") from None
        raise ImageError(f"{name}: not an image (unrecognised format, {len(raw)} bytes)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image too large (over {MAX_PIXELS / 1e6:.0f} megapixels, the limit)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"{name}: corrupt image header ({first_line(exc, 100)})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise _too_large(name, width, height)
    if width == 0 or height == 0:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    try:
        image.seek(0)  # GIF, multi-page TIFF: the first frame
        image.load()
        image = ImageOps.exif_transpose(image) or image
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error) as exc:
        raise ImageError(f"{name}: truncated or corrupt image data ({first_line(exc, 100)})") from None
    return image


# ----------------------------------------------------------------------------------------------------------
# Grayscale
# ----------------------------------------------------------------------------------------------------------


def _scale_integers(a: np.ndarray) -> np.ndarray:
    """Integer pixels to [0, 1] by their type's range (uint8 /255, uint16 /65535)."""
    if a.dtype.kind == "u" and a.dtype.itemsize == 1:
        return a.astype(np.float32) / 255.0
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:  # any byte order (Pillow's I;16B is big-endian)
        return a.astype(np.float32) / 65535.0
    top = float(a.max()) if a.size else 0.0
    # Other integer types (Pillow's mode I, int32 arrays): 8-bit range if it fits, else 16-bit.
    return a.astype(np.float32) / (255.0 if top <= 255 else 65535.0)


def _to_unit(a: np.ndarray) -> np.ndarray:
    """Any numeric array to float32 in [0, 1]."""
    if a.dtype == bool:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        return np.clip(_scale_integers(a), 0.0, 1.0)
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise PreprocessError("image has NaN or infinite pixel values")
    top = float(a.max()) if a.size else 0.0
    if top > 1.0:
        a = a / (255.0 if top <= 255.0 else top)  # floats in 0..255 (or beyond): rescale
    return np.clip(a, 0.0, 1.0)


def _luminance(channels: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) with ITU-R 601 weights, as Pillow's L conversion."""
    return channels[..., 0] * 0.299 + channels[..., 1] * 0.587 + channels[..., 2] * 0.114


def _composite(lum: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten transparency onto a background that keeps the digit visible.

    A page with transparent margins (a scan app's crop, a cut-out): the opaque part is a solid region with
    ink inside it, so the margins get the paper's colour, carried over from the nearest opaque pixels (a
    normalised blur), lighting included. Otherwise the opaque pixels are the strokes of a drawing on a
    transparent canvas: they go onto white if they are dark and onto black if they are light.
    """
    if alpha.min() >= 0.99:
        return lum
    opaque = alpha > 0.5
    if not opaque.any():
        return np.zeros_like(lum)  # nothing visible: blank
    if _opaque_is_a_page(lum, opaque):
        background = _carry_over(lum, alpha)
    else:
        background = 1.0 if float(np.average(lum, weights=alpha)) < 0.5 else 0.0
    return lum * alpha + background * (1.0 - alpha)


def _opaque_is_a_page(lum: np.ndarray, opaque: np.ndarray) -> bool:
    """Is the opaque part a page with ink on it (a scan app's crop), or pen strokes on a transparent canvas?

    A page has ink inside it, away from its transparent margins: its interior holds both paper and ink. Pen
    strokes vary in brightness only at their rims (antialiasing blended into the canvas colour, as palette
    images store it); their interior is one colour, however bold the pen or tightly cropped the canvas.
    """
    small = _shrink_to(opaque.astype(np.float32), 256) > 0.5
    # Distance to the nearest transparent pixel; the picture's own border does not count (a page may fill it).
    depth = ndimage.distance_transform_edt(np.pad(small, 1, mode="edge"))[1:-1, 1:-1]
    interior = depth > 3
    if interior.sum() < 0.05 * max(1, small.sum()):
        return False
    low, high = np.percentile(_shrink_to(lum, 256)[interior], [1, 99])
    return bool(high - low > 0.15)


def _carry_over(lum: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The opaque pixels' brightness spread smoothly into the transparent ones (normalised convolution)."""
    small_lum, small_alpha = _shrink_to(lum * alpha, 64), _shrink_to(alpha, 64)
    radius = max(2, max(small_lum.shape) // 8)
    weight = _box_blur(_box_blur(small_alpha, radius), radius)
    spread = _box_blur(_box_blur(small_lum, radius), radius) / np.maximum(weight, 1e-6)
    spread = np.where(weight > 1e-3, spread, float(np.median(lum[alpha > 0.5])))
    return _resize(spread, *lum.shape, Image.Resampling.BILINEAR)


def _pil_to_gray(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA" if (mode == "PA" or "transparency" in image.info) else "RGB")
        mode = image.mode
    elif mode in ("L", "1", "RGB") and "transparency" in image.info:
        image = image.convert("LA" if mode != "RGB" else "RGBA")
        mode = image.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        return _array_to_gray(np.asarray(image))
    if mode in ("LA", "La", "RGBA", "RGBa"):
        image = image.convert("RGBA") if mode in ("La", "RGBa") else image
        return _array_to_gray(np.asarray(image))
    return _array_to_gray(np.asarray(image.convert("RGB")))


def _array_to_gray(a: np.ndarray) -> np.ndarray:
    """HxW or HxWxC (C = 1, 2: gray+alpha, 3: RGB, 4: RGBA) -> float32 (H, W) in [0, 1]."""
    if a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4) and a.shape[0] in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels first (C, H, W) -> (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (2, 3, 4)):
        raise PreprocessError(f"expected an image of shape HxW or HxWxC (C = 1 to 4), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise PreprocessError(f"image has no pixels (shape {a.shape})")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise PreprocessError(
            f"image too large: {a.shape[1]}x{a.shape[0]} (the limit is {MAX_PIXELS / 1e6:.0f} megapixels)"
        )
    a = _to_unit(a)
    if a.ndim == 2:
        return a
    if a.shape[-1] == 2:
        return _composite(a[..., 0], a[..., 1])
    lum = _luminance(a[..., :3])
    return _composite(lum, a[..., 3]) if a.shape[-1] == 4 else lum


def to_gray(image: Any) -> np.ndarray:
    """A PIL image, numpy array (HxW, HxWxC or CxHxW) or torch tensor -> float32 (H, W) in [0, 1].

    uint8 is /255, uint16 /65535, floats above 1 are taken as 0..255; transparency is composited.
    Tensors follow torch's channels-first convention ((C, H, W), (1, C, H, W)).
    """
    if isinstance(image, Image.Image):
        return _pil_to_gray(image)
    if type(image).__module__.startswith("torch"):
        array = image.detach().cpu().numpy()
        while array.ndim > 3 and array.shape[0] == 1:
            array = array[0]  # (1, C, H, W) -> (C, H, W)
        if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4):
            array = np.moveaxis(array, 0, -1)
        return _array_to_gray(array)
    if isinstance(image, np.ndarray):
        array = image
        while array.ndim > 3 and array.shape[0] == 1:
            array = array[0]
        return _array_to_gray(array)
    raise PreprocessError(
        f"cannot read an image from a {type(image).__name__} (expected a PIL image, numpy array or torch tensor)"
    )


# ----------------------------------------------------------------------------------------------------------
# Small image operations (Pillow and scipy.ndimage): resizing, rank filters, blurs, connected components
# ----------------------------------------------------------------------------------------------------------


def _resize(a: np.ndarray, height: int, width: int, resample: int = Image.Resampling.BOX) -> np.ndarray:
    """Resize a float image with Pillow (anti-aliased when shrinking)."""
    image = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    return np.asarray(image.resize((max(1, width), max(1, height)), resample), dtype=np.float32)


def _shrink_to(a: np.ndarray, longest: int) -> np.ndarray:
    h, w = a.shape
    if max(h, w) <= longest:
        return a
    scale = longest / max(h, w)
    return _resize(a, round(h * scale), round(w * scale))


def _max_filter(a: np.ndarray, size: int) -> np.ndarray:
    """Maximum over a size x size window (edges repeat the border)."""
    return a if size <= 1 else ndimage.maximum_filter(a, size=size, mode="nearest")


def _min_filter(a: np.ndarray, size: int) -> np.ndarray:
    """Minimum over a size x size window (edges repeat the border)."""
    return a if size <= 1 else ndimage.minimum_filter(a, size=size, mode="nearest")


def _box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window (edges repeat the border)."""
    if radius < 1:
        return a
    return ndimage.uniform_filter(np.asarray(a, dtype=np.float32), size=2 * radius + 1, mode="nearest")


def _odd(n: float) -> int:
    n = max(1, int(round(n)))
    return n if n % 2 else n + 1


EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels (H, W) int32 with 0 = background, count)."""
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    return labels.astype(np.int32, copy=False), int(count)


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------


def is_mnist_like(gray: np.ndarray) -> bool:
    """28x28, dark background, bright ink, digit-sized and centred: MNIST's own format, fed as is.

    Every one of MNIST's 70,000 images passes; a 28x28 dark-on-light image, a tiny or off-centre digit
    fails and goes through the full pipeline instead.
    """
    if gray.shape != (MNIST_SIZE, MNIST_SIZE):
        return False
    ring = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if float(np.median(gray)) > 0.1 or float(ring.mean()) > 0.15 or float(gray.max()) < 0.5:
        return False
    rows, cols = np.nonzero(gray > 0.2)
    extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    mass = gray.sum()
    ys, xs = np.mgrid[0:MNIST_SIZE, 0:MNIST_SIZE]
    cy, cx = float((gray * ys).sum() / mass), float((gray * xs).sum() / mass)
    return 12 <= extent and abs(cy - CENTRE) <= 2.5 and abs(cx - CENTRE) <= 2.5


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """a moved by (dy, dx) pixels, edges repeated: out[y, x] = a[y - dy, x - dx]."""
    h, w = a.shape
    padded = np.pad(a, ((abs(dy), abs(dy)), (abs(dx), abs(dx))), mode="edge")
    return padded[abs(dy) - dy : abs(dy) - dy + h, abs(dx) - dx : abs(dx) - dx + w]


def _ink_is_dark(gray: np.ndarray) -> bool:
    """Polarity: is there more thin dark structure (valleys) or thin bright structure (ridges)?

    A pixel is in a dark valley at scale s if it is darker than both pixels s away on either side of it, in
    some direction: pen strokes are, a shadow's edge or a lighting gradient is not (one side is as dark).
    Summed over four directions' best and scales of 1 to 8 px on a copy at most 128 px wide, so the
    strokes' area and contrast decide, not the lighting.
    """
    small = _shrink_to(gray, 128)
    noise = 1.4826 * float(np.median(np.abs(small - _shift(small, 1, 0)))) / np.sqrt(2)
    floor = 3 * noise + 0.01
    # The outer 10% is left out: page edges, the table and lit slivers between them live there.
    h, w = small.shape
    inner = np.zeros_like(small)
    inner[h // 10 : h - h // 10, w // 10 : w - w // 10] = 1.0
    darker = lighter = 0.0
    # Only pixels on the ink's side of the paper count: the paper showing through a bold "0" is a bright
    # ridge between dark strokes, but no brighter than the rest of the paper (the picture's median).
    paper = float(np.median(small))
    below = (small < paper - floor).astype(np.float32) * inner
    above = (small > paper + floor).astype(np.float32) * inner
    for s in (1, 2, 4, 8):
        if 4 * s > max(small.shape):
            break
        dark = np.zeros_like(small)
        light = np.zeros_like(small)
        for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
            a, b = _shift(small, dy * s, dx * s), _shift(small, -dy * s, -dx * s)
            dark = np.maximum(dark, np.minimum(a, b) - small)
            light = np.maximum(light, small - np.maximum(a, b))
        darker += float((np.clip(dark - floor, 0, None) * below).sum())
        lighter += float((np.clip(light - floor, 0, None) * above).sum())
    return darker >= lighter


def _border_is_mostly_ink(gray: np.ndarray, dark_ink: bool) -> bool:
    """Did the polarity test mistake the paper for ink? It takes the picture's median for the paper, which is
    the ink when a bold digit fills its picture (a tight crop with more ink than paper). Then the "ink" would
    cover most of the picture's border; real strokes cross the border in short runs, even in a tight crop.
    Only evenly lit two-level pictures are checked (a page edge or a table can line a photo's border).
    """
    small = _shrink_to(gray, 128)
    low, high = np.percentile(small, [2, 98])
    middle = (low + high) / 2
    if high - low < 0.3:
        return False
    ink = small < middle if dark_ink else small > middle
    paper_side = small[~ink]
    if paper_side.size == 0 or np.percentile(paper_side, 90) - np.percentile(paper_side, 10) > FLAT_PAPER:
        return False
    ring = np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]])
    return bool(ring.mean() > 0.5 and ink.mean() > 0.4)


def _background(gray: np.ndarray, dark_ink: bool) -> np.ndarray:
    """The paper without the ink: a closing (dark ink) or opening (light ink) with a window far wider than
    a stroke, computed on a small copy and scaled back up. Large dark areas (shadows) survive a closing,
    so they count as background and are divided away.
    """
    small = _shrink_to(gray, 96)
    size = _odd(max(small.shape) * BACKGROUND_WINDOW)
    if dark_ink:
        bg = _fill_dips(_min_filter(_max_filter(small, size), size))
    else:
        bg = 1.0 - _fill_dips(1.0 - _max_filter(_min_filter(small, size), size))
    bg = _box_blur(bg, max(1, size // 4))
    return _resize(bg, *gray.shape, Image.Resampling.BILINEAR)


def _fill_dips(bg: np.ndarray) -> np.ndarray:
    """Fill the background's dark dips that do not reach the picture's border (grayscale hole filling, by
    morphological reconstruction).

    A stroke thicker than the filter's window (a marker pen, close up) leaves its middle in the background
    estimate as a dip enclosed by paper; filling it brings that ink back. Shadows and dark margins reach
    the border, so they stay.
    """
    h, w = bg.shape
    if h < 3 or w < 3:
        return bg
    marker = np.full_like(bg, bg.max())
    marker[0], marker[-1], marker[:, 0], marker[:, -1] = bg[0], bg[-1], bg[:, 0], bg[:, -1]
    for _ in range(h + w):
        # One step of reconstruction by erosion. Plain numpy slices, not scipy.ndimage.minimum_filter: on these
        # small images scipy's per-call cost makes it 4x slower (benchmarks/preprocess_speed.py).
        eroded = marker.copy()
        eroded[1:-1, 1:-1] = np.minimum.reduce(
            [marker[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        )
        new = np.maximum(eroded, bg)
        if np.array_equal(new, marker):
            break
        marker = new
    return marker


def _flatten(gray: np.ndarray, dark_ink: bool, background: np.ndarray) -> np.ndarray:
    """Ink strength in [0, 1] whatever the lighting: relative darkness below the paper, or brightness above
    a dark background."""
    if dark_ink:
        return np.clip(1.0 - gray / np.maximum(background, 0.02), 0.0, 1.0)
    return np.clip(gray - background, 0.0, 1.0)


def _paper_side(values: np.ndarray) -> np.ndarray | None:
    """The values below the two-class (Otsu) threshold, when the two classes are clearly apart (their means
    differ by more than 4 standard deviations of the lower class); None for one class with noise."""
    counts, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)  # pixels at or below each bin
    mass = np.cumsum(counts * centres)
    total, total_mass = weight[-1], mass[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mass * weight - total * mass) ** 2 / (weight * (total - weight))
    split = centres[int(np.nanargmax(between[:-1]))]
    lower, upper = values[values <= split], values[values > split]
    if lower.size < 0.05 * values.size or upper.size < 0.05 * values.size:
        return None
    if float(upper.mean() - lower.mean()) <= 4 * max(float(lower.std()), 1e-3):
        return None
    return lower


def _soft_threshold(ink: np.ndarray) -> np.ndarray:
    """Remove the paper's texture and noise: zero below the noise level, a linear ramp up to the ink's
    typical strength. Raises PreprocessError when nothing stands out from the noise."""
    blurred = _box_blur(ink, max(0, round(max(ink.shape) / 300)))  # ~1 px at 300 px, 0 for small images
    sample = blurred[::2, ::2].ravel()  # statistics from every 4th pixel: as good, 4x cheaper
    if float(np.median(sample)) > 0.25:
        # More ink than paper: a tight crop or a bold digit filling its picture. The noise statistics are
        # the paper's, so take them as if the picture had MNIST's margins of paper (about as much again).
        sample = np.concatenate([sample, np.zeros(sample.size, dtype=sample.dtype)])
    median = float(np.median(sample))
    sigma = 1.4826 * float(np.median(np.abs(sample - median)))
    low = median + max(NOISE_SIGMAS * sigma, MIN_NOISE_FLOOR)
    if not (blurred > low).any():
        # Nearly as much ink as paper (a bold marker digit cropped tightly): the ink widens the spread that
        # the statistics above take for noise, until the threshold lies above the ink itself. The paper's
        # own statistics, from the darker side of a two-class (Otsu) split, are the ones to use.
        paper = _paper_side(sample)
        if paper is not None:
            median = float(np.median(paper))
            sigma = 1.4826 * float(np.median(np.abs(paper - median)))
            low = median + max(NOISE_SIGMAS * sigma, MIN_NOISE_FLOOR)
    above = blurred[blurred > low]
    if above.size == 0:
        raise PreprocessError("no ink found: the image is blank")
    peak = float(np.percentile(above, 90))
    if peak < MIN_INK_CONTRAST or peak - low < 0.03:
        raise PreprocessError(
            f"no ink found: nothing is more than {MIN_INK_CONTRAST:.0%} darker or lighter than the background"
        )
    return np.clip((blurred - low) / (peak - low), 0.0, 1.0)


def _sides(mask: np.ndarray) -> list[np.ndarray]:
    """The mask seen from each side (top, bottom, left, right): views whose row 0 is that side's edge."""
    return [mask, mask[::-1], mask.T, mask.T[::-1]]


OPPOSITE = (1, 0, 3, 2)  # bottom is opposite top, right opposite left


def _clear_border_bands(mask: np.ndarray) -> np.ndarray:
    """Erase solid bands along the picture's sides (the table beyond the page's edge, the edge's shadow):
    rows or columns from a side inwards that are mostly ink, up to 15% of the picture deep.

    A band is only erased when the rest of the ink stops short of the opposite side: the digit then sits
    inside the picture and the band is the page's edge. When the rest reaches the opposite side (or its
    band), the digit fills the picture (a tight crop, a digit touching its box) and the band is its stroke.
    """
    mask = mask.copy()
    depths = []
    for lines in _sides(mask):
        depth = 0
        while depth < 0.15 * lines.shape[0] and lines[depth].mean() > 0.6:
            depth += 1
        depths.append(depth)
    rest = mask.copy()
    for lines, depth in zip(_sides(rest), depths):
        if depth:
            lines[: depth + 1] = False  # views: this clears `rest` itself
    for side, depth in enumerate(depths):
        opposite = OPPOSITE[side]
        start = depths[opposite] + 1 if depths[opposite] else 0
        reach = max(2, round(0.03 * mask.shape[side >= 2]))  # a stroke's rounded end may stop a little short
        if depth and not _sides(rest)[opposite][start : start + reach].any():
            _sides(mask)[side][: depth + 1] = False
    return mask


def _remove_box_lines(mask: np.ndarray) -> np.ndarray:
    """Erase the lines of a box drawn around the digit (a form's box, cut out), and what lies outside them.

    A box line is a thin run of rows (or columns) in the outer quarter of the picture, each covered by ink
    along at least 75% of its length; it counts only when another side has one too (a box has corners), so
    a "7"'s bar in a tight crop, which is long and near one side, stays. Strokes of the digit that cross a
    line lose only the line's own pixels.
    """
    found = []
    for side, lines in enumerate(_sides(mask)):
        count, length = lines.shape
        zone = lines[: max(1, count // 4)]
        hits = np.nonzero(zone.mean(axis=1) >= 0.75)[0]
        if hits.size == 0 or length < 8:
            continue
        first = last = int(hits[0])
        while last + 1 < len(zone) and zone[last + 1].mean() >= 0.75:
            last += 1
        if last - first + 1 <= max(2, 0.08 * count):  # thin: a line, not a band or a stroke filling the box
            found.append((side, last))
    if len(found) < 2:
        return mask
    mask = mask.copy()
    for side, last in found:
        _sides(mask)[side][: last + 2] = False  # the line, everything outside it, and its soft inner edge
    return mask


def _select_digit(strength: np.ndarray) -> np.ndarray:
    """The digit's pixels (bool mask): the biggest piece of ink, plus pieces near it; specks and page edges
    are left out."""
    h, w = strength.shape
    factor = max(1, -(-max(h, w) // 256))  # label at <= 256 px: any-ink blocks keep thin strokes connected
    mask = strength > 0.5
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    blocks = np.zeros((hp, wp), dtype=bool)
    blocks[:h, :w] = mask
    blocks = blocks.reshape(hp // factor, factor, wp // factor, factor).any(axis=(1, 3))
    blocks = _clear_border_bands(_remove_box_lines(blocks))
    labels, count = label_components(blocks)
    if count == 0:
        raise PreprocessError("no ink found: the image is blank")
    bh, bw = blocks.shape
    area = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    pieces = []
    for k in range(count):
        rows, cols = np.nonzero(labels == k + 1)
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        # A page edge (or the table beyond it) runs along a side of the picture: touching it and spanning
        # most of it, or close to it, thin and spanning nearly all of it.
        height, width = bottom - top + 1, right - left + 1
        near_top_bottom = min(top, bh - 1 - bottom) <= (0 if height > 0.1 * bh else 0.15 * bh)
        near_left_right = min(left, bw - 1 - right) <= (0 if width > 0.1 * bw else 0.15 * bw)
        # A piece that also reaches across to the opposite side is a digit filling the picture, not an edge.
        across_rows = top <= 1 and bottom >= bh - 2
        across_cols = left <= 1 and right >= bw - 2
        # And an edge is a band: thin across the side it lines (a digit's loop resting on the bottom is not).
        edge = (
            near_top_bottom
            and width >= (0.6 if min(top, bh - 1 - bottom) == 0 else 0.9) * bw
            and height <= 0.3 * bh
            and not across_rows
        ) or (
            near_left_right
            and height >= (0.6 if min(left, bw - 1 - right) == 0 else 0.9) * bh
            and width <= 0.3 * bw
            and not across_cols
        )
        pieces.append((int(area[k]), top, bottom, left, right, edge))
    candidates = [k for k, p in enumerate(pieces) if not p[5]] or list(range(count))
    main = max(candidates, key=lambda k: pieces[k][0])
    chosen = {main}
    box = list(pieces[main][1:5])
    min_area = 0.03 * pieces[main][0]
    changed = True
    while changed:
        changed = False
        size = max(box[1] - box[0], box[3] - box[2]) + 1
        reach = 0.25 * size
        for k in candidates:
            a, top, bottom, left, right, _ = pieces[k]
            if k in chosen or a < min_area:
                continue
            gap_y = max(0, top - box[1], box[0] - bottom)
            gap_x = max(0, left - box[3], box[2] - right)
            if max(gap_y, gap_x) <= reach:
                chosen.add(k)
                box = [min(box[0], top), max(box[1], bottom), min(box[2], left), max(box[3], right)]
                changed = True
    keep = np.isin(labels, [k + 1 for k in chosen])
    keep = _max_filter(keep.astype(np.uint8), 3) > 0  # a block more all round: the strokes' soft edges
    return np.repeat(np.repeat(keep, factor, axis=0), factor, axis=1)[:h, :w]


def _stroke_width(digit: np.ndarray) -> float:
    """Stroke width relative to the digit's size: (ink area / outline pixels) / longer side, as measured on
    MNIST (0.053..0.111, 5th..95th percentile)."""
    mask = digit > 0.5
    area = int(mask.sum())
    if area == 0:
        return 0.0
    interior = mask.copy()
    interior[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    boundary = max(1, area - int(interior[1:-1, 1:-1].sum()))
    return area / boundary / max(digit.shape)


def _normalise_strokes(digit: np.ndarray) -> np.ndarray:
    """Bring strokes much thinner or thicker than MNIST's towards its range (a fine pen in a big photo would
    fade when shrunk; a marker or a big brush on a small digit would fill the loops)."""
    width = _stroke_width(digit)
    longest = max(digit.shape)
    if 0 < width < THIN_STROKE:
        radius = int(round((THICKEN_TO - width) * longest))
        return _max_filter(np.pad(digit, radius), 2 * radius + 1) if radius >= 1 else digit
    if width > THICK_STROKE:
        scale = max(1, -(-64 // longest))  # a small digit is enlarged first so a fraction of a pixel can go
        big = _resize(digit, digit.shape[0] * scale, digit.shape[1] * scale, Image.Resampling.BILINEAR)
        radius = int(round((width - THIN_TO) * longest * scale))
        return _min_filter(big, 2 * radius + 1) if radius >= 1 else big
    return digit


def _flat_paper(gray: np.ndarray, dark_ink: bool) -> float | None:
    """The paper's brightness when it is evenly lit (a scan, a drawing program, a binary image), else None.

    For such pictures the background is that one level: the morphological estimate would take strokes
    wider than its window, or touching the picture's edge, for background.
    """
    small = _shrink_to(gray, 64)
    bright = 1.0 - small if dark_ink else small  # ink bright
    low, high = np.percentile(bright, [2, 98])
    if high - low < MIN_INK_CONTRAST:
        return None
    paper = bright[bright < (low + high) / 2]
    p10, p50, p90 = np.percentile(paper, [10, 50, 90])
    if p90 - p10 > FLAT_PAPER:
        return None
    return float(1.0 - p50 if dark_ink else p50)


def _fit_box(digit: np.ndarray) -> np.ndarray:
    """Scale so the longer side is 20 px, aspect ratio kept, anti-aliased; strongest pixel set to 1."""
    h, w = digit.shape
    scale = BOX_SIZE / max(h, w)
    box = _resize(digit, max(1, round(h * scale)), max(1, round(w * scale)), Image.Resampling.LANCZOS)
    box = np.clip(box, 0.0, 1.0)
    top = float(box.max())
    return box / top if top > 0 else box


def _paste_centred(box: np.ndarray) -> np.ndarray:
    """Paste into 28x28 so the centre of mass lands on pixel (14, 14), as MNIST did; kept inside the frame."""
    h, w = box.shape
    mass = float(box.sum())
    ys, xs = np.mgrid[0:h, 0:w]
    cy = float((box * ys).sum() / mass) if mass > 0 else (h - 1) / 2
    cx = float((box * xs).sum() / mass) if mass > 0 else (w - 1) / 2
    top = int(np.clip(round(CENTRE - cy), 0, MNIST_SIZE - h))
    left = int(np.clip(round(CENTRE - cx), 0, MNIST_SIZE - w))
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    out[top : top + h, left : left + w] = box
    return out


def _pipeline(gray: np.ndarray, stages: dict[str, np.ndarray] | None) -> np.ndarray:
    def keep(name: str, value: np.ndarray) -> None:
        if stages is not None:
            stages[name] = np.asarray(value, dtype=np.float32)

    keep("grayscale", gray)
    if float(gray.max() - gray.min()) < 1e-3:
        raise PreprocessError("no ink found: the image is uniform (blank)")
    work = _shrink_to(gray, WORK_SIZE)
    dark_ink = _ink_is_dark(work)
    if _border_is_mostly_ink(work, dark_ink):
        dark_ink = not dark_ink
    bright = 1.0 - work if dark_ink else work
    keep("polarity", bright)
    paper = _flat_paper(work, dark_ink)
    background = _background(work, dark_ink) if paper is None else np.full_like(work, paper)
    keep("background", 1.0 - background if dark_ink else background)
    ink = _flatten(work, dark_ink, background)
    keep("flattened", ink / max(float(ink.max()), 1e-6))
    strength = _soft_threshold(ink)
    keep("denoised", strength)
    digit = strength * _select_digit(strength)
    keep("digit", digit)
    rows, cols = np.nonzero(digit > 0)
    if rows.size == 0:
        raise PreprocessError("no ink found: the image is blank")
    crop = digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    crop = _normalise_strokes(np.pad(crop, 1))
    rows, cols = np.nonzero(crop > 0.02)
    if rows.size == 0:
        raise PreprocessError("no ink found: the image is blank")
    crop = crop[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    keep("cropped", crop)
    box = _fit_box(crop)
    keep("scaled", box)
    final = _paste_centred(box)
    keep("final", final)
    return final


def preprocess(image: Any) -> np.ndarray:
    """Any image of one digit -> float32 (28, 28) in [0, 1], white ink on black, MNIST-like.

    Accepts a PIL image, a numpy array (HxW or HxWxC; uint8, uint16 or float) or a torch tensor.
    MNIST-like input (28x28, white on black, centred) is returned unchanged. Raises PreprocessError when no
    ink is found.
    """
    gray = to_gray(image)
    if is_mnist_like(gray):
        return np.ascontiguousarray(gray, dtype=np.float32)
    return _pipeline(gray, None)


def preprocess_stages(image: Any) -> dict[str, np.ndarray]:
    """Every intermediate image of `preprocess`, in order (for docs and debugging): grayscale, polarity,
    background, flattened, denoised, digit, cropped, scaled, final. MNIST-like input has just grayscale and
    final."""
    gray = to_gray(image)
    if is_mnist_like(gray):
        return {"grayscale": gray, "final": np.ascontiguousarray(gray, dtype=np.float32)}
    stages: dict[str, np.ndarray] = {}
    _pipeline(gray, stages)
    return stages
