"""The drawing page in a real browser: Debian's chromium, driven by Playwright, against a real uvicorn.

Draws a stroke with the mouse, taps with a finger on a phone-sized page, uploads an MNIST test digit,
walks the controls with the keyboard; asserts what the page shows and that the console stays clean.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from digitlab import checkpoint, data
from digitlab.checkpoint import CheckpointInfo
from digitlab.models import build_model

pytestmark = [pytest.mark.browser, pytest.mark.realdata]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TIMEOUT_MS = 15_000


# ----------------------------------------------------------------------------------------------------------
# A trained checkpoint, a real server, a browser
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_checkpoint(mnist, tmp_path_factory) -> Path:
    """The tutorial's MLP after one epoch of Adam on real MNIST (~96% test accuracy, a few seconds on a CPU)."""
    torch.manual_seed(0)
    model = build_model("mlp")
    x = data.to_input(mnist.train_images, data.MNIST_MEAN, data.MNIST_STD)  # (60000, 1, 28, 28)
    y = mnist.train_labels
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    model.train()
    for start in range(0, len(x), 128):
        batch = order[start : start + 128]
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        test_x = data.to_input(mnist.test_images, data.MNIST_MEAN, data.MNIST_STD)
        accuracy = (model(test_x).argmax(1) == mnist.test_labels).float().mean().item()
    base = tmp_path_factory.mktemp("browser-ckpt") / "best"
    info = CheckpointInfo(
        model="mlp",
        model_config={},
        mean=data.MNIST_MEAN,
        std=data.MNIST_STD,
        class_names=[str(d) for d in range(10)],
        metrics={"test_accuracy": accuracy},
        epoch=1,
    )
    checkpoint.save(base, model, info)
    return base.with_suffix(".safetensors")


@pytest.fixture(scope="module")
def predictor(trained_checkpoint):
    from digitlab.prediction import Predictor

    return Predictor.from_checkpoint(trained_checkpoint, device="cpu")


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """`app` behind a real uvicorn (the `serve` configuration) on a free 127.0.0.1 port, in a thread."""
    import uvicorn

    from digitlab.serving import bind_socket, uvicorn_config

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server_url(predictor) -> Iterator[str]:
    from digitlab.serving import create_app, default_allowed_hosts

    with running(create_app(predictor, allowed_hosts=default_allowed_hosts("127.0.0.1"))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) to run this test"
        if os.environ.get("DIGITLAB_REQUIRE_BROWSER") == "1":  # CI sets it: there the browser tests must run
            pytest.fail(f"{reason} (DIGITLAB_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Console:
    """Every console error and uncaught exception of a page."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))


def open_page(browser, url: str, **context_options):
    context = browser.new_context(reduced_motion="reduce", **context_options)  # no bar animation in screenshots
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    console = Console(page)
    page.goto(url)
    from playwright.sync_api import expect

    expect(page.locator("#model-info")).to_contain_text("Model: mlp")
    return context, page, console


def draw_stroke(page, points: list[tuple[float, float]]) -> None:
    """A mouse stroke through points given as fractions of the pad's size."""
    box = page.locator("#pad").bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------


def test_drawing_with_the_mouse_shows_a_digit_bars_and_the_layers(browser, server_url, tmp_path):
    from playwright.sync_api import expect

    context, page, console = open_page(browser, server_url, viewport={"width": 1200, "height": 1000})
    draw_stroke(page, [(0.3, 0.25), (0.7, 0.25), (0.45, 0.85)])  # a 7
    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#digit")).to_have_text(re.compile(r"^[0-9]$"))
    bars = page.locator("#bars .bar")
    expect(bars).to_have_count(10)
    for i in range(10):
        expect(bars.nth(i)).to_be_attached()
    heights = [float(bars.nth(i).evaluate("b => parseFloat(b.style.height)")) for i in range(10)]
    assert abs(sum(heights) - 100) < 1.5  # the bars are the 10 probabilities
    assert page.locator("#bars li.best .bar-label").inner_text() == page.locator("#digit").inner_text()
    expect(page.locator("#status")).to_contain_text("Prediction:")
    # the 28x28 image the model saw, enlarged
    expect(page.locator("#preprocessed")).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    assert page.locator("#preprocessed").evaluate("img => img.complete && img.naturalWidth") == 28
    # look inside: the MLP's first layer as its most active units' templates, the second as a heat map, logits
    expect(page.locator("#inside canvas.template")).to_have_count(12)
    expect(page.locator("#inside canvas.heatmap.units")).to_have_count(1)
    expect(page.locator("#inside .logits li")).to_have_count(10)
    lit = page.locator("#inside canvas.heatmap.units").first.evaluate(
        "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
        ".filter((v, i) => i % 4 === 0 && v > 100).length"
    )
    assert lit > 0  # some hidden units light up
    page.screenshot(path=str(tmp_path / "desktop-drawing.png"), full_page=True)

    page.get_by_role("button", name="Clear").click()
    expect(page.locator("#result")).to_be_hidden()
    expect(page.locator("#status")).to_have_text("Cleared. Draw a digit.")
    context.close()
    assert console.errors == []


def test_uploading_an_mnist_test_digit_shows_its_label(browser, server_url, predictor, mnist, tmp_path):
    from playwright.sync_api import expect

    from digitlab.serving import InferenceService

    service = InferenceService(predictor)  # exactly what the server runs on an upload
    for index in range(200):
        label = int(mnist.test_labels[index])
        buffer = io.BytesIO()
        Image.fromarray(mnist.test_images[index].numpy()).save(buffer, format="PNG")
        answer = service.predict_bytes(buffer.getvalue(), explain=False)
        if answer.digit == label and answer.confidence > 0.9:
            break
    else:
        pytest.fail("the trained model reads none of the first 200 test digits confidently")
    png = tmp_path / f"mnist-test-{index}-label-{label}.png"
    png.write_bytes(buffer.getvalue())

    context, page, console = open_page(browser, server_url, viewport={"width": 1200, "height": 1000})
    page.set_input_files("#upload", str(png))
    expect(page.locator("#status")).to_contain_text(f"Prediction: {label},")
    expect(page.locator("#digit")).to_have_text(str(label))
    expect(page.locator("#bars .bar")).to_have_count(10)
    page.screenshot(path=str(tmp_path / "desktop-upload.png"), full_page=True)
    context.close()
    assert console.errors == []


def test_phone_touch_and_keyboard(browser, server_url, tmp_path):
    from playwright.sync_api import expect

    context, page, console = open_page(
        browser,
        server_url,
        viewport={"width": 390, "height": 844},
        has_touch=True,
        is_mobile=True,
        device_scale_factor=2,
    )
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    box = page.locator("#pad").bounding_box()
    assert box["width"] <= 390
    page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # a touch pointer: a dot
    expect(page.locator("#digit")).to_have_text(re.compile(r"^[0-9]$"))
    expect(page.locator("#bars .bar")).to_have_count(10)
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)

    # keyboard: Tab reaches Clear, then the upload control; Enter on Clear clears
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "clear"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "upload"
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")
    expect(page.locator("#result")).to_be_hidden()
    context.close()
    assert console.errors == []


