"""The paint studio (GET /) in a real browser: Debian's chromium driven by Playwright against
the real Serve app on 127.0.0.1. Screenshots go to out/studio/.

Skipped with a reason where chromium is not installed (``apt-get install chromium``), never
under CI=true, where .ci/run installs it.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import drills  # noqa: E402

from .conftest import REPO  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
SHOTS = REPO / "out" / "studio"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing under CI=true: .ci/run installs it with apt-get")
        pytest.skip("no chromium on this machine: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def vae_studio(ray_cluster, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One VAE app for the tests that only paint on it (what they change lives in each page).
    Tests that start apps of their own come first in this file: Serve runs one app set at a
    time, and this one stays up from its first user to the module's end."""
    with drills.running_app(drills.vae_app(tmp_path_factory.mktemp("studio"))) as base:
        yield base


@pytest.fixture()
def studio(vae_studio: str, browser):  # type: ignore[no-untyped-def]
    """A fresh page on the shared app."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(vae_studio + "/")
    page.wait_for_function("document.getElementById('photo').dataset.seq !== undefined", timeout=60_000)
    yield page, vae_studio
    assert not errors, errors  # no uncaught script error on the way
    page.close()


def photo_seq(page) -> int:  # type: ignore[no-untyped-def]
    return int(page.get_attribute("#photo", "data-seq") or 0)


def wait_new_photo(page, after: int, timeout: float = 60.0) -> float:  # type: ignore[no-untyped-def]
    """Seconds until the photo shown is newer than ``after``."""
    t0 = time.monotonic()
    page.wait_for_function(f"Number(document.getElementById('photo').dataset.seq || 0) > {after}", timeout=timeout * 1000)
    return time.monotonic() - t0


def canvas_box(page):  # type: ignore[no-untyped-def]
    return page.locator("#canvas").bounding_box()


def drag(page, points: list[tuple[float, float]]) -> None:  # type: ignore[no-untyped-def]
    """A stroke through canvas-relative points (0..1)."""
    box = canvas_box(page)
    xy = [(box["x"] + u * box["width"], box["y"] + v * box["height"]) for u, v in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for p in xy[1:]:
        page.mouse.move(*p, steps=8)
    page.mouse.up()


def canvas_pixels(page) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The canvas at its own resolution (the model's input size), RGB."""
    data = page.evaluate("""() => {
        const c = document.getElementById('canvas');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
    }""")
    size = page.evaluate("[document.getElementById('canvas').width, document.getElementById('canvas').height]")
    return np.asarray(data, dtype=np.uint8).reshape(size[1], size[0], 4)[..., :3]


def photo_pixels(page) -> np.ndarray:  # type: ignore[no-untyped-def]
    data = page.evaluate("""async () => {
        const blob = await (await fetch(document.getElementById('photo').src)).blob();
        const buf = new Uint8Array(await blob.arrayBuffer());
        return Array.from(buf);
    }""")
    return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB"))


def palette(page) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    return [tuple(c) for c in page.evaluate("fetch('/v1/model').then(r => r.json()).then(m => m.classes.map(c => c.color))")]


