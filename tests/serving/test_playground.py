"""The playground page in a real browser (headless Chromium driven by Playwright) against a real
`klein serve` on loopback, with API keys and a LoRA registry: a prompt typed and submitted, progress
and previews seen, the image shown, downloaded and copied as curl; an edit with an uploaded reference;
a bad size and an unknown adapter shown at their fields; the page at phone width. Screenshots go to
test-artifacts/playground/ (or $KLEIN_TEST_ARTIFACTS/playground/)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.serving.conftest import start_klein_serve, stop_klein_serve

pytestmark = pytest.mark.slow  # `klein serve` with its own Ray, and a browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("KLEIN_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "playground"
KEY = "pg-test-key-0123456789abcdef"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]  # fmt: skip

# Everything the page shows in #status, #step-text and #preview-image, kept as it happens.
WATCH = """
window.__seen = {status: [], steps: [], previews: 0};
new MutationObserver(() => {
  const s = document.getElementById('status'), t = document.getElementById('step-text');
  const p = document.getElementById('preview-image');
  if (s && window.__seen.status.at(-1) !== s.textContent) window.__seen.status.push(s.textContent);
  if (t && t.textContent && window.__seen.steps.at(-1) !== t.textContent) window.__seen.steps.push(t.textContent);
  if (p && p.getAttribute('src') && p.getAttribute('src') !== window.__lastPreview) {
    window.__lastPreview = p.getAttribute('src'); window.__seen.previews += 1;
  }
}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`klein serve` (tiny Base model: steps and guidance in the form) with a key and a LoRA folder."""
    tmp = tmp_path_factory.mktemp("playground")
    (tmp / "loras").mkdir()
    env = {
        "KLEIN_STORAGE__ROOT": str(tmp / "data"),
        "KLEIN_API_KEYS": KEY,
        "KLEIN_LORA__ROOT": str(tmp / "loras"),
    }
    proc, url, lines = start_klein_serve(["--preset", "tiny-base"], tmp, **env)
    if not any("klein-serve is up" in line for line in lines):
        stop_klein_serve(proc)
        pytest.fail("klein serve did not come up:\n" + "".join(lines[-30:]))
    yield url
    stop_klein_serve(proc)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        if CHROMIUM.exists():
            b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        else:  # where tests/browser/ensure-chromium.sh installed Playwright's own build
            b = p.chromium.launch(args=CHROMIUM_ARGS)
        yield b
        b.close()


def _page(browser, url: str, width: int, height: int):
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.add_init_script(WATCH)
    page.goto(url + "/")
    page.fill("#api-key", KEY)
    page.wait_for_selector("#model option", state="attached")
    return page, errors


def _posts(page) -> list[dict]:
    """The JSON bodies the page POSTs to the API, as it sends them."""
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.method == "POST" else None)
    return sent


def _wait_state(page, *states: str, timeout: float = 120) -> str:
    selector = ", ".join(f"body[data-state='{s}']" for s in states)
    page.wait_for_selector(selector, state="attached", timeout=timeout * 1000)
    return page.evaluate("document.body.dataset.state")


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_the_page_needs_no_key_and_the_api_does(server):
    r = httpx.get(server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for asset, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        r = httpx.get(f"{server}/playground/{asset}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    assert "http://" not in httpx.get(server + "/playground/playground.js").text.replace("http://test", "")
    assert httpx.get(server + "/playground/nothing.js").status_code == 404
    assert httpx.get(server + "/v1/models").status_code == 401
    info = httpx.get(server + "/v1/models", headers={"x-key": KEY}).json()["data"][0]["klein"]
    assert info["cfg"] is True and info["lora"]["max_loras"] == 3 and info["size"]["multiple"] == 16


def test_generate_watch_download_and_copy(server, browser):
    page, errors = _page(browser, server, 1280, 900)
    sent = _posts(page)
    assert page.is_visible("#steps-row") and page.is_visible("#guidance-row")  # a Base model
    page.fill("#prompt", "a lighthouse on a cliff at dawn")
    page.select_option("#size-preset", "custom")
    page.fill("#width", "512")
    page.fill("#height", "384")
    page.fill("#steps", "40")  # a few seconds on the CPU: long enough to watch
    page.uncheck("#seed-random")
    page.fill("#seed", "1234")
    page.click("#submit")
    assert _wait_state(page, "done", "error") == "done", page.inner_text("#error")
    seen = page.evaluate("window.__seen")
    assert any(s.startswith("step ") and not s.startswith("step 40 ") for s in seen["steps"]), seen
    assert seen["previews"] >= 1, seen  # previews arrived while it ran
    assert sent[-1]["preview"] is True and sent[-1]["steps"] == 40 and sent[-1]["width"] == 512
    # the page is done once the job is Ready and the image's link is set; the browser loads it after
    page.wait_for_function("document.querySelector('#result-image').complete", timeout=30_000)
    size = page.evaluate(
        "[document.querySelector('#result-image').naturalWidth, document.querySelector('#result-image').naturalHeight]"
    )
    assert size == [512, 384]
    meta = page.inner_text("#result-meta")
    assert "1234" in meta and "512x384" in meta and "cost" in meta
    with page.expect_download() as download:
        page.click("#download")
    assert Image.open(download.value.path()).size == (512, 384)
    page.click("#copy-curl")
    curl = page.inner_text("#curl")
    assert curl.startswith("curl -X POST") and KEY not in curl and '"seed":1234' in curl.replace(" ", "")
    assert page.locator("#history .history-item").count() >= 1
    _shot(page, "generate-1280")
    assert errors == []


def test_edit_with_an_uploaded_reference(server, browser, tmp_path):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (320, 256), (40, 120, 200)).save(ref)
    page, errors = _page(browser, server, 1280, 900)
    sent = _posts(page)
    page.fill("#prompt", "make it red")
    page.set_input_files("#references", str(ref))
    page.wait_for_selector("#ref-list img")
    page.select_option("#size-preset", "custom")
    page.fill("#width", "320")
    page.fill("#height", "256")
    page.click("#submit")
    assert _wait_state(page, "done", "error") == "done", page.inner_text("#error")
    assert sent[-1]["input_image"].startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(httpx.get(page.get_attribute("#result-image", "src")).content))
    assert decoded.size == (320, 256)
    _shot(page, "edit-1280")
    assert errors == []


def test_errors_show_at_the_field_the_api_named(server, browser):
    page, errors = _page(browser, server, 1280, 900)
    sent = _posts(page)
    page.fill("#prompt", "x")
    page.select_option("#size-preset", "custom")
    page.fill("#width", "1000")  # not a multiple of 16: caught in the page, nothing sent
    page.click("#submit")
    page.wait_for_selector(".field-error[data-field='width']:not([hidden])")
    assert "16" in page.inner_text(".field-error[data-field='width']") and sent == []
    _shot(page, "bad-size")

    page.fill("#width", "256")
    page.fill("#height", "256")
    page.click("#add-lora")
    page.fill("#lora-list input[type='text']", "no-such-adapter")
    page.click("#submit")  # the service answers 422 naming loras[0].path
    assert _wait_state(page, "error") == "error"
    assert "no-such-adapter" in json.dumps(sent[-1]["loras"])
    page.wait_for_selector(".field-error[data-field='loras.0']:not([hidden])")
    assert "loras" in page.inner_text("#error")
    _shot(page, "unknown-adapter")
    assert errors == []


def test_phone_width(server, browser):
    page, errors = _page(browser, server, 390, 844)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
    page.fill("#prompt", "a small boat")
    page.select_option("#size-preset", "custom")
    page.fill("#width", "256")
    page.fill("#height", "256")
    page.click("#submit")
    assert _wait_state(page, "done", "error") == "done", page.inner_text("#error")
    assert page.is_visible("#result-image")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    _shot(page, "phone-390")
    assert errors == []
