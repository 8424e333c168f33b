"""The LoRA Stack's rows in the real front end: edit with the controls, save, reload, queue."""

from __future__ import annotations

import json
from pathlib import Path

from model_names import STYLE_LORAS

REPO = Path(__file__).resolve().parent.parent.parent
SUGAR, NIANNIAN, SUN = STYLE_LORAS["sugar"], STYLE_LORAS["niannian"], STYLE_LORAS["sun_zhenni"]
MISSING = "not_in_models_loras.safetensors"


def sugar_workflow() -> dict:
    return json.loads((REPO / "workflows" / "zimage_sugar.json").read_text(encoding="utf-8"))


def with_loras(workflow: dict, rows: list[dict]) -> dict:
    stack = next(n for n in workflow["nodes"] if n["type"] == "ZImageTurboLoraStack")
    stack["widgets_values"] = [json.dumps(rows)]
    return workflow


LORAS_JS = """() => {
    const node = window.comfyAPI.app.app.graph.nodes.find((n) => n.type === "ZImageTurboLoraStack");
    const loras = node.widgets.find((w) => w.name === "loras");
    return { value: loras.value, hidden: loras.hidden === true, height: node.size[1],
             textareaShown: loras.element.isConnected && loras.element.checkVisibility() };
}"""


def rows_in_dom(page) -> list[tuple]:
    """(file, strength, on) as the controls show them, top to bottom."""
    out = []
    for row in page.locator(".zimage-lora-row").all():
        out.append((row.locator("select.zimage-lora-name").input_value(),
                    float(row.locator("input.zimage-lora-strength").input_value()),
                    row.locator("input.zimage-lora-on").is_checked()))
    return out


def rows_in_widget(page) -> list[tuple]:
    return [(r["lora"], r["strength"], r["on"]) for r in json.loads(page.evaluate(LORAS_JS)["value"])]


def stack_prompt_loras(comfy_page) -> str:
    prompt = comfy_page.graph_to_prompt()
    return next(n for n in prompt.values() if n["class_type"] == "ZImageTurboLoraStack")["inputs"]["loras"]


def test_rows_edit_save_reload_and_prompt(comfy_page, frontend_server):
    page = comfy_page.page
    comfy_page.load_workflow(sugar_workflow())
    state = page.evaluate(LORAS_JS)
    assert state["hidden"] and not state["textareaShown"], "the raw JSON widget should be hidden"
    assert rows_in_dom(page) == [(SUGAR, 1.0, True)]
    height_one_row = state["height"]

    # The chooser lists exactly ComfyUI's models/loras files.
    _, served = frontend_server.client.get("/models/loras")
    options = page.locator(".zimage-lora-row").first.locator("select.zimage-lora-name option").all_inner_texts()
    assert sorted(options) == sorted(served) and SUN in options

    # Add a row, choose its LoRA and a negative strength.
    page.locator("button.zimage-lora-add").click()
    assert len(page.locator(".zimage-lora-row").all()) == 2
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
    assert page.locator(".zimage-lora-row.zimage-lora-off").count() == 1
    height_three_rows = page.evaluate(LORAS_JS)["height"]
    assert height_three_rows > height_one_row + 50  # the node grew with its rows

    # Reorder: Niannian to the top, Sun Zhenni down; then remove Sugar.
    page.locator(".zimage-lora-row").nth(2).locator("button.zimage-lora-up").click()
    page.locator(".zimage-lora-row").nth(1).locator("button.zimage-lora-up").click()
    assert [r[0] for r in rows_in_widget(page)] == [NIANNIAN, SUGAR, SUN]
    page.locator(".zimage-lora-row").nth(0).locator("button.zimage-lora-down").click()
    assert [r[0] for r in rows_in_widget(page)] == [SUGAR, NIANNIAN, SUN]
    page.locator(".zimage-lora-row").nth(0).locator("button.zimage-lora-remove").click()
    expected = [(NIANNIAN, 1.25, False), (SUN, -0.35, True)]
    assert rows_in_widget(page) == expected
    assert rows_in_dom(page) == expected
    first_up = page.locator(".zimage-lora-row").nth(0).locator("button.zimage-lora-up")
    assert first_up.is_disabled()
    assert height_one_row < page.evaluate(LORAS_JS)["height"] < height_three_rows  # and shrank back

    # Save (the workflow JSON the front end writes) and load it back: rows and value survive.
    value = page.evaluate(LORAS_JS)["value"]
    saved = comfy_page.serialize()
    stack = next(n for n in saved["nodes"] if n["type"] == "ZImageTurboLoraStack")
    assert stack["widgets_values"] == [value]  # only the JSON: the rows widget is not saved
    prompt_before = stack_prompt_loras(comfy_page)
    assert prompt_before == value

    comfy_page.load_workflow(sugar_workflow())  # something else first, so the reload really rebuilds
    assert rows_in_dom(page) == [(SUGAR, 1.0, True)]
    comfy_page.load_workflow(saved)
    assert rows_in_dom(page) == expected
    assert page.evaluate(LORAS_JS)["value"] == value
    # graphToPrompt sends what an API user sends: the same JSON text.
    assert stack_prompt_loras(comfy_page) == value
    assert json.loads(value) == [{"lora": NIANNIAN, "strength": 1.25, "on": False},
                                 {"lora": SUN, "strength": -0.35, "on": True}]
    assert comfy_page.visible_dialogs() == []
    assert comfy_page.extension_errors() == []


