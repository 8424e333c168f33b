"""The Save Image node in a real ComfyUI server: the file is there when /history says success, /view serves it,
its metadata holds the prompt and the workflow, its pixels are SaveImage's, and a bad prefix is an error."""

from __future__ import annotations

import io
import json
import time
import uuid

import numpy as np
import pytest
from graphs import api_prompt
from PIL import Image

from zimage_turbo.engine.files.image_files import read_metadata

WORKFLOW = {"nodes": [{"id": 5, "type": "ZImageTurboSave", "widgets_values": ["e2e_save", "png", 90]}],
            "links": [], "version": 0.4, "extra": {"note": "一只猫 in the workflow"}}


def save_graph(seed, fmt="png", prefix="e2e_save", quality=90, **kwargs):
    graph = api_prompt(seed=seed, **kwargs)
    graph["5"] = {"class_type": "ZImageTurboSave",
                  "inputs": {"images": ["4", 0], "filename_prefix": prefix, "format": fmt, "quality": quality}}
    return graph


def queue(comfy, graph, workflow=None):
    body = {"prompt": graph, "client_id": uuid.uuid4().hex}
    if workflow is not None:
        body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}  # what the front end sends
    return comfy.client.post("/prompt", body)


def finished(comfy, prompt_id, timeout=300) -> dict:
    """The history entry, taken the moment it says the prompt finished (as an API client polls)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = comfy.client.history(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
            return entry
        time.sleep(0.02)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")


def run(comfy, graph, workflow=None) -> tuple[dict, list[dict]]:
    status, body = queue(comfy, graph, workflow)
    assert status == 200, body
    entry = finished(comfy, body["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry, entry["outputs"]["5"]["images"]


def test_the_node_is_listed_with_its_formats(comfy):
    node = comfy.client.object_info()["ZImageTurboSave"]
    assert node["display_name"] == "Z-Image Turbo Save Image" and node["category"] == "Z-Image Turbo"
    assert node["output_node"] is True and node["output"] == []
    assert node["input"]["required"]["format"][0] == ["png", "png_fast", "webp", "jpeg"]
    assert node["input"]["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


def test_success_in_history_means_the_file_is_there_served_by_view_with_prompt_and_workflow(comfy):
    graph = save_graph(seed=201, width=80, height=48)
    entry, images = run(comfy, graph, WORKFLOW)
    (info,) = images
    assert info["type"] == "output" and info["subfolder"] == ""
    assert info["filename"].startswith("e2e_save_") and info["filename"].endswith("_.png")
    path = comfy.base_dir / "output" / info["filename"]
    on_disk = path.read_bytes()  # read right away: complete when /history said success
    served = comfy.client.view(info["filename"], info["subfolder"], info["type"])
    assert served == on_disk
    with Image.open(io.BytesIO(served)) as im:
        assert im.size == (80, 48) and im.format == "PNG"
    meta = read_metadata(served)
    assert json.loads(meta["prompt"]) == graph
    assert json.loads(meta["workflow"]) == WORKFLOW
    saved = entry["outputs"]["5"]["zimage_save"][0]
    assert saved["file"] == info["filename"] and saved["bytes"] == len(on_disk)


def test_every_format_gives_saveimages_pixels_and_readable_metadata(comfy):
    graph = save_graph(seed=202, width=64, height=48)
    graph["6"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "e2e_native"}}
    entry, _ = run(comfy, graph, WORKFLOW)
    native = entry["outputs"]["6"]["images"][0]
    reference = np.asarray(Image.open(io.BytesIO(comfy.client.view(native["filename"], "", "output"))))
    for fmt, extension in (("png", ".png"), ("png_fast", ".png"), ("webp", ".webp"), ("jpeg", ".jpg")):
        fmt_graph = save_graph(seed=202, width=64, height=48, fmt=fmt, prefix=f"e2e_{fmt}", quality=95)
        _, (info,) = run(comfy, fmt_graph, WORKFLOW)  # the sampler is cached: only the save node runs again
        assert info["filename"].endswith("_" + extension)
        data = comfy.client.view(info["filename"], info["subfolder"], info["type"])
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        if fmt.startswith("png"):
            assert np.array_equal(pixels, reference), fmt
        else:
            assert pixels.shape == reference.shape and np.abs(pixels.astype(int) - reference).mean() < 20, fmt
        meta = read_metadata(data)
        assert json.loads(meta["prompt"]) == fmt_graph and json.loads(meta["workflow"]) == WORKFLOW, fmt


def test_a_batch_saves_one_file_per_image_in_a_subfolder(comfy):
    graph = save_graph(seed=203, prefix="e2e_batch/portrait")
    graph["3"]["inputs"]["batch_size"] = 3
    _, images = run(comfy, graph)
    assert [i["subfolder"] for i in images] == ["e2e_batch"] * 3
    numbers = [int(i["filename"].split("_")[1]) for i in images]
    assert numbers == [numbers[0], numbers[0] + 1, numbers[0] + 2]
    for info in images:
        assert (comfy.base_dir / "output" / "e2e_batch" / info["filename"]).is_file()


@pytest.mark.parametrize("prefix,message", [
    ("../escaped", "leads out of ComfyUI's output folder"),
    ("portraits/../../escaped", "leads out of ComfyUI's output folder"),
    ("/tmp/escaped", "is an absolute path"),
])
def test_a_prefix_outside_the_output_folder_is_an_error_and_the_server_goes_on(comfy, prefix, message):
    status, body = queue(comfy, save_graph(seed=204, prefix=prefix))
    assert status == 200, body
    entry = finished(comfy, body["prompt_id"])
    assert entry["status"]["status_str"] == "error"  # never a success without the file
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "ZImageTurboSave" and message in error["exception_message"]
    assert str(comfy.base_dir) not in json.dumps(error["exception_message"])
    assert "5" not in entry["outputs"]
    assert not list(comfy.base_dir.rglob("escaped*"))
    run(comfy, save_graph(seed=205))
