"""Latency of the paint studio, stroke to updated photo, measured in a real browser.

    python bench/studio.py [--crop 256] [--strokes 12] [--screenshot docs/studio.png]

Serves a random-weight model of the ADE20K architecture (151 label channels, ngf 64) on a
local Ray, opens GET / in Debian's chromium through Playwright, starts from the
"landscape" sample, then draws ``--strokes`` strokes of ADE20K classes and times each from
the pointer's release to the new photo on the page (the page's 120 ms debounce included),
next to the page's own request time. The figures are this machine's: one generator replica
with both cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import numpy as np  # noqa: E402

import drills  # noqa: E402
import drills_load  # noqa: E402

STROKE_CLASSES = ["tree", "water", "rock", "field", "mountain", "sky"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=int, default=256, help="the model's output size (ADE20K: 256)")
    parser.add_argument("--strokes", type=int, default=12)
    parser.add_argument("--screenshot", type=Path, default=REPO / "out" / "studio" / "ade20k.png")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        print("no chromium: apt-get install chromium", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, drills.local_ray(num_cpus=4):
        checkpoint = drills.write_checkpoint(drills_load.ade20k_architecture(args.crop), Path(tmp) / "ade20k")
        app = {"checkpoint": str(checkpoint), "ingress": {"num_cpus": 0.5}, "generator": {"num_cpus": 2},
               "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.005}}
        with drills.running_app(app) as base, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('photo').dataset.seq !== undefined", timeout=300_000)
            seq = lambda: int(page.get_attribute("#photo", "data-seq") or 0)  # noqa: E731
            before = seq()
            page.click("#samples button:has-text('landscape')")
            page.wait_for_function(f"Number(document.getElementById('photo').dataset.seq) > {before}", timeout=300_000)
            box = page.locator("#canvas").bounding_box()
            rng = np.random.default_rng(0)
            walls, requests_ms = [], []
            for i in range(args.strokes):
                name = STROKE_CLASSES[i % len(STROKE_CLASSES)]
                page.fill("#search", name)
                page.dispatch_event("#search", "input")
                page.click("#palette button >> nth=0")
                page.fill("#search", "")
                page.dispatch_event("#search", "input")
                page.wait_for_timeout(300)
                before = seq()
                x0, y0 = rng.uniform(0.1, 0.6, 2)
                page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
                page.mouse.down()
                page.mouse.move(box["x"] + (x0 + 0.3) * box["width"], box["y"] + (y0 + 0.2) * box["height"], steps=10)
                page.mouse.up()
                t0 = time.monotonic()
                page.wait_for_function(f"Number(document.getElementById('photo').dataset.seq) > {before}", timeout=300_000)
                walls.append(1e3 * (time.monotonic() - t0))
                requests_ms.append(float(page.get_attribute("#photo", "data-latency-ms")))
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.screenshot))
            browser.close()
    print(f"ADE20K architecture at {args.crop}x{args.crop}, {args.strokes} strokes, one replica with 2 CPUs:")
    print(f"  stroke release -> new photo   p50 {np.median(walls):7.0f} ms   max {max(walls):7.0f} ms  (120 ms debounce included)")
    print(f"  the page's request            p50 {np.median(requests_ms):7.0f} ms   max {max(requests_ms):7.0f} ms")
    print(f"screenshot: {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
