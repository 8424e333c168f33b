"""The saved workflows in the real ComfyUI front end: load, run with the Run button, read the probe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
WORKFLOWS = REPO / "workflows"
NAMES = ["zimage_sugar", "zimage_niannian", "zimage_sun_zhenni", "zimage_combined_styles"]


def load(name: str, api: bool = False) -> dict:
    return json.loads((WORKFLOWS / ("api" if api else "") / f"{name}.json").read_text(encoding="utf-8"))


def size_of(api_graph: dict) -> tuple[int, int]:
    sampler = next(n for n in api_graph.values() if n["class_type"] == "ZImageTurboSampler")["inputs"]
    return sampler["width"], sampler["height"]


def shown_time(seconds: float) -> str:
    """What the probe widget prints for a phase (zimage_dom.js formatMs)."""
    ms = seconds * 1000
    return f"{ms / 1000:.2f} s" if ms >= 10000 else f"{ms:.1f} ms"


PROBE_FIGURES_JS = """(id) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(id);
    const view = node.widgets.find((w) => w.name === "probe_figures").element;
    const times = {};
    for (const cell of view.querySelectorAll("[data-phase]")) times[cell.dataset.phase] = cell.textContent;
    return { data: { ...view.dataset }, times, text: view.innerText, shown: view.isConnected && view.checkVisibility() };
}"""

SAVED_IMAGES_JS = """(id) => (window.comfyAPI.app.app.graph.getNodeById(id).imgs || [])
    .map((img) => ({ src: img.src, width: img.naturalWidth, height: img.naturalHeight }))"""


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_runs_from_the_run_button_and_shows_the_probe(comfy_page, frontend_server, screenshots, name):
    page = comfy_page
    page.load_workflow(load(name))
    assert page.visible_dialogs() == [], "loading the workflow opened a dialog (missing nodes or an error)"
    assert page.error_toasts() == []
    probe_id, save_id = page.node_id("ZImageTurboProbe"), page.node_id("ZImageTurboSave")
    assert page.page.evaluate(PROBE_FIGURES_JS, probe_id)["data"]["state"] == "empty"

    page.click_run()
    finished = page.wait_until_finished()
    assert finished["type"] == "execution_success", finished
    assert page.visible_dialogs() == []

    # The image arrives on the Save Image node, at the workflow's size.
    width, height = size_of(load(name, api=True))
    page.page.wait_for_function(f"() => ({SAVED_IMAGES_JS})({save_id}).some((i) => i.width > 0)")
    images = page.page.evaluate(SAVED_IMAGES_JS, save_id)
    assert [(i["width"], i["height"]) for i in images] == [(width, height)]
    assert f"filename={name}_" in images[0]["src"]

    # The probe node shows the figures of this very run (as kept in the server's history).
    page.page.wait_for_function(f"() => ({PROBE_FIGURES_JS})({probe_id}).data.state === 'ready'")
    shown = page.page.evaluate(PROBE_FIGURES_JS, probe_id)
    history = frontend_server.client.history(finished["detail"]["prompt_id"])
    probe = history["outputs"][str(probe_id)]["zimage_probe"][0]
    assert shown["shown"], "the probe figures are not visible on the canvas"
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

    page.screenshot(screenshots / f"{name}.png")
    assert page.extension_errors() == []


def without_seeds(prompt: dict) -> dict:
    out = {}
    for node_id, node in prompt.items():
        inputs = {k: v for k, v in node["inputs"].items() if k != "seed"}
        out[node_id] = {"class_type": node["class_type"], "inputs": inputs}
    return out


def test_ui_workflows_give_their_api_twins_in_the_front_end(comfy_page):
    """graphToPrompt of each UI file is its API twin: same nodes, inputs and links (seeds aside)."""
    for name in NAMES:
        comfy_page.load_workflow(load(name))
        prompt = comfy_page.graph_to_prompt()
        twin = load(name, api=True)
        assert without_seeds(prompt) == without_seeds(twin), name
        assert {n["class_type"] for n in prompt.values()} >= {"ZImageTurboLoraStack", "ZImageTurboProbe"}
        # The LoRA JSON is passed on as the very same text an API user sends.
        stack = next(k for k, n in twin.items() if n["class_type"] == "ZImageTurboLoraStack")
        assert prompt[stack]["inputs"]["loras"] == twin[stack]["inputs"]["loras"]
    assert comfy_page.visible_dialogs() == []
