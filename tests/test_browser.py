"""The web chat page in a real browser: headless Chromium (Debian's `chromium` package) driven by
Playwright's Python package, against a live server with a tiny model and a tiny collection.
Skips when either is missing; `.ci/run` installs both. To run it alone:

    apt-get install chromium && pip install playwright   # (no `playwright install`: Debian's browser is used)
    python -m pytest tests/test_browser.py     # screenshots go to $LMFORGE_SCREENSHOTS (default: a temp folder)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")
CHROMIUM = next((p for p in (os.environ.get("LMFORGE_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p), None)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")]

from conftest import LiveServer, tiny_chat_lm  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("LMFORGE_HOME")
    os.environ["LMFORGE_HOME"] = str(home)
    from lmforge.rag.collection import Collection
    from lmforge.server.service import Limits, Service

    with Collection.open("notes", create=True) as col:  # (BM25 only: no embedding model served)
        col.add_documents([("rivers.txt", "The Danube flows through ten countries and ends in the Black Sea."),
                           ("music.txt", "A violin has four strings tuned in perfect fifths.")])
    srv = LiveServer(Service({"tiny-chat": tiny_chat_lm(stop=False)}, collections=["notes"],
                             limits=Limits(max_tokens=4000)))
    yield srv
    srv.close()
    if old is None:
        os.environ.pop("LMFORGE_HOME", None)
    else:
        os.environ["LMFORGE_HOME"] = old


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1200, "height": 800})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(server.url + "/")
        yield pg
        browser.close()
        assert not errors, errors


def shots() -> Path:
    d = Path(os.environ.get("LMFORGE_SCREENSHOTS") or Path(os.environ.get("TMPDIR", "/tmp")) / "lmforge-screens")
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_chat_stop_and_documents_in_a_browser(page, server):
    pg = page
    pg.wait_for_selector("#status.ok")
    assert pg.locator("#model option").all_inner_texts() == ["tiny-chat"]
    # a short reply streams in and is kept, with its token count
    pg.click("#settings-btn")
    pg.fill("#max_tokens", "24")
    pg.fill("#temperature", "0")
    pg.click("#settings-btn")
    pg.fill("#input", "Hello there")
    pg.keyboard.press("Enter")
    pg.wait_for_selector(".msg.assistant .meta:has-text('tokens')", timeout=60_000)
    reply = pg.locator(".msg.assistant .bubble").last.inner_text()
    assert reply.strip() and pg.locator(".msg.user .bubble").first.inner_text() == "Hello there"
    # token probabilities: each token a span, its alternatives on hover
    pg.check("#show-probs")
    assert pg.locator(".tok").count() > 5
    pg.hover(".tok >> nth=2")
    assert pg.locator("#tooltip .row").count() >= 2
    pg.uncheck("#show-probs")
    # a long reply, stopped mid-way: the stop button ends it and frees the slot
    pg.click("#settings-btn")
    pg.fill("#max_tokens", "3000")
    pg.click("#settings-btn")
    pg.fill("#input", "Now go on for a long time")
    pg.keyboard.press("Enter")
    pg.wait_for_selector("#stop:not([hidden])")
    pg.wait_for_function("document.querySelectorAll('.msg.assistant .bubble')[1]?.innerText.length > 20")
    pg.click("#stop")
    pg.wait_for_selector(".msg.assistant .meta:has-text('stopped')", timeout=10_000)
    assert pg.locator("#send").is_visible()
    engine = server.service.models["tiny-chat"].lm.engine
    for _ in range(100):
        if engine.active == 0:
            break
        pg.wait_for_timeout(50)
    assert engine.active == 0
    # regenerate replaces the stopped reply; edit and resend rewrites the conversation from there
    pg.click("#settings-btn")
    pg.fill("#max_tokens", "16")
    pg.click("#settings-btn")
    pg.click(".msg.assistant >> nth=1 >> button.regenerate")
    pg.wait_for_selector(".msg.assistant >> nth=1 >> .meta:has-text('tokens')", timeout=60_000)
    assert pg.locator(".msg").count() == 4
    pg.click(".msg.user >> nth=0 >> button.edit")
    pg.fill(".edit-box textarea", "Hello again")
    pg.click(".edit-box button.primary")
    pg.wait_for_selector(".msg.assistant .meta:has-text('tokens')", timeout=60_000)
    assert pg.locator(".msg").count() == 2 and pg.locator(".msg.user .bubble").inner_text() == "Hello again"
    stored = pg.evaluate("JSON.parse(localStorage.getItem('lmforge.conversations.v1'))")
    assert len(stored) == 1 and [m["role"] for m in stored[0]["messages"]] == ["user", "assistant"]
    assert stored[0]["messages"][0]["content"] == "Hello again"
    pg.screenshot(path=str(shots() / "chat.png"))
    # documents mode: an answer from the collection, with its sources listed
    pg.click("#mode-docs")
    assert pg.locator("#collection-field").is_visible()
    pg.fill("#input", "How many strings has a violin?")
    pg.keyboard.press("Enter")
    pg.wait_for_selector(".sources .source", timeout=60_000)
    assert "music.txt" in pg.locator(".sources").first.inner_text()
    pg.wait_for_selector("#send:not([hidden])")
    pg.screenshot(path=str(shots() / "documents.png"))
    assert (shots() / "documents.png").stat().st_size > 10_000
    assert len(pg.evaluate("JSON.parse(localStorage.getItem('lmforge.conversations.v1'))")) == 2


def test_an_image_attached_in_the_browser_reaches_a_vision_model(tmp_path, page):
    import torch
    from PIL import Image, ImageDraw

    from lmforge.config import VisionConfig
    from lmforge.models.vision import build_tower
    from lmforge.server.service import Service

    lm, text = tiny_chat_lm(), tiny_chat_lm()
    torch.manual_seed(0)
    lm.vision = build_tower(VisionConfig(image_size=32, channels=(8, 16), lm_embd=lm.config.n_embd), embed_std=0.3)
    lm.vision_chat = True
    img = Image.new("RGB", (300, 200), (250, 245, 240))
    ImageDraw.Draw(img).ellipse((80, 40, 220, 160), fill=(220, 30, 30))
    img.save(tmp_path / "red.png")
    srv = LiveServer(Service({"text": text, "see": lm}))
    try:
        pg = page.context.browser.new_page(viewport={"width": 1000, "height": 700})  # the module's browser
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(srv.url + "/")
        pg.wait_for_selector("#status.ok")
        pg.select_option("#model", "text")
        assert pg.locator("#attach").is_hidden()  # a text-only model offers no upload
        pg.select_option("#model", "see")
        assert pg.locator("#attach").is_visible()
        pg.set_input_files("#image-file", str(tmp_path / "red.png"))
        pg.wait_for_selector("#attach-preview:not([hidden])")
        pg.click("#settings-btn")
        pg.fill("#max_tokens", "8")
        pg.fill("#temperature", "0")
        pg.click("#settings-btn")
        pg.fill("#input", "what color is it?")
        pg.keyboard.press("Enter")
        pg.wait_for_selector(".msg.assistant .meta:has-text('tokens')", timeout=60_000)
        assert pg.locator(".msg.user img.thumb").count() == 1 and pg.locator("#attach-preview").is_hidden()
        reply = pg.locator(".msg.assistant .bubble").last.inner_text()
        # the same conversation through the Python API, with the image the page sent (scaled to 256 wide)
        sent = pg.evaluate("JSON.parse(localStorage.getItem('lmforge.conversations.v1'))[0].messages[0].image")
        import base64

        png = base64.b64decode(sent.split(",", 1)[1])
        want = "".join(lm.chat([{"role": "user", "content": "<image>what color is it?"}], max_new_tokens=8,
                               temperature=0.0, images=[png]))
        assert Image.open(__import__("io").BytesIO(png)).size == (256, 171)
        assert reply.strip() == want.strip()
        pg.screenshot(path=str(shots() / "image.png"))
        pg.close()
        assert not errors, errors
    finally:
        srv.close()