def test_switching_models_resizes_and_relabels_the_canvas(ray_cluster, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from spade_core.config import GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig

    square = ModelConfig(labels=LabelConfig(label_nc=12), generator=GeneratorConfig(ngf=8, crop_size=64, spade=SpadeConfig(hidden=16)))
    wide = ModelConfig(labels=LabelConfig(label_nc=6), generator=GeneratorConfig(ngf=8, crop_size=64, aspect_ratio=2.0,
                                                                                  spade=SpadeConfig(hidden=16)))
    args = {"models": [{"name": "square", "checkpoint": str(drills.write_checkpoint(square, tmp_path / "square"))},
                       {"name": "wide", "checkpoint": str(drills.write_checkpoint(wide, tmp_path / "wide", seed=1))}],
            "ingress": {"num_cpus": 0.1}, "generator": {"num_cpus": 0.2}}
    with drills.running_app(args) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('photo').dataset.seq !== undefined", timeout=60_000)
        assert page.is_visible("#model-picker") and page.eval_on_selector("#model", "s => s.options.length") == 2
        page.click('#palette button[data-id="9"]')  # class_9: the wide model has 6 classes
        drag(page, [(0.1, 0.5), (0.9, 0.5)])
        seq = photo_seq(page)
        page.select_option("#model", "wide")
        page.wait_for_function("document.getElementById('notice').textContent.includes('Model changed')", timeout=60_000)
        wait_new_photo(page, seq)
        message = page.inner_text("#notice")
        assert "resized to the model's 64×32" in message and "became class_0" in message, message
        assert page.evaluate("[document.getElementById('canvas').width, document.getElementById('canvas').height]") == [64, 32]
        assert page.inner_text("#status").startswith("wide")
        page.screenshot(path=str(SHOTS / "model_switch.png"))
        page.close()


def test_the_page_keeps_working_across_a_server_restart(ray_cluster, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Serve goes down under an open page and comes back on the same port with another model:
    the page says so, retries on its own, and adopts the new model without a reload."""
    from ray import serve

    from spade_core.config import GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig

    errors: list[str] = []
    with drills.running_app(drills.vae_app(tmp_path)) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('photo').dataset.seq !== undefined", timeout=60_000)
        page.click('#palette button[data-id="2"]')
        drag(page, [(0.2, 0.5), (0.8, 0.5)])

        serve.shutdown()
        seq = photo_seq(page)
        drag(page, [(0.2, 0.7), (0.8, 0.7)])  # drawn while the server is away
        page.wait_for_function("document.getElementById('message').textContent.includes('cannot be reached')", timeout=30_000)

        wide = ModelConfig(labels=LabelConfig(label_nc=6), generator=GeneratorConfig(
            ngf=8, crop_size=64, aspect_ratio=2.0, spade=SpadeConfig(hidden=16)))
        serve.start(http_options={"host": "127.0.0.1", "port": int(base.rsplit(":", 1)[1])})
        drills.deploy({"checkpoint": str(drills.write_checkpoint(wide, tmp_path / "wide")), "ingress": {"num_cpus": 0.1},
                       "generator": {"num_cpus": 0.2}}, name="drill")
        wait_new_photo(page, seq, timeout=90.0)  # no reload, no click: the page retried on its own
        page.wait_for_function("document.getElementById('canvas').width === 64 && document.getElementById('canvas').height === 32",
                               timeout=60_000)
        assert "Model changed" in page.inner_text("#notice")
        page.wait_for_function("document.getElementById('message').textContent === ''", timeout=30_000)
        labels = canvas_pixels(page)
        assert labels.shape == (32, 64, 3)
        assert tuple(labels[16, 32]) == palette(page)[2]  # the stroke drawn before the restart, relabelled by name
        page.screenshot(path=str(SHOTS / "after_restart.png"))
        page.close()
    assert not errors, errors


def test_strokes_of_two_classes_draw_a_photo_that_differs_where_they_do(studio) -> None:  # type: ignore[no-untyped-def]
    page, _ = studio
    colours = palette(page)
    page.click('#palette button[data-id="1"]')
    page.fill("#size", "20")
    page.dispatch_event("#size", "input")
    seq = photo_seq(page)
    drag(page, [(0.1, 0.2), (0.9, 0.2), (0.9, 0.3), (0.1, 0.3)])
    page.click('#palette button[data-id="5"]')
    drag(page, [(0.1, 0.75), (0.9, 0.75), (0.9, 0.85), (0.1, 0.85)])
    wait_new_photo(page, seq)
    page.wait_for_timeout(1000)  # answers to the first stroke's request have arrived
    seq = photo_seq(page)
    drag(page, [(0.45, 0.5), (0.55, 0.5)])  # one more stroke, timed from its pointer-up to the new photo
    latency = wait_new_photo(page, seq)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "two_classes.png"))
    labels = canvas_pixels(page)
    # every pixel is exactly a class colour: no anti-aliased blends were drawn or uploaded
    assert {tuple(p) for p in labels.reshape(-1, 3)} <= set(colours)
    h, w, _ = labels.shape
    assert tuple(labels[h // 4, w // 2]) == colours[1] and tuple(labels[4 * h // 5, w // 2]) == colours[5]
    photo = photo_pixels(page)
    assert photo.shape == (h, w, 3)
    top = photo[int(0.2 * h):int(0.3 * h), int(0.2 * w):int(0.8 * w)].reshape(-1, 3).mean(0)
    bottom = photo[int(0.75 * h):int(0.85 * h), int(0.2 * w):int(0.8 * w)].reshape(-1, 3).mean(0)
    assert np.abs(top - bottom).max() > 2.0, (top, bottom)  # the classes drew different things
    print(f"stroke to photo: {latency * 1e3:.0f} ms, the {120} ms debounce included "
          f"(the page's request: {page.get_attribute('#photo', 'data-latency-ms')} ms)")


def test_fill_undo_redo_and_the_eyedropper(studio) -> None:  # type: ignore[no-untyped-def]
    page, _ = studio
    colours = palette(page)
    box = canvas_box(page)
    page.click('#palette button[data-id="7"]')
    page.keyboard.press("f")
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    filled = canvas_pixels(page)
    assert {tuple(p) for p in filled.reshape(-1, 3)} == {colours[7]}  # the empty canvas was one region
    page.keyboard.press("Control+z")
    assert {tuple(p) for p in canvas_pixels(page).reshape(-1, 3)} == {colours[0]}
    page.keyboard.press("Control+Shift+z")
    assert {tuple(p) for p in canvas_pixels(page).reshape(-1, 3)} == {colours[7]}
    page.click('#palette button[data-id="2"]')
    page.keyboard.press("i")
    page.mouse.click(box["x"] + 5, box["y"] + 5)
    assert "(7)" in page.inner_text("#current-name")


def test_a_style_image_is_encoded_once_and_changes_the_photo(studio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    page, _ = studio
    seq = photo_seq(page)
    drag(page, [(0.2, 0.5), (0.8, 0.5)])
    wait_new_photo(page, seq)
    before = photo_pixels(page)
    style = tmp_path / "style.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(style)
    seq = photo_seq(page)
    page.set_input_files("#style-file", str(style))
    page.wait_for_selector("#recent-styles button", timeout=60_000)  # encoded once, kept in the row
    wait_new_photo(page, seq)
    assert page.locator("#recent-styles button").count() == 1
    after = photo_pixels(page)
    assert np.abs(before.astype(int) - after.astype(int)).max() > 0
    page.screenshot(path=str(SHOTS / "style.png"))


def test_a_bad_upload_shows_a_readable_message(studio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    page, _ = studio
    bad = tmp_path / "labels.png"
    bad.write_text("this is not a PNG")
    page.set_input_files("#load", str(bad))
    page.wait_for_function("document.getElementById('message').textContent.includes('not an image')", timeout=10_000)
    style = tmp_path / "style.png"
    style.write_text("not an image either")
    page.set_input_files("#style-file", str(style))
    page.wait_for_function("document.getElementById('message').textContent.includes('style')", timeout=30_000)
    page.screenshot(path=str(SHOTS / "bad_upload.png"))


def test_the_studio_files_are_served_and_nothing_outside_their_folder(studio) -> None:  # type: ignore[no-untyped-def]
    import requests

    _, base = studio
    js = requests.get(base + "/studio/studio.js", timeout=30)
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "encodeLabelPng" in js.text
    for escape in ("/studio/../ingress.py", "/studio/%2e%2e/ingress.py", "/studio/..%2fconfig.py"):
        r = requests.get(base + escape, timeout=30)
        assert r.status_code == 404 and "InputError" not in r.text, escape


def test_pen_and_touch_strokes_paint_like_the_mouse(vae_studio: str, browser) -> None:  # type: ignore[no-untyped-def]
    """Real pen and touch input through Chromium's input pipeline (CDP), not synthetic DOM events."""
    base = vae_studio
    context = browser.new_context(viewport={"width": 1400, "height": 900}, has_touch=True)
    page = context.new_page()
    page.goto(base + "/")
    page.wait_for_function("document.getElementById('photo').dataset.seq !== undefined", timeout=60_000)
    colours = palette(page)
    cdp = context.new_cdp_session(page)
    box = canvas_box(page)

    def xy(u: float, v: float) -> dict[str, float]:
        return {"x": box["x"] + u * box["width"], "y": box["y"] + v * box["height"]}

    page.click('#palette button[data-id="3"]')
    seq = photo_seq(page)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [xy(0.1, 0.25)]})
    for i in range(1, 9):
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [xy(0.1 + 0.1 * i, 0.25)]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    wait_new_photo(page, seq)

    page.click('#palette button[data-id="4"]')
    seq = photo_seq(page)
    pen = {"pointerType": "pen", "button": "left", "clickCount": 1}
    cdp.send("Input.dispatchMouseEvent", {"type": "mousePressed", **xy(0.1, 0.75), **pen, "buttons": 1})
    for i in range(1, 9):
        cdp.send("Input.dispatchMouseEvent", {"type": "mouseMoved", **xy(0.1 + 0.1 * i, 0.75), "pointerType": "pen", "buttons": 1})
    cdp.send("Input.dispatchMouseEvent", {"type": "mouseReleased", **xy(0.9, 0.75), **pen, "buttons": 0})
    wait_new_photo(page, seq)

    labels = canvas_pixels(page)
    h, w, _ = labels.shape
    assert all(tuple(labels[h // 4, int(u * w)]) == colours[3] for u in (0.2, 0.5, 0.8))  # the touch stroke, unbroken
    assert all(tuple(labels[3 * h // 4, int(u * w)]) == colours[4] for u in (0.2, 0.5, 0.8))  # the pen stroke
    assert tuple(labels[h // 2, w // 2]) == colours[0]
    page.screenshot(path=str(SHOTS / "pen_and_touch.png"))
    context.close()
