"""The probe node's figures for the devices this CPU-only machine cannot run: NVIDIA GPUs.

The node's onExecuted is given the message a GPU server would send, built from the engine's own
RunReport (so the keys are the backend's), and the view must show the right bar and times.
"""

from __future__ import annotations

import json

from tests.workflows.workflow_files import ui_workflow
from zimage_turbo.engine.probing.report import RunReport

GIB = 1024**3

VIEW_JS = """([id, message]) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(id);
    node.onExecuted(message);
    return new Promise((ok) => setTimeout(() => {
        const view = node.widgets.find((w) => w.name === "probe_figures").element;
        const fill = view.querySelector(".zimage-probe-bar-fill");
        ok({ data: { ...view.dataset }, text: view.innerText, visible: view.checkVisibility(),
             clipped: view.scrollHeight > view.clientHeight + 1 || view.scrollWidth > view.clientWidth + 1,
             fill: fill ? { width: fill.style.width, cls: fill.className } : null });
    }, 50));
}"""


def gpu_report(**memory) -> dict:
    report = RunReport(device="cuda:1", device_name="cuda:1 (NVIDIA H100 80GB HBM3)", dtype="bf16", width=1024,
                       height=1024, steps=8, load_s={"transformer": 2.5, "vae": 0.25}, lora_s=0.0123,
                       text_encode_s=0.031, denoise_s=0.8, step_s=[0.1] * 8, vae_decode_s=0.07, total_s=0.95,
                       lora=[{"file": "sugar_face_zimage_turbo.safetensors", "strength": 1.0}])
    for key, value in memory.items():
        setattr(report, key, value)
    return json.loads(json.dumps(report.to_dict(), default=str))


def show(comfy_page, probe: dict, text: str = "report") -> dict:
    comfy_page.load_workflow(ui_workflow("zimage_sugar"))
    probe_id = comfy_page.node_id("ZImageTurboProbe")
    shown = comfy_page.page.evaluate(VIEW_JS, [probe_id, {"text": [text], "zimage_probe": [probe]}])
    assert shown["visible"] and not shown["clipped"], "the figures are not shown whole on the node"
    return shown


def test_nvml_figures_fill_the_vram_bar_of_that_gpu(comfy_page):
    shown = show(comfy_page, gpu_report(
        nvml_during={"available": True, "name": "NVIDIA H100 80GB HBM3", "used_bytes": 60 * GIB,
                     "total_bytes": 80 * GIB, "utilization_pct": 97, "temperature_c": 61},
        nvml_after={"available": True, "name": "NVIDIA H100 80GB HBM3", "used_bytes": 58 * GIB,
                    "total_bytes": 80 * GIB, "utilization_pct": 3, "temperature_c": 60},
        torch_memory={"allocated_bytes": 20 * GIB, "reserved_bytes": 22 * GIB,
                      "peak_allocated_bytes": 30 * GIB, "peak_reserved_bytes": 32 * GIB}))
    assert shown["data"]["memorySource"] == "nvml"
    assert (int(shown["data"]["memoryUsedBytes"]), int(shown["data"]["memoryTotalBytes"])) == (60 * GIB, 80 * GIB)
    assert shown["fill"]["width"] == "75%"
    assert "VRAM NVIDIA H100 80GB HBM3" in shown["text"] and "60.00 GiB / 80.00 GiB (75%)" in shown["text"]
    assert "97% busy while denoising" in shown["text"]
    assert "cuda:1 (NVIDIA H100 80GB HBM3)" in shown["data"]["device"]
    # Times: load is the sum of the components read; per step is the mean.
    assert float(shown["data"]["loadMs"]) == 2750 and float(shown["data"]["stepMs"]) == 100
    assert "2750.0 ms" in shown["text"] and "950.0 ms" in shown["text"] and "12.3 ms" in shown["text"]


def test_full_vram_turns_the_bar_red(comfy_page):
    nvml = {"available": True, "name": "NVIDIA H200", "used_bytes": 139 * GIB, "total_bytes": 140 * GIB,
            "utilization_pct": 100, "temperature_c": 70}
    shown = show(comfy_page, gpu_report(nvml_during=nvml, nvml_after=nvml))
    assert "zimage-probe-full" in shown["fill"]["cls"]


def test_without_nvml_the_bar_shows_torch_reserved(comfy_page):
    shown = show(comfy_page, gpu_report(
        nvml_during={"available": False, "reason": "NVML unavailable (NVMLError_LibraryNotFound)"},
        nvml_after={"available": False, "reason": "NVML unavailable (NVMLError_LibraryNotFound)"},
        torch_memory={"allocated_bytes": 20 * GIB, "reserved_bytes": 22 * GIB,
                      "peak_allocated_bytes": 30 * GIB, "peak_reserved_bytes": 32 * GIB}))
    assert shown["data"]["memorySource"] == "torch"
    assert int(shown["data"]["memoryUsedBytes"]) == 22 * GIB and shown["data"]["memoryTotalBytes"] == ""
    assert "VRAM (torch reserved)" in shown["text"] and "22.00 GiB" in shown["text"]
    assert "NVML unavailable" in shown["text"]


def test_before_any_generation_the_probe_says_so(comfy_page):
    text = "No report: connect the sampler's report output to this probe."
    shown = show(comfy_page, {"device": "cpu", "nvml": {"available": False, "reason": "no NVIDIA GPU"}}, text)
    assert shown["data"]["state"] == "empty" and shown["text"] == text
