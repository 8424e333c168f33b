"""The nodes called directly, with only ComfyUI's modules stood in for (see conftest.py)."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest

from model_names import MODEL, TEXT_ENCODER, VAE


def test_the_pack_registers_five_nodes_with_one_category(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == {"ZImageTurboLoader", "ZImageTurboLoraStack", "ZImageTurboSampler",
                                             "ZImageTurboProbe", "ZImageTurboSave"}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    assert {cls.CATEGORY for cls in pack.NODE_CLASS_MAPPINGS.values()} == {"Z-Image Turbo"}


def stack_node(pack):
    return pack.NODE_CLASS_MAPPINGS["ZImageTurboLoraStack"]


@pytest.mark.parametrize("rows,message", [
    ("oops", "loras must be a JSON list"),
    ('{"lora": "a.safetensors"}', "loras must be a JSON list"),
    ('[{"strength": 1}]', 'needs a \\"lora\\" file name'.replace("\\", "")),
    ('[{"lora": "a.safetensors", "on": "false"}]', '"on" must be true or false'),
    ('[{"lora": "a.safetensors", "strength": NaN}]', "strength nan is not a finite number"),
    ('[{"lora": "a.safetensors", "strength": -Infinity}]', "strength -inf is not a finite number"),
    ('[{"lora": "a.safetensors", "strength": 21}]', "outside -20..20"),
    ('[{"lora": "a.safetensors", "strength": "0.8"}]', "strength must be a number"),
    ('[{"lora": "a.safetensors", "weight": 0.8}]', "unknown field(s) weight"),
    ('[{"lora": "not_there.safetensors"}]', "not_there.safetensors was not found in models/loras"),
])
def test_stack_rows_that_are_not_the_schema_are_refused_when_queued(pack, rows, message):
    result = stack_node(pack).VALIDATE_INPUTS(loras=rows)
    assert result is not True and message in result
    assert str(pack.models) not in result  # no server path reaches the client


def test_a_lora_on_twice_is_refused_in_one_node_and_across_chained_stacks(pack):
    (pack.models / "loras" / "a.safetensors").write_bytes(b"")
    one = json.dumps([{"lora": "a.safetensors", "strength": 0.5, "on": True}])
    twice = json.dumps([{"lora": "a.safetensors", "strength": 0.5, "on": True}] * 2)
    assert "switched on twice" in stack_node(pack).VALIDATE_INPUTS(loras=twice)
    assert stack_node(pack).VALIDATE_INPUTS(loras=one) is True
    front = stack_node(pack)().stack(one)[0]
    with pytest.raises(Exception, match="switched on twice"):
        stack_node(pack)().stack(one, lora_stack=front)
    off = json.dumps([{"lora": "a.safetensors", "strength": 0.5, "on": False}])
    assert len(stack_node(pack)().stack(off, lora_stack=front)[0]) == 1  # a row that is off is not applied


def test_loader_reports_a_missing_model_once_without_server_paths(pack):
    loader = pack.NODE_CLASS_MAPPINGS["ZImageTurboLoader"]
    message = loader.VALIDATE_INPUTS(model="nope.safetensors")
    assert "nope.safetensors was not found in models/diffusion_models" in message
    assert str(pack.models) not in message
    import inspect

    # Only `model` is validated here: ComfyUI files the message under every argument named.
    assert list(inspect.signature(loader.VALIDATE_INPUTS).parameters) == ["model"]


def place(pack, tiny):
    built = tiny["built"]
    shutil.copy(built.transformer_file, pack.models / "diffusion_models" / MODEL)
    shutil.copy(built.text_encoder_file, pack.models / "text_encoders" / TEXT_ENCODER)
    shutil.copy(built.vae_file, pack.models / "vae" / VAE)
    shutil.copytree(built.diffusers_dir, pack.models / "diffusers" / built.diffusers_dir.name)


def test_two_samplers_on_one_loader_each_hand_their_own_report_to_their_probe(pack, tiny):
    place(pack, tiny)
    nodes = pack.NODE_CLASS_MAPPINGS
    (pipe,) = nodes["ZImageTurboLoader"]().load(f"[diffusers] {tiny['built'].diffusers_dir.name}", TEXT_ENCODER, VAE,
                                                "fp32", "auto", "resident", "off")
    assert "/" not in repr(pipe).split("(", 1)[1].split(",")[0]  # the handle shows file names, not paths
    sampler, probe = nodes["ZImageTurboSampler"](), nodes["ZImageTurboProbe"]()
    args = dict(prompt="a cat", negative_prompt="", height=32, steps=2, cfg=0.0, shift=3.0, batch_size=1)
    img_a, _, rep_a = sampler.sample(pipe, width=32, seed=1, **args)
    img_b, _, rep_b = sampler.sample(pipe, width=48, seed=2, **args)
    shown_a = probe.probe(img_a, report=rep_a)["ui"]["zimage_probe"][0]
    shown_b = probe.probe(img_b, report=rep_b)["ui"]["zimage_probe"][0]
    assert (shown_a["width"], shown_a["seed"]) == (32, 1) and (shown_b["width"], shown_b["seed"]) == (48, 2)
    # A workflow saved before the report output existed still runs: it shows the pipeline's last run, marked.
    old = probe.probe(img_a, pipe=pipe)
    assert old["ui"]["zimage_probe"][0]["seed"] == 2 and old["ui"]["text"][0].startswith("(last generation")
    assert "No report" in probe.probe(img_a)["ui"]["text"][0]
    # After an unload, the old-workflow fallback does not load 20 GB again just to show a report.
    api = importlib.import_module(pack.__name__ + ".zimage_turbo.engine.api")
    api.release_all()
    assert "No report" in probe.probe(img_a, pipe=pipe)["ui"]["text"][0]
    assert api.loaded() == []


def test_the_sampler_runs_with_its_own_loaders_settings(pack, tiny):
    place(pack, tiny)
    nodes = pack.NODE_CLASS_MAPPINGS
    name = f"[diffusers] {tiny['built'].diffusers_dir.name}"
    (resident,) = nodes["ZImageTurboLoader"]().load(name, TEXT_ENCODER, VAE, "fp32", "auto", "resident", "off")
    (low,) = nodes["ZImageTurboLoader"]().load(name, TEXT_ENCODER, VAE, "fp32", "auto", "low_vram", "off")
    args = dict(prompt="a cat", negative_prompt="", width=32, height=32, steps=2, cfg=0.0, shift=3.0, seed=1,
                batch_size=1)
    # The low_vram loader ran last: the resident loader's sampler must still run resident.
    assert nodes["ZImageTurboSampler"]().sample(resident, **args)[2].memory_mode == "resident"
    assert nodes["ZImageTurboSampler"]().sample(low, **args)[2].memory_mode == "low_vram"
