"""The Save Image node called directly: ComfyUI's output folder and naming helper stood in for (see conftest.py)."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_turbo.engine.files.image_files import read_metadata

PROMPT = {"5": {"class_type": "ZImageTurboSave", "inputs": {"filename_prefix": "ZImage"}}}
WORKFLOW = {"nodes": [{"id": 5, "type": "ZImageTurboSave"}], "version": 0.4}


@pytest.fixture()
def saver(pack, tmp_path, monkeypatch):
    """The node with folder_paths' output folder and get_save_image_path stood in for, calls recorded."""
    output = tmp_path / "output"
    output.mkdir()
    calls = []

    def get_save_image_path(prefix, output_dir, width=0, height=0):
        # What ComfyUI's helper returns: folder, file name, next counter, subfolder, prefix.
        calls.append((prefix, output_dir, width, height))
        subfolder, name = os.path.split(os.path.normpath(prefix))
        folder = os.path.join(output_dir, subfolder)
        os.makedirs(folder, exist_ok=True)
        taken = [int(n[len(name) + 1:].split("_")[0]) for n in os.listdir(folder) if n.startswith(name + "_")]
        return folder, name, max(taken, default=0) + 1, subfolder, prefix

    fp = pack.folder_paths
    monkeypatch.setattr(fp, "get_output_directory", lambda: str(output), raising=False)
    monkeypatch.setattr(fp, "get_save_image_path", get_save_image_path, raising=False)
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=False)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    node = pack.NODE_CLASS_MAPPINGS["ZImageTurboSave"]
    return types.SimpleNamespace(node=node, output=output, calls=calls, args=cli_args.args)


def images(batch=1, height=40, width=56, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((batch, height, width, 3), dtype=np.float32))


def test_saves_like_saveimage_and_returns_its_ui_images(saver):
    batch = images(batch=2)
    out = saver.node().save(batch, "portraits/ZImage", "png", 90, prompt=PROMPT, extra_pnginfo={"workflow": WORKFLOW})
    assert out["ui"]["images"] == [
        {"filename": "ZImage_00001_.png", "subfolder": "portraits", "type": "output"},
        {"filename": "ZImage_00002_.png", "subfolder": "portraits", "type": "output"},
    ]
    assert saver.calls == [("portraits/ZImage", str(saver.output), 56, 40)]  # ComfyUI's helper, width then height
    for i, info in enumerate(out["ui"]["images"]):
        path = saver.output / info["subfolder"] / info["filename"]
        data = path.read_bytes()
        want = np.clip(255.0 * batch[i].numpy(), 0, 255).astype(np.uint8)  # SaveImage's conversion
        assert np.array_equal(np.asarray(Image.open(path)), want)
        meta = read_metadata(data)
        assert json.loads(meta["prompt"]) == PROMPT and json.loads(meta["workflow"]) == WORKFLOW
    assert [t["file"] for t in out["ui"]["zimage_save"]] == ["ZImage_00001_.png", "ZImage_00002_.png"]
    assert all(t["bytes"] > 0 and t["encode_s"] >= 0 for t in out["ui"]["zimage_save"])
    # Queued again: the counter goes on, nothing is overwritten.
    again = saver.node().save(images(), "portraits/ZImage", "png", 90)
    assert again["ui"]["images"][0]["filename"] == "ZImage_00003_.png"
    assert not [p for p in saver.output.rglob("*") if p.name.startswith(".")]  # no partial files left


@pytest.mark.parametrize("fmt,extension,kind", [("png_fast", ".png", "PNG"), ("webp", ".webp", "WEBP"),
                                                ("jpeg", ".jpg", "JPEG")])
def test_each_format_writes_its_file_with_the_metadata(saver, fmt, extension, kind):
    out = saver.node().save(images(), "ZImage", fmt, 75, prompt=PROMPT, extra_pnginfo={"workflow": WORKFLOW})
    (info,) = out["ui"]["images"]
    path = saver.output / info["filename"]
    assert info["filename"] == f"ZImage_00001_{extension}" and info["subfolder"] == ""
    with Image.open(path) as im:
        assert im.format == kind and im.size == (56, 40)
    assert json.loads(read_metadata(path.read_bytes())["workflow"]) == WORKFLOW


def test_disable_metadata_is_respected(saver):
    saver.args.disable_metadata = True
    out = saver.node().save(images(), "ZImage", "png", 90, prompt=PROMPT, extra_pnginfo={"workflow": WORKFLOW})
    assert read_metadata((saver.output / out["ui"]["images"][0]["filename"]).read_bytes()) == {}


@pytest.mark.parametrize("prefix,message", [
    ("../escape", "leads out of ComfyUI's output folder"),
    ("a/../../escape", "leads out of ComfyUI's output folder"),
    ("..", "leads out of ComfyUI's output folder"),
    ("/etc/cron.d/x", "is an absolute path"),
    ("", "filename_prefix is empty"),
    ("   ", "filename_prefix is empty"),
])
def test_prefixes_that_leave_the_output_folder_are_an_error_when_the_node_runs(saver, tmp_path, prefix, message):
    with pytest.raises(Exception, match=message) as raised:
        saver.node().save(images(), prefix, "png", 90)
    assert str(tmp_path) not in str(raised.value)  # no server path reaches the client
    assert saver.calls == [] and list(saver.output.rglob("*")) == []


def test_prefixes_inside_the_output_folder_pass(saver, pack):
    problem = sys.modules[pack.__name__ + ".zimage_turbo.nodes.save_node"].prefix_problem
    for prefix in ("ZImage", "a/b/ZImage", "a/../ZImage", "%year%-%month%/z", "./z"):
        assert problem(prefix) is None
    # Not refused when queued: ComfyUI would drop the save and still run the probe, reporting success.
    assert not hasattr(saver.node, "VALIDATE_INPUTS")


def test_schema_offers_the_formats_with_png_first_and_hides_prompt_and_workflow(saver):
    spec = saver.node.INPUT_TYPES()
    assert spec["required"]["format"][0] == ["png", "png_fast", "webp", "jpeg"]
    assert spec["required"]["format"][1]["default"] == "png"
    assert spec["required"]["filename_prefix"][1]["default"] == "ZImage"
    assert spec["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert saver.node.OUTPUT_NODE is True and saver.node.RETURN_TYPES == ()
    for name, (_, options) in spec["required"].items():
        assert options.get("tooltip"), name


def test_a_bad_image_is_a_clear_error(saver):
    with pytest.raises(Exception, match="cannot save an image of shape"):
        saver.node().save(torch.zeros((1, 8, 8, 2)), "ZImage", "png", 90)
