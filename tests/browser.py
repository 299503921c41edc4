"""Open a report in a real headless Chromium (Debian's, /usr/bin/chromium; .ci/run installs it) through
Playwright, from disk, with no network: what loaded, what did not, and a screenshot kept as a test
artefact in .test-artifacts/ (or $QDEEP_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ARTIFACTS = Path(os.environ.get("QDEEP_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / ".test-artifacts"))
# as root, in a container, on a closed network: no sandbox, no GPU, no background connections
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

PAGE_STATE = """() => ({
  images: [...document.images].map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0,
                                          width: i.naturalWidth})),
  sections: [...document.querySelectorAll("section.group")].map(s => s.id),
  headings: [...document.querySelectorAll("h2")].map(h => h.textContent),
  text: document.body.innerText,
})"""


def chromium() -> str:
    found = os.environ.get("QDEEP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError("the report tests need Chromium: apt-get install chromium (.ci/run does), "
                           "or set QDEEP_CHROMIUM to its path")
    return found


def open_report(html: Path, screenshot: str) -> dict:
    """Load `html` from disk; returns its images (alt, loaded, width), group sections, h2 headings and
    text, and the network requests the page made to anything but its own file (should be none);
    saves a full-page screenshot as ARTIFACTS/`screenshot`."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = Path(html).resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests = []
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("data:", url)) else None)
            page.goto(url, wait_until="load")
            state = page.evaluate(PAGE_STATE)
            page.screenshot(path=str(ARTIFACTS / screenshot), full_page=True)
        finally:
            browser.close()
    return {**state, "requests": requests, "screenshot": ARTIFACTS / screenshot}
