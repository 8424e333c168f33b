"""The LoRA Stack's rows in the real front ends: edit with the controls (real clicks), save, reload, queue; and what
a user sees when a LoRA or a model file is missing (a dialog in the vendored front end, a toast in the newest)."""

from __future__ import annotations

import json

import pytest

from devtools.graphs import STYLE_LORAS
from tests.workflows.workflow_files import ui_workflow

SUGAR, NIANNIAN, SUN = STYLE_LORAS["sugar"], STYLE_LORAS["niannian"], STYLE_LORAS["sun_zhenni"]
MISSING = "not_in_models_loras.safetensors"
MISSING_MODEL = "not_in_diffusion_models.safetensors"


def sugar_workflow() -> dict:
    return ui_workflow("zimage_sugar")


def with_loras(workflow: dict, rows: list[dict]) -> dict:
    stack = next(n for n in workflow["nodes"] if n["type"] == "ZImageTurboLoraStack")
    stack["widgets_values"] = [json.dumps(rows)]
    return workflow


LORAS_JS = """() => {
    const node = window.comfyAPI.app.app.graph.nodes.find((n) => n.type === "ZImageTurboLoraStack");
    return node.widgets.find((w) => w.name === "loras").value;
}"""


def rows_on_screen(page) -> list[tuple]:
    """(file, strength, on) as the visible controls show them, top to bottom."""
    out = []
    for row in page.locator(".zimage-lora-row:visible").all():
        out.append((row.locator("select.zimage-lora-name").input_value(),
                    float(row.locator("input.zimage-lora-strength").input_value()),
                    row.locator("input.zimage-lora-on").is_checked()))
    return out


def rows_in_widget(page) -> list[tuple]:
    return [(r["lora"], r["strength"], r["on"]) for r in json.loads(page.evaluate(LORAS_JS))]


def stack_prompt_loras(comfy_page) -> str:
    prompt = comfy_page.graph_to_prompt()
    return next(n for n in prompt.values() if n["class_type"] == "ZImageTurboLoraStack")["inputs"]["loras"]


def json_fields(comfy_page) -> list[str]:
    return [v for v in comfy_page.visible_text_fields() if '"lora"' in v]


def test_rows_edit_save_reload_and_prompt(comfy_page, frontend_server):
    page = comfy_page.page
    comfy_page.load_workflow(sugar_workflow())
    stack_id = comfy_page.node_id("ZImageTurboLoraStack")
    assert json_fields(comfy_page) == [], "the raw JSON widget should not be on screen"
    assert rows_on_screen(page) == [(SUGAR, 1.0, True)]
    height_one_row = comfy_page.node_rect(stack_id)["height"]

    # The chooser lists exactly ComfyUI's models/loras files.
    _, served = frontend_server.client.get("/models/loras")
    options = page.locator(".zimage-lora-row").first.locator("select.zimage-lora-name option").all_inner_texts()
    assert sorted(options) == sorted(served) and SUN in options

    # Add a row (a real click), choose its LoRA and a negative strength.
    page.locator("button.zimage-lora-add").click()
    assert len(page.locator(".zimage-lora-row:visible").all()) == 2
    second = page.locator(".zimage-lora-row").nth(1)
    second.locator("select.zimage-lora-name").select_option(SUN)
    second.locator("input.zimage-lora-strength").fill("-0.35")
    # A third one, strength above 1 by the arrow key (step 0.05), then switched off.
    page.locator("button.zimage-lora-add").click()
    third = page.locator(".zimage-lora-row").nth(2)
    third.locator("select.zimage-lora-name").select_option(NIANNIAN)
    third.locator("input.zimage-lora-strength").fill("1.2")
    third.locator("input.zimage-lora-strength").press("ArrowUp")
    third.locator("input.zimage-lora-on").click()
    assert rows_in_widget(page) == [(SUGAR, 1, True), (SUN, -0.35, True), (NIANNIAN, 1.25, False)]
    assert page.locator(".zimage-lora-row.zimage-lora-off:visible").count() == 1
    comfy_page.settle()
    height_three_rows = comfy_page.node_rect(stack_id)["height"]
    assert height_three_rows > height_one_row + 40  # the node grew with its rows, on screen

    # Reorder: Niannian to the top, Sun Zhenni down; then remove Sugar.
    page.locator(".zimage-lora-row").nth(2).locator("button.zimage-lora-up").click()
    page.locator(".zimage-lora-row").nth(1).locator("button.zimage-lora-up").click()
    assert [r[0] for r in rows_in_widget(page)] == [NIANNIAN, SUGAR, SUN]
    page.locator(".zimage-lora-row").nth(0).locator("button.zimage-lora-down").click()
    assert [r[0] for r in rows_in_widget(page)] == [SUGAR, NIANNIAN, SUN]
    page.locator(".zimage-lora-row").nth(0).locator("button.zimage-lora-remove").click()
    expected = [(NIANNIAN, 1.25, False), (SUN, -0.35, True)]
    assert rows_in_widget(page) == expected
    assert rows_on_screen(page) == expected
    first_up = page.locator(".zimage-lora-row").nth(0).locator("button.zimage-lora-up")
    assert first_up.is_disabled()
    comfy_page.settle()
    assert height_one_row < comfy_page.node_rect(stack_id)["height"] < height_three_rows  # and shrank back

    # Save (the workflow JSON the front end writes) and load it back: rows and value survive.
    value = page.evaluate(LORAS_JS)
    saved = comfy_page.serialize()
    stack = next(n for n in saved["nodes"] if n["type"] == "ZImageTurboLoraStack")
    assert stack["widgets_values"] == [value]  # only the JSON: the rows widget is not saved
    prompt_before = stack_prompt_loras(comfy_page)
    assert prompt_before == value

    comfy_page.load_workflow(sugar_workflow())  # something else first, so the reload really rebuilds
    assert rows_on_screen(page) == [(SUGAR, 1.0, True)]
    comfy_page.load_workflow(saved)
    assert rows_on_screen(page) == expected
    assert page.evaluate(LORAS_JS) == value
    # graphToPrompt sends what an API user sends: the same JSON text.
    assert stack_prompt_loras(comfy_page) == value
    assert json.loads(value) == [{"lora": NIANNIAN, "strength": 1.25, "on": False},
                                 {"lora": SUN, "strength": -0.35, "on": True}]
    assert json_fields(comfy_page) == []
    assert comfy_page.visible_dialogs() == [] and comfy_page.notices() == []
    assert comfy_page.extension_errors() == []


