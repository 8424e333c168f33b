"""The saved workflows as a user sees them, in each front end and node rendering: nothing covers anything, the
Note reads without scrolling, the LoRA Stack's raw JSON is not on screen and "+ Add LoRA" takes a real click.

"Nodes 2.0" (Vue) draws nodes taller than the classic canvas (the loader's seven widgets take about a quarter more
height): the layout leaves room for both. Each check reads the page: Vue nodes are elements, classic nodes are
rectangles on the canvas, and a click is a real mouse click (Playwright refuses to click what something covers).
"""

from __future__ import annotations

import json

import pytest

from tests.workflows.workflow_files import NAMES, ui_workflow

MARGIN = 12  # page pixels between any two nodes: room for the newer front end's node badges and for links

NOTE_FITS_JS = """(els) => els.map((e) => ({ value: e.value, fits: e.scrollHeight <= e.clientHeight + 1 }))"""


def fit_view(comfy_page) -> None:
    """The front end's own "fit view" (the "." key), so every rendering shows the whole graph alike."""
    comfy_page.page.evaluate("() => window.comfyAPI.app.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    comfy_page.settle(4)


def json_on_screen(comfy_page) -> list[str]:
    """Visible text boxes, and visible text, that show the LoRA rows' JSON."""
    fields = [v for v in comfy_page.visible_text_fields() if '"lora"' in v]
    texts = [t for t in comfy_page.page.get_by_text('"lora":').all() if t.is_visible()]
    return fields + [t.inner_text() for t in texts]


@pytest.mark.parametrize("name", NAMES)
def test_saved_workflow_reads_well(comfy_page, ui, screenshots, name):
    page = comfy_page
    workflow = ui_workflow(name)
    page.load_workflow(workflow)
    fit_view(page)
    page.screenshot(screenshots / ui.id / f"layout_{name}.png")
    rects = page.node_rects()
    assert len(rects) == len(workflow["nodes"]) and all(rects.values()), "a node is not on screen"
    viewport = page.page.viewport_size
    for rect in rects.values():
        assert rect["x"] >= 0 and rect["y"] >= 0, f"{rect['title']} starts off screen: {rect}"
        assert rect["x"] + rect["width"] <= viewport["width"] and rect["y"] + rect["height"] <= viewport["height"], \
            f"{rect['title']} ends off screen: {rect}"
    assert page.overlapping_nodes(MARGIN) == [], f"nodes overlap in {ui.id}"

    # The Note is read whole, without scrolling; so is the prompt.
    notes = page.page.locator("textarea:visible").evaluate_all(NOTE_FITS_JS)
    note_text = next(n for n in workflow["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert [n["fits"] for n in notes if n["value"] == note_text] == [True], "the Note's text does not fit its box"
    assert all(n["fits"] for n in notes), [n["value"][:40] for n in notes if not n["fits"]]

    # The LoRA rows are on screen; the JSON they edit is not.
    assert json_on_screen(page) == [], "the hidden loras JSON widget is on screen"
    rows = page.page.locator(".zimage-lora-row:visible")
    stack = next(n for n in workflow["nodes"] if n["type"] == "ZImageTurboLoraStack")
    assert rows.count() == len(json.loads(stack["widgets_values"][0]))

    # "+ Add LoRA" takes a real click: three more rows, and the stack still covers nothing (nothing is below it).
    add = page.page.locator("button.zimage-lora-add")
    assert page.is_hit_target(add)["hit"], page.is_hit_target(add)
    before = rows.count()
    for _ in range(3):
        add.click(timeout=5_000)
    assert rows.count() == before + 3
    page.settle(4)
    assert page.overlapping_nodes(MARGIN) == [], f"nodes overlap in {ui.id} after adding rows"
    assert page.is_hit_target(add)["hit"], "'+ Add LoRA' is covered after adding rows"
    assert json_on_screen(page) == []
    assert page.extension_errors() == []


@pytest.mark.uis("vendored-vue")
def test_the_vendored_front_ends_early_nodes_2_shows_rows_not_json(own_tab, screenshots):
    """The vendored front end's "Nodes 2.0" (a beta) reads only widget.options.hidden: the JSON stays hidden there
    too. A fresh tab: that beta keeps stale node sizes when one tab loads a second graph (its own bug)."""
    page = own_tab.open()
    page.load_workflow(ui_workflow("zimage_sugar"))
    fit_view(page)
    page.screenshot(screenshots / "vendored-vue" / "layout_zimage_sugar.png")
    assert page.page.locator("[data-node-id]:visible").count() == 6
    assert json_on_screen(page) == [], "the hidden loras JSON widget is on screen"
    assert page.overlapping_nodes(MARGIN) == []
    rows = page.page.locator(".zimage-lora-row:visible")
    assert rows.count() == 1
    page.page.locator("button.zimage-lora-add").click(timeout=5_000)
    assert rows.count() == 2 and json_on_screen(page) == []
