"""benchmarks.font_digits: the cross-domain test set of digits rendered with handwriting-style fonts.

Needs the Debian font packages of FONT_PACKAGES; skips without them, fails instead when
DIGITLAB_REQUIRE_FONTS=1 (as in CI, which installs them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from benchmarks import font_digits

pytestmark = pytest.mark.slow

PER = 3  # renderings per font and digit: one of each presentation


@pytest.fixture(scope="module")
def fonts() -> list[Path]:
    found = font_digits.find_fonts()
    if not found:
        reason = "no handwriting font installed: apt-get install " + " ".join(font_digits.FONT_PACKAGES)
        if os.environ.get("DIGITLAB_REQUIRE_FONTS") == "1":
            pytest.fail(f"{reason} (DIGITLAB_REQUIRE_FONTS=1)")
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def rendered(fonts):
    return font_digits.render_set(fonts, seed=0, per_font_digit=PER)


def test_ci_installs_every_font_package():
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    command = ci.replace("\\\n", " ")  # join the lines a backslash continues
    install = next(line for line in command.splitlines() if re.match(r"\s*apt-get install", line))
    assert set(font_digits.FONT_PACKAGES) <= set(install.split())
    assert re.search(r"^export DIGITLAB_REQUIRE_FONTS=1", ci, re.MULTILINE)


def test_all_fonts_found_in_ci(fonts):
    if os.environ.get("DIGITLAB_REQUIRE_FONTS") == "1":
        wanted = [name for names in font_digits.FONT_PACKAGES.values() for name in names]
        assert [p.name for p in fonts] == wanted
    for path in fonts:
        assert font_digits.has_digits(path)


def test_same_seed_same_pixels_other_seed_other_pixels(fonts, rendered):
    images, labels, styles = rendered
    again_images, again_labels, again_styles = font_digits.render_set(fonts, seed=0, per_font_digit=PER)
    assert styles == again_styles
    np.testing.assert_array_equal(labels, again_labels)
    for a, b in zip(images, again_images, strict=True):
        assert a.size == b.size and a.tobytes() == b.tobytes()
    other, _, _ = font_digits.render_set(fonts[:1], seed=1, per_font_digit=PER)
    assert any(a.size != b.size or a.tobytes() != b.tobytes() for a, b in zip(images, other))


def test_every_digit_and_style_for_every_font(fonts, rendered):
    images, labels, styles = rendered
    assert len(images) == len(labels) == len(styles) == len(fonts) * 10 * PER
    assert labels.dtype.kind == "i" and set(styles) == set(font_digits.STYLES)
    per_font = 10 * PER
    for f, path in enumerate(fonts):
        block = slice(f * per_font, (f + 1) * per_font)
        assert {im.info["font"] for im in images[block]} == {path.name}
        assert sorted(set(labels[block].tolist())) == list(range(10))
        for digit in range(10):
            chosen = [s for s, y in zip(styles[block], labels[block]) if y == digit]
            assert sorted(chosen) == sorted(font_digits.STYLES)
    assert [im.info["digit"] for im in images] == labels.tolist()
    assert [im.info["style"] for im in images] == styles


def test_dark_ink_on_white_paper(rendered):
    images, _, styles = rendered
    ink_fractions = []
    for image, style in zip(images, styles):
        arr = np.asarray(image)
        assert image.mode == "L"
        assert arr.min() < 80, "no dark ink"
        assert arr.max() >= 250, "no white paper"
        assert 48 <= max(image.size) <= 160
        if style != "tight":  # a tight crop of a bold 1 is mostly ink
            assert np.median(arr) > 200, "not mostly paper"
        ink_fractions.append((arr < font_digits.INK_THRESHOLD).mean())
    assert np.mean(ink_fractions) < 0.4


def test_tight_crops_touch_all_four_edges(rendered):
    images, _, styles = rendered
    tight = [im for im, s in zip(images, styles) if s == "tight"]
    assert tight
    for image in tight:
        ink = np.asarray(image) < font_digits.INK_THRESHOLD
        assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
        assert image.height >= 40


def test_box_has_a_frame_and_the_digit_stays_inside(rendered):
    images, _, styles = rendered
    boxes = [im for im, s in zip(images, styles) if s == "box"]
    assert boxes
    for image in boxes:
        dark = np.asarray(image) < 160
        rows, cols = np.nonzero(dark.any(axis=1))[0], np.nonzero(dark.any(axis=0))[0]
        top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
        assert top > 0 and left > 0 and bottom < image.height - 1 and right < image.width - 1, "no paper around"
        assert bottom - top >= 60 and right - left >= 60
        frame = [
            dark[top, left : right + 1],
            dark[bottom, left : right + 1],
            dark[top : bottom + 1, left],
            dark[top : bottom + 1, right],
        ]
        assert all(side.all() for side in frame), "no closed rectangle around the digit"
        # The frame's thickness, then the digit: ink inside, with a white gap between it and the frame.
        line = 1
        while dark[top + line, left : right + 1].mean() > 0.95:
            line += 1
        inside = dark[top + line : bottom - line + 1, left + line : right - line + 1]
        assert inside.any(), "empty box"
        assert not inside[0].any() and not inside[-1].any() and not inside[:, 0].any() and not inside[:, -1].any()


def test_scan16_is_a_binary_16x16_grid_enlarged(rendered):
    images, _, styles = rendered
    scans = [im for im, s in zip(images, styles) if s == "scan16"]
    assert scans
    for image in scans:
        arr = np.asarray(image)
        assert image.width == image.height and image.width % 16 == 0 and image.width >= 64
        assert set(np.unique(arr).tolist()) == {0, 255}
        k = image.width // 16
        grid = arr[::k, ::k]
        np.testing.assert_array_equal(np.kron(grid, np.ones((k, k), dtype=np.uint8)), arr)
        assert 6 <= (grid == 0).sum() <= 0.7 * 256


def test_default_size_is_about_3000(fonts):
    import inspect

    default = inspect.signature(font_digits.render_set).parameters["per_font_digit"].default
    if os.environ.get("DIGITLAB_REQUIRE_FONTS") == "1":
        assert 2000 <= len(fonts) * 10 * default <= 4000
