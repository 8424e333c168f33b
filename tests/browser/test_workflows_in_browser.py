"""The saved workflows in the real ComfyUI front ends: load, run with the Run button, read the probe off the screen."""

from __future__ import annotations

import pytest

from tests.workflows.workflow_files import NAMES, api_workflow, ui_workflow


def size_of(api_graph: dict) -> tuple[int, int]:
    sampler = next(n for n in api_graph.values() if n["class_type"] == "ZImageTurboSampler")["inputs"]
    return sampler["width"], sampler["height"]


def shown_time(seconds: float) -> str:
    """What the probe widget prints for a phase (zimage_dom.js formatMs)."""
    ms = seconds * 1000
    return f"{ms / 1000:.2f} s" if ms >= 10000 else f"{ms:.1f} ms"


PROBE_VIEW = ".zimage-probe"
PROBE_FIGURES_JS = """(view) => {
    const times = {};
    for (const cell of view.querySelectorAll("[data-phase]")) times[cell.dataset.phase] = cell.textContent;
    return { data: { ...view.dataset }, times, text: view.innerText,
             clipped: view.scrollHeight > view.clientHeight + 1 || view.scrollWidth > view.clientWidth + 1 };
}"""


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_runs_from_the_run_button_and_shows_the_probe(comfy_page, frontend_server, screenshots, ui,
                                                                      name):
    page = comfy_page
    page.load_workflow(ui_workflow(name))
    assert page.visible_dialogs() == [], "loading the workflow opened a dialog (missing nodes or an error)"
    assert page.notices() == [], "loading the workflow showed a warning (missing models?)"
    probe_id, save_id = page.node_id("ZImageTurboProbe"), page.node_id("ZImageTurboSave")
    view = page.page.locator(PROBE_VIEW)
    assert view.count() == 1 and view.is_visible(), "the probe's view is not on screen"
    assert view.get_attribute("data-state") == "empty"

    page.click_run()
    finished = page.wait_until_finished()
    assert finished["type"] == "execution_success", finished
    assert page.visible_dialogs() == [] and page.notices() == []

    # The image arrives on the Save Image node, at the workflow's size: drawn on the canvas, or an <img> of the
    # Vue node.
    width, height = size_of(api_workflow(name))
    for _ in range(100):  # the executed message reaches the node, the image loads
        images = page.saved_images(save_id)
        if images and all(i["width"] for i in images):
            break
        page.page.wait_for_timeout(100)
    assert [(i["width"], i["height"]) for i in images] == [(width, height)]
    assert f"filename={name}_" in images[0]["src"]

    # The probe node shows the figures of this very run (as kept in the server's history), in full.
    view.and_(page.page.locator('[data-state="ready"]')).wait_for()
    shown = view.evaluate(PROBE_FIGURES_JS)
    history = frontend_server.client.history(finished["detail"]["prompt_id"])
    probe = history["outputs"][str(probe_id)]["zimage_probe"][0]
    assert view.is_visible(), "the probe figures are not visible"
    assert not shown["clipped"], "the probe figures do not fit their box"
    rect = page.node_rect(probe_id)
    box = view.bounding_box()
    assert rect["x"] <= box["x"] and box["x"] + box["width"] <= rect["x"] + rect["width"] + 1, "figures outside the node"
    assert rect["y"] <= box["y"] and box["y"] + box["height"] <= rect["y"] + rect["height"] + 1, "figures outside the node"
    assert shown["data"]["size"] == f"{width}x{height}" and shown["data"]["steps"] == "8"
    phases = {  # widget name -> seconds in the history
        "load": sum(probe["load_s"].values()), "lora": probe["lora_s"], "text_encode": probe["text_encode_s"],
        "denoise": probe["denoise_s"], "step": probe["mean_step_s"], "vae_decode": probe["vae_decode_s"],
        "total": probe["total_s"],
    }
    assert set(shown["times"]) == set(phases)
    for phase, seconds in phases.items():
        assert shown["times"][phase] == shown_time(seconds), phase
        attr = "".join(p.capitalize() if i else p for i, p in enumerate(phase.split("_"))) + "Ms"  # text_encode -> textEncodeMs
        assert float(shown["data"][attr]) == pytest.approx(seconds * 1000, abs=0.01), phase
    # On this CPU-only server: no NVML; the bar shows ComfyUI's RSS and says there is no NVIDIA GPU.
    assert shown["data"]["memorySource"] == "process_rss"
    assert int(shown["data"]["memoryUsedBytes"]) == probe["process_rss_bytes"] > 0
    assert "no NVIDIA GPU" in shown["text"]

    page.screenshot(screenshots / ui.id / f"{name}.png")
    assert page.extension_errors() == []


def without_seeds(prompt: dict) -> dict:
    out = {}
    for node_id, node in prompt.items():
        inputs = {k: v for k, v in node["inputs"].items() if k != "seed"}
        out[node_id] = {"class_type": node["class_type"], "inputs": inputs}
    return out


@pytest.mark.uis("vendored-classic", "newest-classic")
def test_ui_workflows_give_their_api_twins_in_the_front_end(comfy_page):
    """graphToPrompt of each UI file is its API twin: same nodes, inputs and links (seeds aside)."""
    for name in NAMES:
        comfy_page.load_workflow(ui_workflow(name))
        prompt = comfy_page.graph_to_prompt()
        twin = api_workflow(name)
        assert without_seeds(prompt) == without_seeds(twin), name
        assert {n["class_type"] for n in prompt.values()} >= {"ZImageTurboLoraStack", "ZImageTurboProbe"}
        # The LoRA JSON is passed on as the very same text an API user sends.
        stack = next(k for k, n in twin.items() if n["class_type"] == "ZImageTurboLoraStack")
        assert prompt[stack]["inputs"]["loras"] == twin[stack]["inputs"]["loras"]
    assert comfy_page.visible_dialogs() == []