def test_queueing_a_missing_lora_shows_the_validation_error(comfy_page, ui, screenshots):
    page = comfy_page.page
    comfy_page.load_workflow(with_loras(sugar_workflow(), [{"lora": MISSING, "strength": 0.8, "on": True}]))
    # Before queueing, the row already says the file is not there.
    row = page.locator(".zimage-lora-row:visible").first
    assert row.get_attribute("class").split().count("zimage-lora-missing") == 1
    assert f"{MISSING} (missing)" in row.locator("select.zimage-lora-name").inner_text()
    status = page.locator(".zimage-lora-status")
    assert status.is_visible() and f"Not in models/loras: {MISSING}" in status.inner_text()

    comfy_page.click_run()
    shown = comfy_page.refusal()
    comfy_page.screenshot(screenshots / ui.id / "missing_lora_error.png")
    if ui.frontend == "vendored":
        assert shown["where"] == "dialog" and "ZImageTurboLoraStack" in shown["summary"]
    else:
        # A small toast that names the node and the input; the server's message behind "View details".
        assert shown["where"] == "toast"
        assert "Z-Image Turbo LoRA Stack" in shown["summary"] and "loras" in shown["summary"], shown
    assert MISSING in shown["details"] and "models/loras" in shown["details"], shown
    # ComfyUI also keeps the error on that node (it outlines it in red).
    stack_id = comfy_page.node_id("ZImageTurboLoraStack")
    node_errors = page.evaluate("(id) => window.comfyAPI.app.app.lastNodeErrors?.[id] ?? null", stack_id)
    assert node_errors and MISSING in json.dumps(node_errors["errors"])
    assert comfy_page.events() == []  # nothing ran


def test_queueing_a_missing_model_shows_the_validation_error(comfy_page, ui, screenshots):
    workflow = sugar_workflow()
    loader = next(n for n in workflow["nodes"] if n["type"] == "ZImageTurboLoader")
    loader["widgets_values"][0] = MISSING_MODEL
    comfy_page.load_workflow(workflow)
    if ui.frontend == "newest":
        # The newest front end notices the missing file as the workflow loads: a warning toast, no dialog.
        warning = comfy_page.page.locator('[data-testid="error-overlay"]:visible')
        warning.first.wait_for(timeout=15_000)
        assert MISSING_MODEL in warning.first.inner_text() and "missing" in warning.first.inner_text()
        comfy_page.dismiss_notices()
    assert comfy_page.visible_dialogs() == [] and comfy_page.notices() == []
    comfy_page.click_run()
    shown = comfy_page.refusal()
    comfy_page.screenshot(screenshots / ui.id / "missing_model_error.png")
    assert shown["where"] == ("dialog" if ui.frontend == "vendored" else "toast"), shown
    assert MISSING_MODEL in shown["details"] and "models/diffusion_models" in shown["details"], shown
    assert comfy_page.events() == []  # nothing ran


@pytest.mark.uis("vendored-classic")  # what the server does; the front ends differ in nothing here
def test_switched_off_missing_lora_is_not_an_error(comfy_page):
    comfy_page.load_workflow(with_loras(sugar_workflow(), [
        {"lora": SUGAR, "strength": 1.0, "on": True},
        {"lora": MISSING, "strength": 0.8, "on": False},
    ]))
    # A row that is off is never read: no warning, and the prompt queues and runs.
    assert comfy_page.page.locator(".zimage-lora-status").inner_text() == ""
    comfy_page.click_run()
    finished = comfy_page.wait_until_finished()
    assert finished["type"] == "execution_success", finished
    assert comfy_page.visible_dialogs() == [] and comfy_page.notices() == []


@pytest.mark.uis("vendored-classic", "newest-vue")
def test_a_failed_lora_list_is_reported_in_the_node(own_tab):
    tab = own_tab.page
    tab.route("**/models/loras*", lambda route: route.fulfill(status=500, body="boom"))
    own_tab.open()
    own_tab.load_workflow(sugar_workflow())
    status = tab.locator(".zimage-lora-status")
    status.wait_for()
    assert status.is_visible()
    assert "Could not load the LoRA list from models/loras" in status.inner_text()
    assert "500" in status.inner_text()
    # The row keeps the workflow's LoRA and the canvas still works: the prompt is intact.
    assert rows_on_screen(tab) == [(SUGAR, 1.0, True)]
    assert json.loads(stack_prompt_loras(own_tab)) == [{"lora": SUGAR, "strength": 1, "on": True}]