# ----------------------------------------------------------------------------------------------------------
# Issue 12: the page's defects, one test each
# ----------------------------------------------------------------------------------------------------------


def mnist_png(mnist, tmp_path: Path, index: int = 0) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(mnist.test_images[index].numpy()).save(buffer, format="PNG")
    path = tmp_path / f"mnist-{index}.png"
    path.write_bytes(buffer.getvalue())
    return path


def pad_pixels(page) -> list[int]:
    """The red channel of the pad's 280x280 pixels, row by row."""
    return page.locator("#pad").evaluate(
        "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data).filter((v, i) => i % 4 === 0)"
    )


def test_drawing_after_an_upload_starts_a_new_drawing(browser, server_url, mnist, tmp_path):
    from playwright.sync_api import expect

    context, page, console = open_page(browser, server_url, viewport={"width": 1280, "height": 800})
    page.set_input_files("#upload", str(mnist_png(mnist, tmp_path)))
    expect(page.locator("#status")).to_contain_text("Read from mnist-0.png")
    shown = pad_pixels(page)
    assert max(shown[y * 280 + x] for y in range(100, 180) for x in range(100, 180)) > 200  # the photo shows
    draw_stroke(page, [(0.05, 0.05), (0.25, 0.05)])  # a short stroke in a corner
    expect(page.locator("#status")).to_contain_text("Read from your drawing")
    pixels = pad_pixels(page)
    assert max(pixels[y * 280 + x] for y in range(100, 280) for x in range(0, 280)) == 0  # the photo is gone
    # what was sent is the pad as shown (the stroke alone): the server reads the pad's PNG the same way
    page.wait_for_timeout(500)
    shown_png = page.locator("#pad").evaluate("c => c.toDataURL('image/png')")
    expected = page.request.post(server_url + "api/predict", data={"image": shown_png}).json()["preprocessed"]
    assert page.locator("#preprocessed").get_attribute("src") == "data:image/png;base64," + expected
    context.close()
    assert console.errors == []


