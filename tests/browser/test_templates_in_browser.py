"""The pack's workflows in ComfyUI's template browser, opened and used with real clicks: a category named
"Z-Image Turbo" (locales/en/main.json), a card per workflow with its title and its thumbnail, and a click on a card
loads that workflow.

How the two front ends find them (read in their source): ComfyUI 0.3.75 lists `custom_nodes/<pack>/{example_workflows,
workflows,...}/*.json` at /workflow_templates and serves the folder at /api/workflow_templates/<pack>/; both front
ends make a card per file with the file name as title (and as description, "-"/"_" shown as spaces) and fetch
`<file name>.jpg` for its picture. Neither reads an index.json of a custom node pack.
"""

from __future__ import annotations

import re
import urllib.parse

import pytest

from tests.workflows.workflow_files import NAMES, PACK, TITLES, thumbnail_path, ui_workflow

THUMBNAIL_WIDTH = 768


@pytest.mark.uis("vendored-classic", "newest-classic")
def test_template_browser_shows_titled_cards_with_thumbnails_and_opens_them(comfy_page, ui, screenshots):
    page = comfy_page.page
    comfy_page.dirty = True  # a dialog and another workflow tab: the next test gets a fresh page
    served = {}
    page.on("response", lambda r: served.__setitem__(urllib.parse.unquote(r.url), r.status)
            if "/workflow_templates/" in r.url else None)

    page.get_by_role("button", name="Templates", exact=True).first.click()
    # The category has the pack's display name (the front ends translate it from our locales file).
    category = page.get_by_text(re.compile(r"^\s*Z-Image Turbo\s*$")).first
    category.click()
    for name in NAMES:
        card_picture = page.get_by_role("img", name=TITLES[name], exact=True)
        card_picture.wait_for()
        assert card_picture.is_visible()
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=card_picture.element_handle())
        assert card_picture.evaluate("(img) => img.naturalWidth") == THUMBNAIL_WIDTH
        assert page.get_by_text(TITLES[name], exact=True).first.is_visible()  # the card's title
        assert served.get(f"{comfy_page.base_url}/api/workflow_templates/{PACK}/{thumbnail_path(name).name}") == 200
    raw = [t for t in page.get_by_text(PACK, exact=True).all() if t.is_visible()]
    assert raw == [], "the raw folder name is shown"
    comfy_page.screenshot(screenshots / ui.id / "template_browser.png")

    # A click on a card opens that workflow.
    page.get_by_role("img", name=TITLES["zimage_sugar"], exact=True).click()
    page.wait_for_function("() => window.comfyAPI.app.app.graph.nodes.some((n) => n.type === 'ZImageTurboLoraStack')")
    comfy_page.settle()
    wanted = ui_workflow("zimage_sugar")
    graph = comfy_page.serialize()
    assert sorted(n["type"] for n in graph["nodes"]) == sorted(n["type"] for n in wanted["nodes"])
    sampler = next(n for n in graph["nodes"] if n["type"] == "ZImageTurboSampler")
    assert sampler["widgets_values"][0] == next(
        n for n in wanted["nodes"] if n["type"] == "ZImageTurboSampler")["widgets_values"][0]
    assert comfy_page.visible_dialogs() == [] and comfy_page.notices() == []
    assert page.locator(".zimage-lora-row:visible").count() == 1
    assert comfy_page.extension_errors() == []
