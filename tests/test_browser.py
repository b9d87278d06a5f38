"""The drawing page in a real browser: Debian's chromium, driven by Playwright, against a real uvicorn.

Draws a stroke with the mouse, taps with a finger on a phone-sized page, uploads an MNIST test digit,
walks the controls with the keyboard; asserts what the page shows and that the console stays clean.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from digitlab import checkpoint, data
from digitlab.checkpoint import CheckpointInfo
from digitlab.models import build_model

pytestmark = [pytest.mark.browser, pytest.mark.realdata]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
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
        batch = order[start:start + 128]
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        test_x = data.to_input(mnist.test_images, data.MNIST_MEAN, data.MNIST_STD)
        accuracy = (model(test_x).argmax(1) == mnist.test_labels).float().mean().item()
    base = tmp_path_factory.mktemp("browser-ckpt") / "best"
    info = CheckpointInfo(model="mlp", model_config={}, mean=data.MNIST_MEAN, std=data.MNIST_STD,
                          class_names=[str(d) for d in range(10)], metrics={"test_accuracy": accuracy}, epoch=1)
    checkpoint.save(base, model, info)
    return base.with_suffix(".safetensors")


@pytest.fixture(scope="module")
def predictor(trained_checkpoint):
    from digitlab.prediction import Predictor

    return Predictor.from_checkpoint(trained_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server_url(predictor) -> str:
    """`create_app` behind a real uvicorn on a free 127.0.0.1 port, in a thread of this process."""
    import uvicorn

    from digitlab.serving import bind_socket, create_app

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(predictor), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


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
    # look inside: the MLP's two hidden layers as heat maps, and 10 logits
    expect(page.locator("#inside canvas.heatmap.units")).to_have_count(2)
    expect(page.locator("#inside .logits li")).to_have_count(10)
    lit = page.locator("#inside canvas.heatmap.units").first.evaluate(
        "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
        ".filter((v, i) => i % 4 === 0 && v > 100).length")
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

    context, page, console = open_page(browser, server_url, viewport={"width": 390, "height": 844},
                                       has_touch=True, is_mobile=True, device_scale_factor=2)
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