def test_failed_upload_clears_the_previous_answer(browser, server_url, tmp_path):
    from playwright.sync_api import expect

    context, page, console = open_page(browser, server_url, viewport={"width": 1280, "height": 800})
    draw_stroke(page, [(0.3, 0.25), (0.7, 0.25), (0.45, 0.85)])
    expect(page.locator("#why")).to_be_visible()
    expect(page.locator("#inside canvas.template").first).to_be_visible()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    page.set_input_files("#upload", str(broken))
    expect(page.locator("#status")).to_contain_text("could not read this image")
    expect(page.locator("#status")).to_have_class(re.compile("error"))
    expect(page.locator("#result")).to_be_hidden()
    assert page.locator("#digit").inner_text() == "" and page.locator("#why").is_hidden()
    assert page.locator("#preprocessed").get_attribute("src") is None
    expect(page.locator("#inside > *")).to_have_count(0)  # no maps, templates or logits left
    expect(page.locator("#inside-help")).to_be_visible()
    assert page.locator("#bars .bar-value").evaluate_all("els => els.map(e => e.textContent).join('')") == ""
    context.close()
    # the 400 itself is logged by chromium as a failed resource; nothing else may be
    assert all("400" in e for e in console.errors), console.errors


@pytest.mark.parametrize(
    "path, ready", [("", "#model-info"), ("docs", ".swagger-ui .opblock"), ("redoc", "text=Read one digit")]
)
def test_no_request_to_another_host(browser, server_url, path, ready):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    console = Console(page)
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    response = page.goto(server_url + path)
    expect(page.locator(ready).first).to_be_visible(timeout=TIMEOUT_MS)
    page.wait_for_timeout(500)  # late requests (ReDoc's logo was one)
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-eval" not in csp
    outside = [u for u in requests if not u.startswith(server_url) and not u.startswith(("data:", "blob:"))]
    assert outside == [], outside
    context.close()
    assert console.errors == []  # the policy blocks nothing these pages need


def test_narrow_phone_layout_and_header(browser, server_url):
    from playwright.sync_api import expect

    context, page, console = open_page(
        browser,
        server_url,
        viewport={"width": 320, "height": 640},
        has_touch=True,
        is_mobile=True,
        device_scale_factor=2,
    )
    draw_stroke(page, [(0.5, 0.15), (0.5, 0.85)])  # a 1
    expect(page.locator("#bars .bar-value").first).not_to_have_text("")
    expect(page.locator("#result")).to_be_visible()
    page.wait_for_timeout(500)  # the last answer is in
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    boxes = [page.locator("#bars .bar-value").nth(i).bounding_box() for i in range(10)]
    for left, right in zip(boxes, boxes[1:]):
        assert left["x"] + left["width"] <= right["x"] + 0.5, (left, right)  # labels never overlap
    header = page.locator("#model-info").inner_text()
    assert header.count("parameters") == 1, header
    visible_status = page.locator("#status").evaluate(
        "s => Array.from(s.childNodes).filter(n => n.nodeType === 3).map(n => n.textContent).join('')"
    )
    assert "Prediction" not in visible_status and "%" not in visible_status  # the big digit says it already
    expect(page.locator("#status")).to_contain_text("Prediction:")  # ... and screen readers hear it
    context.close()
    assert console.errors == []


def test_phone_shows_the_bars_while_drawing(browser, server_url):
    from playwright.sync_api import expect

    context, page, console = open_page(
        browser,
        server_url,
        viewport={"width": 390, "height": 844},
        has_touch=True,
        is_mobile=True,
        device_scale_factor=2,
    )
    draw_stroke(page, [(0.3, 0.25), (0.7, 0.25), (0.45, 0.85)])
    expect(page.locator("#bars .bar-value").first).not_to_have_text("")
    assert page.evaluate("window.scrollY") == 0
    bars = page.locator("#bars").bounding_box()
    assert bars["y"] + bars["height"] <= 844, bars  # above the fold, next to the pad
    context.close()
    assert console.errors == []


def test_small_drawing_gets_a_thinner_pen_and_a_hint(browser, server_url):
    from playwright.sync_api import expect

    context, page, console = open_page(browser, server_url, viewport={"width": 1280, "height": 800})
    draw_stroke(page, [(0.1, 0.05), (0.1, 0.25)])  # a tiny 1 in a corner: 56 px tall
    expect(page.locator("#size-hint")).to_be_visible()
    row = pad_pixels(page)[40 * 280 : 41 * 280]
    thin = sum(v > 128 for v in row)
    assert 4 <= thin <= 12, thin  # the pen follows the drawing's size: ~12% of it, not 22 px
    page.get_by_role("button", name="Clear").click()
    draw_stroke(page, [(0.5, 0.1), (0.5, 0.9)])
    expect(page.locator("#size-hint")).to_be_hidden()
    wide = sum(v > 128 for v in pad_pixels(page)[140 * 280 : 141 * 280])
    assert wide >= 20, wide
    context.close()
    assert console.errors == []