def test_queueing_a_missing_lora_shows_the_validation_error(comfy_page, screenshots):
    page = comfy_page.page
    comfy_page.load_workflow(with_loras(sugar_workflow(), [{"lora": MISSING, "strength": 0.8, "on": True}]))
    # Before queueing, the row already says the file is not there.
    row = page.locator(".zimage-lora-row").first
    assert row.get_attribute("class").split().count("zimage-lora-missing") == 1
    assert f"{MISSING} (missing)" in row.locator("select.zimage-lora-name").inner_text()
    assert f"Not in models/loras: {MISSING}" in page.locator(".zimage-lora-status").inner_text()

    comfy_page.click_run()
    dialog = page.locator(".p-dialog:visible")
    dialog.first.wait_for(timeout=30_000)
    text = dialog.first.inner_text()
    assert MISSING in text and "models/loras" in text, text
    assert "ZImageTurboLoraStack" in text
    # ComfyUI also keeps the error on that node (it outlines it in red).
    stack_id = comfy_page.node_id("ZImageTurboLoraStack")
    node_errors = page.evaluate("(id) => window.comfyAPI.app.app.lastNodeErrors?.[id] ?? null", stack_id)
    assert node_errors and MISSING in json.dumps(node_errors["errors"])
    comfy_page.screenshot(screenshots / "missing_lora_error.png")
    assert comfy_page.events() == []  # nothing ran


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
    assert comfy_page.visible_dialogs() == []


def test_a_failed_lora_list_is_reported_in_the_node(browser_context, frontend_server):
    from comfy_page import ComfyPage

    tab = browser_context.new_page()
    tab.route("**/models/loras*", lambda route: route.fulfill(status=500, body="boom"))
    comfy_page = ComfyPage(tab, frontend_server.client.base).open()
    comfy_page.load_workflow(sugar_workflow())
    status = tab.locator(".zimage-lora-status")
    status.wait_for()
    assert "Could not load the LoRA list from models/loras" in status.inner_text()
    assert "500" in status.inner_text()
    # The row keeps the workflow's LoRA and the canvas still works: the prompt is intact.
    assert rows_in_dom(tab) == [(SUGAR, 1.0, True)]
    assert json.loads(stack_prompt_loras(comfy_page)) == [{"lora": SUGAR, "strength": 1, "on": True}]
