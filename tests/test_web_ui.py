"""The chat page at `/` (maxjax/serve/web): its routes on a server that has no model yet (the page and its files
are open, /v1 still takes the key; `web_ui=False` leaves `/` a 404), and the page itself in a real headless
Chromium against the session's real `max serve`: it asks for the API key on 401, streams an answer, stops one
mid-stream with the Stop button and keeps the conversation across a reload.

The browser is Debian's `chromium` package (`make test` installs it), driven by Playwright for Python, which
talks the DevTools protocol to the executable it is given and downloads nothing. Set MAXJAX_CHAT_SCREENSHOT to a
path (docs/chat-page.png) to keep the mid-stream screenshot.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from PIL import Image

from maxjax.config import ServerConfig
from maxjax.serve.app import ServingState
from maxjax.serve.web import ASSETS
from tests.serve_helpers import API_KEY, RealServer, Server, running_server

WEB = Path(__file__).resolve().parents[1] / "maxjax" / "serve" / "web"


@pytest.fixture(scope="module")
def page_server() -> Iterator[Server]:
    """A server still loading its model, with an API key: what the page routes need is no model and no key."""
    with running_server(ServingState(model_name="m"), ServerConfig(host="127.0.0.1", port=0, api_key="k")) as srv:
        yield srv


def test_the_page_and_its_files_are_served_without_the_key(page_server: Server) -> None:
    page = httpx.get(page_server.url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.content == (WEB / "index.html").read_bytes()
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # Everything it loads is its own: no CDN, no inline script.
    refs = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert refs and all(ref.startswith("/static/") or ref.startswith("data:") for ref in refs), refs
    assert {ref.removeprefix("/static/") for ref in refs if ref.startswith("/static/")} == set(ASSETS)
    assert "<script>" not in page.text
    for name, kind in ASSETS.items():
        asset = httpx.get(f"{page_server.url}/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"] == kind
        assert asset.content == (WEB / name).read_bytes()
    missing = httpx.get(page_server.url + "/static/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Unknown route GET /static/nope.js."
    assert httpx.get(page_server.url + "/v1/models").status_code == 401  # the API itself still takes the key


def test_no_web_ui_leaves_the_root_a_404() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, web_ui=False)
    with running_server(ServingState(model_name="m"), config) as srv:
        for path in ("/", "/static/app.js"):
            response = httpx.get(srv.url + path)
            assert response.status_code == 404
            assert response.json()["error"] == {"message": f"Unknown route GET {path}.",
                                                "type": "invalid_request_error", "param": None, "code": None}


# -- in Chromium -------------------------------------------------------------------------------------------------

MARKDOWN = """# Title <b>x</b>
Some **bold**, *italic*, `a<b>` and a [link](https://example.com/?a=1&b=2), not [this](javascript:alert(1)).
<img src=x onerror=alert(1)>

- one
- two

```python
print("<hi>")  # **not bold**
```"""


def chromium() -> str:
    """Debian's chromium; the test fails (never skips) without it."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed, and the chat page's test needs it: install Debian's package with "
                "`apt-get update && apt-get install -y chromium` (`make test` does this).", pytrace=False)


def check_screenshot(png: bytes) -> None:
    """A real page: a PNG of some size, with more than one colour in it."""
    assert len(png) > 10_000, f"screenshot of {len(png)} bytes"
    image = Image.open(io.BytesIO(png)).convert("L")
    assert image.size == (1280, 800)
    low, high = image.getextrema()
    assert high - low > 100, "the screenshot is blank"


def test_chat_page_in_chromium(real_server: RealServer) -> None:
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium())
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.set_default_timeout(15_000)
            page.goto(real_server.url + "/")

            # The page's first /v1 call is answered 401: it asks for the key, then names the model.
            expect(page.locator("#key-dialog")).to_be_visible()
            page.fill("#api-key", API_KEY)
            page.click("#save-key")
            expect(page.locator("#key-dialog")).to_be_hidden()
            expect(page.locator("#model-name")).to_have_text("smollm2")

            html = page.evaluate("(text) => window.maxjaxMarkdown.render(text)", MARKDOWN)
            assert "<h1>Title &lt;b&gt;x&lt;/b&gt;</h1>" in html
            assert "<strong>bold</strong>" in html and "<em>italic</em>" in html
            assert "<code>a&lt;b&gt;</code>" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
            assert re.findall(r'href="([^"]*)"', html) == ["https://example.com/?a=1&amp;b=2"]
            assert "<ul><li>one</li><li>two</li></ul>" in html
            assert "<pre><code>print(&quot;&lt;hi&gt;&quot;)  # **not bold**</code></pre>" in html
            assert not re.search(r"<(?!/?(?:h1|p|br|strong|em|code|a|ul|li|div|span|button|pre)\b)", html), html

            # A whole answer, streamed; the page measures its TTFT and tok/s.
            page.fill("#system-prompt", "You are a helpful assistant.")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "80")
            page.fill("#prompt", "Write a Python function that reverses a string.")
            page.keyboard.press("Enter")
            expect(page.locator("#stop")).to_be_hidden(timeout=20_000)
            first = page.locator(".msg.assistant").last
            assert first.locator(".bubble").inner_text().strip()
            meta = first.locator(".meta").inner_text()
            assert re.search(r"TTFT \d+", meta) and re.search(r"[\d.]+ tok/s", meta) and "tokens" in meta, meta
            assert page.locator("#live-ttft").inner_text() != "–"

            # A long answer: it grows while we watch (at least twice, and to a few lines for the screenshot), then
            # the Stop button ends it mid-stream.
            page.fill("#max-tokens", "200")
            page.fill("#prompt", "Tell me a long story about a dragon who learns to bake bread.")
            page.click("#send")
            answer = page.locator(".msg.assistant .bubble").last
            lengths = [0]
            deadline = time.monotonic() + 20
            while sum(b > a for a, b in zip(lengths, lengths[1:], strict=False)) < 2 or lengths[-1] < 150:
                assert page.locator("#stop").is_visible(), f"the answer ended before it could be stopped: {lengths}"
                assert time.monotonic() < deadline, f"the answer did not grow: {lengths}"
                page.wait_for_timeout(100)
                lengths.append(len(answer.inner_text()))
            png = page.screenshot()
            check_screenshot(png)
            if target := os.environ.get("MAXJAX_CHAT_SCREENSHOT"):
                Path(target).write_bytes(png)
            page.click("#stop")
            expect(page.locator("#send")).to_be_visible()
            expect(page.locator(".msg.assistant .meta").last).to_contain_text("stopped")
            stopped = answer.inner_text()
            page.wait_for_timeout(500)
            assert answer.inner_text() == stopped and len(stopped) >= lengths[-1]

            # The conversation (and the key) survive a reload; "New chat" clears it.
            page.reload()
            expect(page.locator("#model-name")).to_have_text("smollm2")
            assert not page.locator("#key-dialog").is_visible()
            expect(page.locator(".msg")).to_have_count(4)
            assert page.locator(".msg.assistant .bubble").last.inner_text() == stopped
            page.click("#new-chat")
            expect(page.locator(".msg")).to_have_count(0)
            expect(page.locator("#empty")).to_be_visible()
            assert page.evaluate("localStorage.getItem('maxjax.messages')") == "[]"

            # The server's figures, from /metrics.
            total = int(real_server.metric("maxjax_kv_pages_total"))
            expect(page.locator("#m-kv")).to_have_text(re.compile(rf"^\d+ / {total}$"))
        finally:
            browser.close()
    assert not errors, errors