def test_why_view_names_the_runner_up_and_draws_the_saliency(browser, server_url):
    from playwright.sync_api import expect

    context, page, console = open_page(browser, server_url, viewport={"width": 1280, "height": 800})
    draw_stroke(page, [(0.3, 0.25), (0.7, 0.25), (0.45, 0.85)])
    expect(page.locator("#why")).to_be_visible()
    text = page.locator("#why-text").inner_text()
    match = re.search(r"most like a (\d), and next like a (\d)", text)
    assert match and match.group(1) == page.locator("#digit").inner_text() and match.group(1) != match.group(2)
    coloured = page.locator("#why-map").evaluate(
        "c => { const d = c.getContext('2d').getImageData(0, 0, 28, 28).data; let n = 0;"
        " for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - d[i + 2]) > 60) n++; return n; }"
    )
    assert coloured > 10  # orange and blue pixels over the grey digit
    expect(page.locator("#calibration")).to_contain_text("not calibrated")  # this checkpoint has no temperature
    headings = page.locator("#inside h3").all_inner_texts()
    assert "first hidden layer: 512 units" in headings and not any(re.fullmatch(r"\w+\d", h) for h in headings)
    context.close()
    assert console.errors == []


def test_not_sure_below_the_threshold(browser, predictor):
    from playwright.sync_api import expect

    from digitlab.serving import create_app

    with running(create_app(predictor, reject_below=1.0)) as url:
        context, page, console = open_page(browser, url, viewport={"width": 1280, "height": 800})
        draw_stroke(page, [(0.3, 0.25), (0.7, 0.25), (0.45, 0.85)])
        expect(page.locator("#confidence")).to_contain_text("not sure")
        expect(page.locator("#digit")).to_have_text("?")
        context.close()
    assert console.errors == []


def test_cnn_look_inside_shows_large_first_maps(browser, tmp_path):
    from playwright.sync_api import expect

    from digitlab.prediction import Predictor
    from digitlab.serving import create_app

    from .conftest import save_random_checkpoint

    cnn = Predictor.from_checkpoint(save_random_checkpoint(tmp_path / "cnn", "cnn"), device="cpu")
    with running(create_app(cnn)) as url:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        console = Console(page)
        page.goto(url)
        expect(page.locator("#model-info")).to_contain_text("Model: cnn")
        assert page.locator("#model-info").inner_text().count("parameters") == 1
        draw_stroke(page, [(0.3, 0.25), (0.7, 0.25), (0.45, 0.85)])
        expect(page.locator("#inside .maps.first canvas")).to_have_count(8)
        assert page.locator("#inside .maps.first canvas").first.bounding_box()["width"] >= 64
        headings = page.locator("#inside h3").all_inner_texts()
        assert any(h.startswith("first conv block") for h in headings), headings
        assert any(h.startswith("output scores") for h in headings), headings
        assert page.locator("#inside .layer p").count() == len(headings)  # a sentence for each
        context.close()
    assert console.errors == []


DOCS_IMG = Path(__file__).parents[1] / "docs" / "img"


def test_screenshots_for_the_docs(browser, server_url, tmp_path):
    """docs/img/serving-*.png when DIGITLAB_DOCS_SCREENSHOTS=1, else into the tmp dir (so it always runs)."""
    from playwright.sync_api import expect

    out = DOCS_IMG if os.environ.get("DIGITLAB_DOCS_SCREENSHOTS") == "1" else tmp_path
    seven = [(0.25, 0.22), (0.72, 0.22), (0.5, 0.55), (0.42, 0.85)]
    context, page, _ = open_page(browser, server_url, viewport={"width": 1280, "height": 800})
    draw_stroke(page, seven)
    expect(page.locator("#why")).to_be_visible()
    page.wait_for_timeout(300)
    page.screenshot(path=str(out / "serving-desktop.png"), full_page=True)
    page.locator(".result").screenshot(path=str(out / "serving-why.png"))
    context.close()
    context, page, _ = open_page(
        browser,
        server_url,
        viewport={"width": 390, "height": 844},
        has_touch=True,
        is_mobile=True,
        device_scale_factor=2,
    )
    draw_stroke(page, seven)
    expect(page.locator("#why")).to_be_visible()
    page.wait_for_timeout(300)
    page.screenshot(path=str(out / "serving-phone.png"))
    context.close()
    for name in ("desktop", "why", "phone"):
        assert (out / f"serving-{name}.png").stat().st_size > 10_000
