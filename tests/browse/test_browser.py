"""`curation browse` in a real browser: Playwright driving the OS's headless Chromium against the server a user
starts (`curation browse --port 0`) on an output built once for these tests."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.browse.conftest import HOSTILE_CAPTION
from tests.outputs import index_rows

# The package's output is built by the first test that asks for it (two caption sets by tiny LLaVA on Ray:
# about a minute on a quiet 2-core machine, many more beside other jobs).
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:  # a failure, not a skip: CI must run these (.ci/run installs it)
        pytest.fail("chromium is not installed: apt-get install -y --no-install-recommends chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    # Without the server's Content-Security-Policy: the markup test then shows that escaping alone keeps a caption's
    # markup inert (test_index checks the policy is sent).
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page = context.new_page()
    page.dialogs = []  # any alert() a page manages to run lands here
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    yield page
    context.close()


def _keys(page) -> list[str]:
    return page.locator("#grid .card").evaluate_all("cards => cards.map(c => c.dataset.key)")


def test_grid_shows_every_sample_and_filters_failed_ones(page, browse_server, browse_output, tmp_path):
    rows = index_rows(browse_output, "images")
    page.goto(browse_server + "/")
    assert int(page.locator("#count").get_attribute("data-total")) == len(rows)
    assert _keys(page) == sorted(rows)[:50]
    page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")  # thumbnails load
    page.screenshot(path=tmp_path / "grid.png", full_page=True)
    page.select_option("select[name=status]", "failed")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"status=failed"))
    failed = sorted(k for k, r in rows.items() if r["status"] == "failed")
    assert failed and _keys(page) == failed
    assert page.locator("#count").get_attribute("data-total") == str(len(failed))
    assert (tmp_path / "grid.png").stat().st_size > 10_000


def test_search_finds_a_caption_by_a_word(page, browse_server, browse_output):
    captions = index_rows(browse_output, "captions")
    key, row = next((k, r) for k, r in sorted(captions.items()) if r["caption"] and r["caption"].split())
    word = max(re.findall(r"\w+", row["caption"]), key=len)
    page.goto(browse_server + "/")
    page.fill("input[name=q]", word)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"q="))
    found = _keys(page)
    expected = sorted(k for k, r in captions.items() if r["caption"] and word.lower() in r["caption"].lower())
    assert key in found and found == expected
    # In the originals too: a COCO caption's word.
    images = index_rows(browse_output, "images")
    original = images[min(k for k in images if k.startswith("0"))]["original_caption"]
    word = max(re.findall(r"[A-Za-z]+", original), key=len)
    page.goto(f"{browse_server}/?set=original&q={word}")
    expected = sorted(k for k, r in images.items() if word.lower() in (r["original_caption"] or "").lower())
    assert _keys(page) == expected and expected


def test_sample_page_shows_every_caption_set_beside_the_original(page, browse_server, browse_output, tmp_path):
    images, default = index_rows(browse_output, "images"), index_rows(browse_output, "captions")
    alttext = index_rows(browse_output, "captions-alttext")
    key = min(k for k in images if k.startswith("0"))  # a COCO photo, kept member of the dedup group
    page.goto(f"{browse_server}/sample/{key}")
    assert page.locator("#captions th").all_inner_texts() == ["original", "default", "alttext"]
    cells = {c.get_attribute("data-set"): c for c in page.locator("#captions td.caption").all()}
    assert cells["original"].inner_text() == images[key]["original_caption"]
    assert cells["default"].inner_text() == default[key]["caption"]
    assert cells["alttext"].inner_text() == alttext[key]["caption"]
    assert cells["original"].locator("mark").count() > 0  # its nouns, highlighted
    page.wait_for_function("document.getElementById('image').naturalWidth > 0")
    assert "copy_of_first" in page.locator("#group").inner_text()  # the dedup group links the copy
    page.screenshot(path=tmp_path / "sample.png", full_page=True)
    assert (tmp_path / "sample.png").stat().st_size > 10_000
    page.click("#group a")
    page.wait_for_url(re.compile(r"/sample/copy_of_first$"))
    assert "removed" in page.locator("#stages").inner_text()


def test_markup_in_a_caption_renders_as_text(page, browse_server):
    for url in ["/?set=original&q=script", "/sample/hostile"]:
        page.goto(browse_server + url)
        assert page.locator("body").inner_text().count("<script>alert(1)</script>") == 1
        assert page.evaluate("document.querySelectorAll('script').length") == 0
        assert page.evaluate("document.querySelectorAll('img[src=x], [onerror]').length") == 0
    assert page.locator("td.caption[data-set=original]").inner_text() == HOSTILE_CAPTION
    assert page.dialogs == []


def test_a_key_not_in_the_index_is_404(page, browse_server):
    response = page.goto(browse_server + "/sample/no_such_key")
    assert response.status == 404 and "no sample no_such_key" in page.locator("#message").inner_text()
    assert page.goto(browse_server + "/thumb/no_such_key").status == 404
