"""Training-time augmentation that models the handwriting people bring, not only MNIST's.

MNIST's digits come from one pipeline: American writers, anti-aliased grey strokes of one typical width,
the longer side scaled to 20 px with the aspect ratio kept. Real collections differ in ways that are easy to
name, and each has a random transform here that models it (see docs/training.md for the measurements):

    writing style  European 1s with a flag and a base, crossed 7s          `add_style_strokes`
    stroke width   fine pens and thick markers                              `vary_stroke_width`
    proportions    scans that stretch every digit to fill its box           part of `warp`
    shape          slant, small rotations, scale, shift, wobbly strokes     `warp` (one grid_sample)
    capture        binarised scans, 16x16 and 8x8 scans enlarged            `binarise`, `low_resolution`
    cropping       a tight crop that cut off the end of a stroke            `cut_an_edge`

Everything works on whole batches of tensors (B, 1, 28, 28) in pixel space [0, 1] (ink = 1), on the batch's
device, with every random number drawn from one CPU generator, so a seed gives the same images on any device.
Each transform is applied to a random subset of the batch; `augment_batch` chains them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .pixels import model_input

SIZE = 28
BOX = 20  # MNIST's size-normalisation box: preprocessing scales every digit's longer side to this


@dataclass(frozen=True)
class AugmentConfig:
    """How often and how strongly each transform is applied (probabilities are per image)."""

    style_strokes: float = 0.3  # share of 1s and 7s given a flag/base or a crossbar
    thicker: float = 0.25
    thinner: float = 0.15
    degrees: float = 10.0
    shear: float = 0.25  # horizontal shear (slant), as a fraction of the height
    scale: float = 0.1
    shift_px: float = 2.0
    stretch: float = 0.3  # share of images widened towards a square (as scans that fill the box do)
    elastic: float = 0.5
    elastic_px: float = 0.8  # typical displacement of the elastic field, in pixels
    low_resolution: float = 0.1
    binarise: float = 0.1
    cut_edge: float = 0.05


DEFAULT = AugmentConfig()


def _uniform(
    generator: torch.Generator, shape: tuple[int, ...], low: float, high: float, device: torch.device
) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * (high - low) + low).to(device)


def _chosen(generator: torch.Generator, b: int, probability: float, device: torch.device) -> torch.Tensor:
    """A (B, 1, 1, 1) bool mask selecting each image with the given probability."""
    return (torch.rand(b, generator=generator) < probability).to(device).view(b, 1, 1, 1)


def _on_subset(pixels: torch.Tensor, chosen: torch.Tensor, transform) -> torch.Tensor:
    """`transform` applied to the chosen images (bool mask (B,)) only: most transforms touch a few images
    per batch, and computing them for the rest only to throw the result away would cost as much again."""
    index = torch.nonzero(chosen).flatten()
    if len(index) == 0:
        return pixels
    return pixels.index_copy(0, index, transform(pixels.index_select(0, index), index))


def ink_box(pixels: torch.Tensor, level: float = 0.1) -> torch.Tensor:
    """Each image's ink bounding box, (B, 4) float: top, bottom, left, right (inclusive pixel indices)."""
    ink = pixels[:, 0] > level  # (B, 28, 28)
    rows, cols = ink.any(dim=2), ink.any(dim=1)  # (B, 28) each
    index = torch.arange(SIZE, device=pixels.device)
    big = torch.full_like(index, SIZE)

    def first_last(lines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.where(lines, index, big).min(dim=1).values
        last = torch.where(lines, index, -big).max(dim=1).values
        empty = ~lines.any(dim=1)  # a blank image: the whole frame
        return torch.where(empty, 0, first), torch.where(empty, SIZE - 1, last)

    top, bottom = first_last(rows)
    left, right = first_last(cols)
    return torch.stack([top, bottom, left, right], dim=1).float()


# ----------------------------------------------------------------------------------------------------------
# Writing style: strokes that MNIST's writers rarely made
# ----------------------------------------------------------------------------------------------------------


def _segments_image(segments: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Anti-aliased line segments. segments (B, S, 4) as (y0, x0, y1, x1), width (B, S) -> (B, 1, 28, 28)."""
    ys = torch.arange(SIZE, device=segments.device, dtype=segments.dtype).view(1, 1, SIZE, 1)
    xs = torch.arange(SIZE, device=segments.device, dtype=segments.dtype).view(1, 1, 1, SIZE)
    y0, x0, y1, x1 = (segments[..., i].unsqueeze(-1).unsqueeze(-1) for i in range(4))  # (B, S, 1, 1)
    dy, dx = y1 - y0, x1 - x0
    t = (((ys - y0) * dy + (xs - x0) * dx) / (dy * dy + dx * dx).clamp_min(1e-6)).clamp(0, 1)
    distance = torch.hypot(ys - (y0 + t * dy), xs - (x0 + t * dx))  # (B, S, 28, 28)
    strokes = (width.unsqueeze(-1).unsqueeze(-1) / 2 + 0.5 - distance).clamp(0, 1)
    return strokes.amax(dim=1, keepdim=True)


def _ink_x_at_row(pixels: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The ink's mean x position in the given row of each image (the frame's centre for an empty row)."""
    rows = pixels[:, 0].gather(1, row.long().clamp(0, SIZE - 1).view(-1, 1, 1).expand(-1, 1, SIZE))[:, 0]  # (B, 28)
    xs = torch.arange(SIZE, device=pixels.device, dtype=pixels.dtype)
    mass = rows.sum(dim=1)
    return torch.where(mass > 0, (rows * xs).sum(dim=1) / mass.clamp_min(1e-6), torch.full_like(mass, SIZE / 2))


def add_style_strokes(
    pixels: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, probability: float
) -> torch.Tensor:
    """Give some 7s a crossbar, and some 1s a flag at the top and/or a base at the bottom.

    Both styles are common in Europe and rare in MNIST, whose models then read a flagged 1 as a 7 and a
    crossed 7 as a 2 or a 4. The strokes are placed from each digit's own ink: the crossbar through the
    stem at mid-height, the flag down-left from the top of the stroke, the base under its foot.
    """
    b, device = len(pixels), pixels.device
    r = _uniform(generator, (b, 9), 0.0, 1.0, device)
    chosen = (r[:, 8] < probability) & ((labels == 7) | (labels == 1))
    return _on_subset(pixels, chosen, lambda p, index: _draw_style(p, labels[index] == 7, r[index]))


def _draw_style(pixels: torch.Tensor, seven: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    box = ink_box(pixels)
    top, bottom = box[:, 0], box[:, 1]
    height = (bottom - top + 1).clamp_min(4)
    # A crossbar through the 7's stem, a little below the middle, slightly tilted.
    mid = top + height * (0.5 + 0.15 * r[:, 0])
    stem_x = _ink_x_at_row(pixels, mid)
    half = height * (0.18 + 0.12 * r[:, 1])
    tilt = (r[:, 2] - 0.5) * 0.2 * height
    crossbar = torch.stack([mid + tilt / 2, stem_x - half, mid - tilt / 2, stem_x + half], dim=1)
    # A flag from the 1's top, down and to the left; a base under its foot (each 1 gets one or both).
    top_x = _ink_x_at_row(pixels, top + 1)
    flag_len = height * (0.25 + 0.15 * r[:, 3])
    angle = math.radians(30) + r[:, 4] * math.radians(30)  # below the horizontal
    flag = torch.stack(
        [top + 0.5, top_x, top + 0.5 + flag_len * torch.sin(angle), top_x - flag_len * torch.cos(angle)], dim=1
    )
    foot_x = _ink_x_at_row(pixels, bottom - 1)
    base_half = height * (0.15 + 0.1 * r[:, 5])
    base = torch.stack([bottom - 0.5, foot_x - base_half, bottom - 0.5, foot_x + base_half], dim=1)
    one = ~seven
    with_flag = one & (r[:, 6] < 0.8)
    with_base = one & ((r[:, 6] >= 0.5) | (r[:, 7] < 0.4))
    segments = torch.stack([crossbar, flag, base], dim=1)  # (n, 3, 4)
    active = torch.stack([seven, with_flag, with_base], dim=1).to(pixels.dtype)  # (n, 3)
    width = (1.5 + r[:, 7:8]).expand(-1, 3) * active  # 1.5 to 2.5 px
    return torch.maximum(pixels, _segments_image(segments, width))


# ----------------------------------------------------------------------------------------------------------
# Stroke width, shape, capture, cropping
# ----------------------------------------------------------------------------------------------------------


def dilate(pixels: torch.Tensor) -> torch.Tensor:
    """A 3x3 grey dilation: every stroke one pixel wider on each side."""
    return F.max_pool2d(pixels, 3, stride=1, padding=1)


def vary_stroke_width(pixels: torch.Tensor, generator: torch.Generator, thicker: float, thinner: float) -> torch.Tensor:
    """Thicker strokes for some images, thinner for others.

    Thicker: a 3x3 dilation blended in by a random amount, so widths between one step and the next occur.
    Thinner: a power (gamma 1.5 to 3) darkens the grey edges of the strokes and keeps their bright core; an
    erosion would wipe out MNIST's many strokes that are only 2 px wide.
    """
    b, device = len(pixels), pixels.device
    roll = torch.rand(b, generator=generator).to(device)
    amount = _uniform(generator, (b, 1, 1, 1), 0.4, 1.0, device)
    gamma = _uniform(generator, (b, 1, 1, 1), 1.5, 3.0, device)
    pixels = _on_subset(pixels, roll < thicker, lambda p, i: p + amount[i] * (dilate(p) - p))
    return _on_subset(pixels, (roll >= thicker) & (roll < thicker + thinner), lambda p, i: p.pow(gamma[i]))


def _interpolation_matrix(n: int, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size, n): linear interpolation from n evenly spread control points to `size` pixels."""
    position = (torch.arange(size, device=device, dtype=dtype) + 0.5) * n / size - 0.5
    points = torch.arange(n, device=device, dtype=dtype)
    return (1 - (position.view(-1, 1) - points.view(1, -1)).abs()).clamp_min(0)


def warp(pixels: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Rotation, slant, scale, widening, shift and an elastic wobble, resampled once (one grid_sample).

    Widening stretches a digit horizontally at most until it is as wide as it is tall, since preprocessing
    scales the longer side to the box: a scanned "1" stretched to fill its box arrives as a wide bar.
    """
    b, device = len(pixels), pixels.device
    box = ink_box(pixels)
    height, width = box[:, 1] - box[:, 0] + 1, box[:, 3] - box[:, 2] + 1
    r = _uniform(generator, (b, 6), -1.0, 1.0, device)
    angle = r[:, 0] * math.radians(cfg.degrees)
    shear = r[:, 1] * cfg.shear
    zoom = 1 + r[:, 2] * cfg.scale
    widen = (torch.rand(b, generator=generator).to(device) < cfg.stretch).float()
    stretch = 1 + widen * (r[:, 3] + 1) / 2 * ((height / width.clamp_min(1)).clamp(1, 3) - 1)
    # The forward map (input -> output coordinates): rotate, shear, then scale x by zoom*stretch and y by zoom.
    cos, sin = torch.cos(angle), torch.sin(angle)
    forward = torch.stack(
        [torch.stack([cos + shear * sin, -sin + shear * cos], 1), torch.stack([sin, cos], 1)], 1
    )  # (B, 2, 2), rows: x, y
    forward = forward * torch.stack([zoom * stretch, zoom], 1).unsqueeze(2)
    # affine_grid maps output coordinates back to input ones: the inverse of a 2x2 matrix, written out.
    a, b_, c, d = forward[:, 0, 0], forward[:, 0, 1], forward[:, 1, 0], forward[:, 1, 1]
    inverse = torch.stack([torch.stack([d, -b_], 1), torch.stack([-c, a], 1)], 1) / (a * d - b_ * c).view(b, 1, 1)
    shift = r[:, 4:6] * (2 * cfg.shift_px / SIZE)  # grid_sample works in [-1, 1] coordinates
    # The sampling grid, written out rather than built by F.affine_grid (3x faster here): for each output
    # pixel (x, y) in [-1, 1], the input position inverse @ (x, y) + shift.
    line = (torch.arange(SIZE, device=device, dtype=pixels.dtype) * 2 + 1) / SIZE - 1  # pixel centres
    xs, ys = line.view(1, 1, SIZE), line.view(1, SIZE, 1)
    m = inverse.view(b, 2, 2, 1, 1)
    grid_x = m[:, 0, 0] * xs + m[:, 0, 1] * ys + shift[:, 0].view(b, 1, 1)  # (B, 28, 28)
    grid_y = m[:, 1, 0] * xs + m[:, 1, 1] * ys + shift[:, 1].view(b, 1, 1)
    # The elastic wobble: a random displacement field on a coarse 4x4 grid, bilinearly interpolated
    # (two small matrix products instead of F.interpolate).
    wobble = (torch.rand(b, generator=generator) < cfg.elastic).to(device, pixels.dtype).view(b, 1, 1, 1)
    coarse = torch.randn((b, 2, 4, 4), generator=generator).to(device, pixels.dtype) * (2 * cfg.elastic_px / SIZE)
    spread = _interpolation_matrix(4, SIZE, device, pixels.dtype)  # (28, 4)
    field = spread @ (coarse * wobble) @ spread.T  # (B, 2, 28, 28)
    grid = torch.stack([grid_x + field[:, 0], grid_y + field[:, 1]], dim=3)  # (B, 28, 28, 2)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def low_resolution(pixels: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """Some images as if scanned at 8 to 16 px across the digit, often binarised, then enlarged: blocky
    shapes and lost detail, as in old form scans."""
    b, device = len(pixels), pixels.device
    size = int(torch.randint(13, 23, (1,), generator=generator))  # 28 * (9..16) / 20: the digit 9..16 px tall
    binary = (torch.rand(b, generator=generator) < 0.7).to(device).view(b, 1, 1, 1)
    chosen = (torch.rand(b, generator=generator) < probability).to(device)

    def rescan(p: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(p, size=(size, size), mode="area")
        small = torch.where(binary[index], (small > 0.4).to(small.dtype), small)
        return F.interpolate(small, size=(SIZE, SIZE), mode="nearest")

    return _on_subset(pixels, chosen, rescan)


def binarise(pixels: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """Some images thresholded to pure black and white at a random level (hard edges, no grey)."""
    b, device = len(pixels), pixels.device
    level = _uniform(generator, (b, 1, 1, 1), 0.2, 0.45, device)
    return torch.where(_chosen(generator, b, probability, device), (pixels > level).to(pixels.dtype), pixels)


def cut_an_edge(pixels: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """Some images lose 1 or 2 px of ink at one side of the digit, as a crop that was a little too tight."""
    b, device = len(pixels), pixels.device
    side = torch.randint(0, 4, (b,), generator=generator).to(device)
    depth = torch.randint(1, 3, (b,), generator=generator).to(device).to(pixels.dtype)
    chosen = (torch.rand(b, generator=generator) < probability).to(device)

    def cut(p: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        n = len(p)
        box = ink_box(p)
        line = torch.arange(SIZE, device=device, dtype=p.dtype)
        ys, xs = line.view(1, SIZE, 1), line.view(1, 1, SIZE)
        t, bo, le, ri = (box[:, i].view(n, 1, 1) for i in range(4))
        d, s = depth[index].view(n, 1, 1), side[index].view(n, 1, 1)
        gone = (
            ((s == 0) & (ys < t + d))
            | ((s == 1) & (ys > bo - d))
            | ((s == 2) & (xs < le + d))
            | ((s == 3) & (xs > ri - d))
        )  # (n, 28, 28)
        return p * ~gone.unsqueeze(1)

    return _on_subset(pixels, chosen, cut)


def augment_batch(
    x: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    mean: float | None,
    std: float | None,
    cfg: AugmentConfig = DEFAULT,
) -> torch.Tensor:
    """A normalised batch (B, 1, 28, 28), as the model takes it, through every transform above."""
    pixels = x * std + mean if mean is not None and std is not None else x  # back to [0, 1]
    pixels = add_style_strokes(pixels, labels, generator, cfg.style_strokes)
    pixels = vary_stroke_width(pixels, generator, cfg.thicker, cfg.thinner)
    pixels = warp(pixels, generator, cfg)
    pixels = low_resolution(pixels, generator, cfg.low_resolution)
    pixels = binarise(pixels, generator, cfg.binarise)
    pixels = cut_an_edge(pixels, generator, cfg.cut_edge).clamp_(0, 1)
    return model_input(pixels, mean, std)
