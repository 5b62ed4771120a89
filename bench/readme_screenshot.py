"""Screenshot of the search tab of ``python app.py`` for the README (docs/screenshot-search.png).

Starts the app, runs one example caption in headless Debian Chromium, saves a small palette PNG.

    python bench/readme_screenshot.py [--out docs/screenshot-search.png]
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import REPO, AppServer  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshot-search.png"))
    parser.add_argument("--query", default="Two dogs playing in the snow .")
    parser.add_argument("--roles")
    parser.add_argument("--width", type=int, default=960)
    args = parser.parse_args()
    server = AppServer(*(["--roles", args.roles] if args.roles else []), env={"HF_HUB_OFFLINE": "1"})
    try:
        server.wait_serving()
        server.wait_warm()
        from PIL import Image
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(120_000)
            page.goto(server.url)
            page.fill("#query textarea", args.query)
            page.click("#search-btn")
            page.wait_for_function("document.querySelectorAll('#col-0-gallery img').length >= 8")
            page.wait_for_timeout(1500)  # let thumbnails finish loading
            png = page.screenshot(full_page=True)
            browser.close()
        image = Image.open(io.BytesIO(png)).convert("RGB")
        image = image.resize((args.width, round(image.height * args.width / image.width)), Image.LANCZOS)
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
        print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
