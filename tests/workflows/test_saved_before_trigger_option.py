"""A workflow saved before the Sampler had `prepend_trigger_words` still loads and runs as it did: the option off.

tests/fixtures/workflows/saved_before_trigger_option.json is workflows/zimage_sugar.json as the front end saved it
before the option existed (commit 5341a3d): its Sampler has ten widget values, the option none. For these tests its
LoRA row names a LoRA whose metadata holds a trigger word the prompt does not contain (so the option would show),
and its loader the tiny diffusers folder (file layouts are not the subject here). The Sampler is left as saved.
It runs three ways a user runs a saved workflow: `comfy run` (comfy-cli's converter), the real front end's
graphToPrompt, and an API prompt without the input; each gives the image of the option off.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools import lora_formats
from devtools.model_builder import TINY

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "workflows" / "saved_before_trigger_option.json"
LORA = "trigger_option_test_lora.safetensors"
TRIGGER = "zit glow"
OLD_SAMPLER_VALUES = 10  # prompt, negative_prompt, width, height, steps, cfg, shift, seed, control_after_generate, batch


def saved() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def node(wf: dict, node_type: str) -> dict:
    (found,) = [n for n in wf["nodes"] if n["type"] == node_type]
    return found


@pytest.fixture(scope="module")
def workflow(comfy) -> dict:
    lora_formats.build_lora(Path(comfy.base_dir) / "models" / "loras" / LORA, TINY.transformer, "kohya_split", seed=77,
                            metadata={"modelspec.trigger_phrase": TRIGGER})
    wf = copy.deepcopy(saved())
    node(wf, "ZImageTurboLoader")["widgets_values"][0] = "[diffusers] zit_tiny"
    node(wf, "ZImageTurboLoraStack")["widgets_values"][0] = json.dumps([{"lora": LORA, "strength": 1.0, "on": True}])
    assert node(wf, "ZImageTurboSampler") == node(saved(), "ZImageTurboSampler")  # the subject is untouched
    return wf


def sampler_id(prompt: dict) -> str:
    return next(k for k, n in prompt.items() if n["class_type"] == "ZImageTurboSampler")


def run_image(comfy, prompt: dict) -> np.ndarray:
    res = comfy.client.run(prompt, timeout=600)
    assert res.status == "success", (res.error or {}).get("exception_message")
    save = next(k for k, n in prompt.items() if n["class_type"] == "ZImageTurboSave")
    info = res.outputs()[save]["images"][0]
    return np.asarray(Image.open(io.BytesIO(comfy.client.view(info["filename"], info["subfolder"], info["type"]))))


def test_the_fixture_was_saved_before_the_option_existed():
    sampler = node(saved(), "ZImageTurboSampler")
    assert len(sampler["widgets_values"]) == OLD_SAMPLER_VALUES
    assert "prepend_trigger_words" not in {i["name"] for i in sampler["inputs"]}


@pytest.fixture(scope="module")
def converted(comfy, workflow) -> dict:
    """What `comfy run --workflow` queues: comfy-cli's conversion with the live server's /object_info."""
    from comfy_cli.workflow_to_api import convert_ui_to_api

    return convert_ui_to_api(workflow, comfy.client.object_info())


@pytest.fixture(scope="module")
def images(comfy, converted) -> dict:
    """The saved graph's image with the option off, on, and with the trigger typed into the prompt by hand."""
    out = {}
    for name, prepend, prefix in (("off", False, ""), ("on", True, ""), ("typed", False, f"{TRIGGER}, ")):
        prompt = copy.deepcopy(converted)
        inputs = prompt[sampler_id(prompt)]["inputs"]
        inputs["prepend_trigger_words"], inputs["prompt"] = prepend, prefix + inputs["prompt"]
        out[name] = run_image(comfy, prompt)
    assert np.array_equal(out["on"], out["typed"]) and not np.array_equal(out["on"], out["off"])
    return out


@pytest.mark.e2e
def test_comfy_cli_fills_the_missing_widget_with_its_default_off(converted):
    inputs = converted[sampler_id(converted)]["inputs"]
    assert inputs["prepend_trigger_words"] is False
    assert (inputs["width"], inputs["height"], inputs["steps"], inputs["seed"], inputs["batch_size"]) == (512, 768, 8, 42, 1)


@pytest.mark.e2e
def test_an_api_prompt_without_the_input_runs_with_the_option_off(comfy, converted, images):
    old_api = copy.deepcopy(converted)
    del old_api[sampler_id(old_api)]["inputs"]["prepend_trigger_words"]  # as API prompts were written before it
    assert np.array_equal(run_image(comfy, old_api), images["off"])


@pytest.mark.e2e
def test_comfy_run_of_the_saved_file_gives_the_image_of_the_option_off(comfy, workflow, images, tmp_path):
    path = tmp_path / "saved_before_trigger_option.json"
    path.write_text(json.dumps(workflow, ensure_ascii=False), encoding="utf-8")
    out = subprocess.run([str(Path(sys.executable).with_name("comfy")), "--skip-prompt", "run", "--workflow", str(path),
                          "--wait", "--host", "127.0.0.1", "--port", str(comfy.port)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    envelope = json.loads(out.stdout.strip().splitlines()[-1])
    assert envelope["ok"] is True, envelope
    url = next(u for u in envelope["data"]["outputs"] if "filename=" in u)
    from urllib.parse import parse_qs, urlparse

    q = {k: v[0] for k, v in parse_qs(urlparse(url).query).items()}
    raw = comfy.client.view(q["filename"], q.get("subfolder", ""), q.get("type", "output"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(raw))), images["off"])


SAMPLER_WIDGETS = """() => { const n = window.comfyAPI.app.app.graph.nodes.find((x) => x.type === "ZImageTurboSampler");
    return n.widgets.map((w) => [w.name, w.value]); }"""


@pytest.mark.e2e
@pytest.mark.browser
def test_the_front_end_loads_it_with_the_option_off_and_queues_the_same_image(comfy, workflow, converted, images):
    from comfy_page import CHROMIUM, VIEWPORT, ComfyPage, prepare_server, shared_chromium

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    prepare_server(comfy.client)  # the front-end settings the browser tests use (no first-run dialogs)
    # The process's one Chromium: a second sync_playwright() fails while the browser tests' one runs.
    context = shared_chromium().new_context(viewport=VIEWPORT)
    try:
        page = ComfyPage(context.new_page(), comfy.client.base).open()
        page.load_workflow(workflow)
        widgets = dict(page.page.evaluate(SAMPLER_WIDGETS))
        prompt = page.graph_to_prompt()
    finally:
        context.close()
    # The saved values kept their places; the new widget, which the file has no value for, is off.
    assert widgets["prepend_trigger_words"] is False
    saved_values = node(saved(), "ZImageTurboSampler")["widgets_values"]
    assert [widgets[k] for k in ("prompt", "width", "height", "steps", "seed", "batch_size")] == \
        [saved_values[0], 512, 768, 8, 42, 1]
    assert prompt[sampler_id(prompt)]["inputs"] == converted[sampler_id(converted)]["inputs"]
    assert np.array_equal(run_image(comfy, prompt), images["off"])
