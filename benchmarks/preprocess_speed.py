"""Preprocessing speed: the old hand-written numpy filters and union-find against scipy.ndimage.

    python benchmarks/preprocess_speed.py --data ../shared/datasets/mnist [--count 200] [--repeats 3]

Renders `count` MNIST test digits as user-like photos (benchmarks/userlike.py), decodes them, then
1. records every call preprocessing makes to its image operations (max/min/box filters, connected
   components, the background's hole filling) and times each operation on those same inputs, old vs scipy;
2. times `preprocess` per picture end to end with the scipy operations and with the old ones patched in.
Prints medians (per call, per picture) and the ratio old / scipy. The old functions live in this file only,
as they were in src/digitlab/preprocessing.py before scipy.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from common import add_data_option, mnist_test_set
from digitlab import preprocessing as pp
from userlike import make_userlike

# ----------------------------------------------------------------------------------------------------------
# The old hand-written operations (numpy only), kept here for the comparison
# ----------------------------------------------------------------------------------------------------------


def old_rank_filter(a: np.ndarray, size: int, reduce) -> np.ndarray:
    if size <= 1:
        return a
    r = size // 2
    padded = np.pad(a, ((r, size - 1 - r), (0, 0)), mode="edge")
    a = reduce(sliding_window_view(padded, size, axis=0), axis=-1)
    padded = np.pad(a, ((0, 0), (r, size - 1 - r)), mode="edge")
    return reduce(sliding_window_view(padded, size, axis=1), axis=-1)


def old_max_filter(a: np.ndarray, size: int) -> np.ndarray:
    return old_rank_filter(a, size, np.max)


def old_min_filter(a: np.ndarray, size: int) -> np.ndarray:
    return old_rank_filter(a, size, np.min)


def old_box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    if radius < 1:
        return a
    k = 2 * radius + 1
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float32)
        hi = np.take(c, np.arange(k, c.shape[axis]), axis=axis)
        lo = np.take(c, np.arange(0, c.shape[axis] - k), axis=axis)
        a = ((hi - lo) / k).astype(np.float32)
    return a


def old_fill_dips(bg: np.ndarray) -> np.ndarray:
    h, w = bg.shape
    if h < 3 or w < 3:
        return bg
    marker = np.full_like(bg, bg.max())
    marker[0], marker[-1], marker[:, 0], marker[:, -1] = bg[0], bg[-1], bg[:, 0], bg[:, -1]
    for _ in range(h + w):
        eroded = marker.copy()
        eroded[1:-1, 1:-1] = np.minimum.reduce(
            [marker[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        )
        new = np.maximum(eroded, bg)
        if np.array_equal(new, marker):
            break
        marker = new
    return marker


def old_label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows_s, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    n = len(starts)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows_s, np.arange(h + 1))
    for y in range(1, h):
        i, i_end = int(row_first[y - 1]), int(row_first[y])
        j, j_end = i_end, int(row_first[y + 1])
        while i < i_end and j < j_end:
            if starts[i] <= ends[j] and starts[j] <= ends[i]:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    unique, compact = np.unique(roots, return_inverse=True)
    labels = np.zeros((h, w), dtype=np.int32)
    for k in range(n):
        labels[rows_s[k], starts[k] : ends[k]] = compact[k] + 1
    return labels, len(unique)


def scipy_fill_dips(bg: np.ndarray) -> np.ndarray:
    """The same reconstruction with scipy.ndimage.minimum_filter per step (slower here: not used)."""
    from scipy import ndimage

    h, w = bg.shape
    if h < 3 or w < 3:
        return bg
    marker = np.full_like(bg, bg.max())
    marker[0], marker[-1], marker[:, 0], marker[:, -1] = bg[0], bg[-1], bg[:, 0], bg[:, -1]
    for _ in range(h + w):
        new = np.maximum(ndimage.minimum_filter(marker, size=3, mode="nearest"), bg)
        if np.array_equal(new, marker):
            break
        marker = new
    return marker


SCIPY_ONLY_HERE = {"_fill_dips": scipy_fill_dips}  # compared, but preprocessing keeps the numpy version

OLD = {
    "_max_filter": old_max_filter,
    "_min_filter": old_min_filter,
    "_box_blur": old_box_blur,
    "_fill_dips": old_fill_dips,
    "label_components": old_label_components,
}


@contextmanager
def patched(functions: dict):
    saved = {name: getattr(pp, name) for name in functions}
    try:
        for name, f in functions.items():
            setattr(pp, name, f)
        yield
    finally:
        for name, f in saved.items():
            setattr(pp, name, f)


def record_calls(pictures: list[np.ndarray]) -> dict[str, list[tuple]]:
    """Every call preprocessing makes to the operations, with its arguments (copied)."""
    calls: dict[str, list[tuple]] = defaultdict(list)

    def recorder(name, f):
        def wrapped(*args):
            calls[name].append(tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args))
            return f(*args)

        return wrapped

    with patched({name: recorder(name, getattr(pp, name)) for name in OLD}):
        for p in pictures:
            pp.preprocess(p)
    return calls


def seconds(f, args, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(*args)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(parser)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images, _ = mnist_test_set(parser, args.data, args.count)
    pictures = [pp.to_gray(pp.load_image(r.data)) for r in make_userlike(images, seed=0)]
    print(f"{len(pictures)} user-like pictures, {np.median([p.size for p in pictures]) / 1e3:.0f} kpixels median")

    calls = record_calls(pictures)
    print(f"{'operation':18s} {'calls':>6s} {'old ms':>8s} {'scipy ms':>9s} {'old/scipy':>9s}   (median per call)")
    for name, old in OLD.items():
        new = SCIPY_ONLY_HERE.get(name, getattr(pp, name))
        t_old = [seconds(old, a, args.repeats) for a in calls[name]]
        t_new = [seconds(new, a, args.repeats) for a in calls[name]]
        m_old, m_new = 1e3 * float(np.median(t_old)), 1e3 * float(np.median(t_new))
        note = "   (preprocessing keeps the numpy one)" if name in SCIPY_ONLY_HERE else ""
        print(f"{name:18s} {len(calls[name]):6d} {m_old:8.3f} {m_new:9.3f} {m_old / m_new:9.1f}{note}")

    per_picture = {}
    for label, functions in (("scipy", {}), ("old", OLD)):
        with patched(functions):
            per_picture[label] = [seconds(pp.preprocess, (p,), args.repeats) for p in pictures]
    m_old, m_new = (1e3 * float(np.median(per_picture[k])) for k in ("old", "scipy"))
    s_old, s_new = (float(np.sum(per_picture[k])) for k in ("old", "scipy"))
    print(
        f"preprocess, per picture: old {m_old:.1f} ms, scipy {m_new:.1f} ms median "
        f"(x{m_old / m_new:.1f}); all {len(pictures)}: old {s_old:.2f} s, scipy {s_new:.2f} s (x{s_old / s_new:.1f})"
    )


if __name__ == "__main__":
    main()
