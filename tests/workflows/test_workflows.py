"""The saved workflows: workflows/<title>.json (UI format, a template in ComfyUI's template browser, with its
thumbnail <title>.jpg) and their API twins in workflows/api/<name>.json (workflow_files.py names them).

The files are checked for what they promise (LoRA, strength, size, schedule, Note), then run on
the real ComfyUI server: the API twins through the websocket client, and every file, UI and
API format, through `comfy run` as a user would.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

from devtools.graphs import MODEL, STYLE_LORAS, TEXT_ENCODER, VAE
from tests.workflows.workflow_files import (NAMES, PACK, TITLES, WORKFLOWS, api_path, api_workflow, thumbnail_path,
                                            ui_path, ui_workflow)

SUGAR, NIANNIAN, SUN = STYLE_LORAS["sugar"], STYLE_LORAS["niannian"], STYLE_LORAS["sun_zhenni"]

# What each workflow must hold, written out here rather than read from the exporter.
EXPECTED = {
    "zimage_sugar": {
        "loras": [(SUGAR, 1.0, True)], "size": (512, 768),
        "note": [SUGAR, "models/loras", "Sugar面部", "512 x 768", "strength 1.0", "upscale",
                 "masterpiece, best quality, 8k, ultra detailed"],
        "prompt_starts": "Sugar面部,",
    },
    "zimage_niannian": {
        "loras": [(NIANNIAN, 0.85, True)], "size": (1024, 1024),
        "note": [NIANNIAN, "models/loras", "Trigger phrase", "strength 0.85", "over-exposes", "186 MB", "1024 x 1024"],
        "prompt_starts": "portrait of a young woman",
    },
    "zimage_sun_zhenni": {
        "loras": [(SUN, 1.0, True)], "size": (1024, 1024),
        "note": [SUN, "models/loras", "sun zhen ni", "孙珍妮,旗袍,上海外滩,黄昏,胶片颗粒,王家卫风格", "strength 1.0",
                 "1024 x 1024"],
        "prompt_starts": "portrait of sun zhen ni",
    },
    "zimage_combined_styles": {
        "loras": [(SUN, 0.7, True), (NIANNIAN, 0.5, True)], "size": (1024, 1024),
        "note": [SUN, NIANNIAN, "models/loras", "sun zhen ni", "strength 0.7", "strength 0.5", "1024 x 1024"],
        "prompt_starts": "portrait of sun zhen ni",
    },
}
assert list(EXPECTED) == NAMES
NODE_TYPES = {"ZImageTurboLoader", "ZImageTurboLoraStack", "ZImageTurboSampler", "ZImageTurboProbe", "ZImageTurboSave",
              "Note"}


def probe_id(graph: dict) -> str:
    return next(k for k, n in graph.items() if n["class_type"] == "ZImageTurboProbe")


def api_node(graph: dict, class_type: str) -> dict:
    found = [n for n in graph.values() if n["class_type"] == class_type]
    assert len(found) == 1, f"expected one {class_type}, found {len(found)}"
    return found[0]["inputs"]


def ui_node(workflow: dict, node_type: str) -> dict:
    found = [n for n in workflow["nodes"] if n["type"] == node_type]
    assert len(found) == 1, f"expected one {node_type}, found {len(found)}"
    return found[0]


def rows(loras_json: str) -> list[tuple]:
    return [(r["lora"], r["strength"], r["on"]) for r in json.loads(loras_json)]


# ---------------------------------------------------------------- the files themselves

def test_the_folder_holds_the_four_workflows_their_thumbnails_and_api_twins():
    assert sorted(p.name for p in WORKFLOWS.glob("*.json")) == sorted(ui_path(n).name for n in NAMES)
    assert sorted(p.name for p in WORKFLOWS.glob("*.jpg")) == sorted(thumbnail_path(n).name for n in NAMES)
    assert sorted(p.name for p in (WORKFLOWS / "api").glob("*.json")) == sorted(api_path(n).name for n in NAMES)
    assert sorted(p.name for p in WORKFLOWS.iterdir()) == sorted(
        [ui_path(n).name for n in NAMES] + [thumbnail_path(n).name for n in NAMES] + ["api"])


@pytest.mark.parametrize("name", NAMES)
def test_title_is_a_portable_file_name_that_says_what_the_workflow_does(name):
    title = TITLES[name]
    # The template browser shows the file name as the card's title (and, "-"/"_" read as spaces, its description).
    assert title.startswith("Z-Image Turbo - ") and "LoRA" in title
    assert all(c.isalnum() or c in " -" for c in title) and title == title.strip() and "  " not in title
    note = ui_node(ui_workflow(name), "Note")
    assert note["title"].startswith("Read me: ")


@pytest.mark.parametrize("name", NAMES)
def test_thumbnail_is_a_picture_of_the_graph(name):
    picture = Image.open(thumbnail_path(name))
    assert picture.format == "JPEG" and picture.mode == "RGB"
    assert picture.width == 768 and 250 <= picture.height <= 768, picture.size
    pixels = picture.convert("L").getextrema()
    assert pixels[1] - pixels[0] > 100, "a blank picture"  # the canvas background and bright node text
    assert thumbnail_path(name).stat().st_size < 200_000


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_has_the_style_settings(name):
    graph, want = api_workflow(name), EXPECTED[name]
    assert {n["class_type"] for n in graph.values()} == NODE_TYPES - {"Note"}  # the Note is UI only
    loader = api_node(graph, "ZImageTurboLoader")
    assert (loader["model"], loader["text_encoder"], loader["vae"]) == (MODEL, TEXT_ENCODER, VAE)
    assert (loader["dtype"], loader["device"], loader["memory"]) == ("auto", "auto", "resident")
    assert rows(api_node(graph, "ZImageTurboLoraStack")["loras"]) == want["loras"]
    sampler = api_node(graph, "ZImageTurboSampler")
    assert (sampler["width"], sampler["height"]) == want["size"]
    assert (sampler["steps"], sampler["cfg"], sampler["shift"], sampler["seed"], sampler["batch_size"]) == (8, 0, 3, 42, 1)
    assert sampler["prompt"].startswith(want["prompt_starts"])
    stack_id = next(k for k, n in graph.items() if n["class_type"] == "ZImageTurboLoraStack")
    loader_id = next(k for k, n in graph.items() if n["class_type"] == "ZImageTurboLoader")
    assert sampler["lora_stack"] == [stack_id, 0] and sampler["pipe"] == [loader_id, 0]
    sampler_id = next(k for k, n in graph.items() if n["class_type"] == "ZImageTurboSampler")
    # The probe shows the report of the generation that made its images, carried along the link.
    assert api_node(graph, "ZImageTurboProbe") == {"images": [sampler_id, 0], "report": [sampler_id, 2]}
    save = api_node(graph, "ZImageTurboSave")
    assert (save["filename_prefix"], save["format"], save["images"]) == (name, "png", [probe_id(graph), 0])


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_a_frontend_graph_with_a_fixed_seed(name):
    wf = ui_workflow(name)
    assert wf["version"] == 0.4 and isinstance(wf["links"], list) and isinstance(wf["groups"], list)
    assert {n["type"] for n in wf["nodes"]} == NODE_TYPES
    sampler = ui_node(wf, "ZImageTurboSampler")["widgets_values"]
    # prompt, negative_prompt, width, height, steps, cfg, shift, seed, control_after_generate, batch_size (, newer inputs)
    assert sampler[2:10] == [*EXPECTED[name]["size"], 8, 0, 3, 42, "fixed", 1]
    stack = ui_node(wf, "ZImageTurboLoraStack")["widgets_values"]
    assert len(stack) == 1 and stack[0] == api_node(api_workflow(name), "ZImageTurboLoraStack")["loras"]
    # Every link in the list is attached to the nodes it names.
    ids = {n["id"] for n in wf["nodes"]}
    for link_id, origin, _, target, _, _ in wf["links"]:
        assert origin in ids and target in ids
        assert any(i.get("link") == link_id for i in ui_node_by_id(wf, target)["inputs"])


def ui_node_by_id(wf: dict, node_id: int) -> dict:
    return next(n for n in wf["nodes"] if n["id"] == node_id)


@pytest.mark.parametrize("name", NAMES)
def test_note_says_which_lora_where_trigger_and_settings(name):
    text = ui_node(ui_workflow(name), "Note")["widgets_values"][0]
    for term in EXPECTED[name]["note"]:
        assert term in text, f"the Note of {name} does not mention {term!r}"
    assert "8 steps, cfg 0, shift 3" in text


def test_workflow_loras_are_the_style_loras():
    used = {row[0] for name in NAMES for row in rows(api_node(api_workflow(name), "ZImageTurboLoraStack")["loras"])}
    assert used == set(STYLE_LORAS.values())


# ---------------------------------------------------------------- on the server

@pytest.mark.e2e
def test_template_browser_lists_the_ui_workflows_only(comfy):
    status, body = comfy.client.get("/workflow_templates")
    assert status == 200
    assert sorted(body[PACK]) == sorted(TITLES.values())  # not the API twins in workflows/api/
    for name in NAMES:
        # The front ends fetch <name>.json and, for the card, <name>.jpg (URL-encoded, as a browser sends it).
        base = f"/api/workflow_templates/{PACK}/{urllib.parse.quote(TITLES[name])}"
        status, served = comfy.client.get(base + ".json")
        assert status == 200 and served == ui_workflow(name)
        status, picture = comfy.client.get(base + ".jpg")
        assert status == 200 and picture == thumbnail_path(name).read_bytes()


def image_size(comfy, info: dict) -> tuple[int, int]:
    raw = comfy.client.view(info["filename"], info["subfolder"], info["type"])
    return Image.open(io.BytesIO(raw)).size


@pytest.mark.e2e
@pytest.mark.parametrize("name", NAMES)
def test_api_twin_generates_the_image_the_workflow_describes(comfy, name):
    graph, want = api_workflow(name), EXPECTED[name]
    res = comfy.client.run(graph, timeout=600)
    assert res.status == "success", (res.error or {}).get("exception_message")
    save_id = next(k for k, n in graph.items() if n["class_type"] == "ZImageTurboSave")
    probe_id = next(k for k, n in graph.items() if n["class_type"] == "ZImageTurboProbe")
    images = res.outputs()[save_id]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith(name)
    assert image_size(comfy, images[0]) == want["size"]
    probe = res.outputs()[probe_id]["zimage_probe"][0]
    assert (probe["width"], probe["height"], probe["steps"]) == (*want["size"], 8)
    assert len(probe["step_s"]) == 8 and probe["total_s"] > 0
    assert [(x["file"], x["strength"]) for x in probe["lora"]] == [(f, s) for f, s, on in want["loras"] if on]
    assert "denoise" in res.outputs()[probe_id]["text"][0]


COMFY_CLI = Path(sys.executable).with_name("comfy")
# UI file then its API twin: when they give the same prompt the second run is served from
# ComfyUI's cache, which keeps this part of the suite short.
ALL_FILES = [path for n in NAMES for path in (ui_path(n).name, f"api/{api_path(n).name}")]


@pytest.mark.e2e
@pytest.mark.parametrize("relpath", ALL_FILES)
def test_comfy_cli_runs_every_workflow_file(comfy, relpath):
    out = subprocess.run(
        [str(COMFY_CLI), "--skip-prompt", "run", "--workflow", str(WORKFLOWS / relpath), "--wait",
         "--host", "127.0.0.1", "--port", str(comfy.port)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    envelope = json.loads(out.stdout.strip().splitlines()[-1])
    assert envelope["ok"] is True, envelope
    assert envelope["data"]["status"] == "completed"
    name = next(n for n in NAMES if relpath in (ui_path(n).name, f"api/{api_path(n).name}"))
    assert any(f"filename={name}_" in url for url in envelope["data"]["outputs"]), envelope["data"]["outputs"]
