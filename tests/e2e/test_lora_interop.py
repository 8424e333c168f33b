"""LoRA stacks from other packs, trigger words and every LoRA kind, through a real ComfyUI server.

The server of this module is our own (not the session's): its custom_nodes also hold a test-only pack,
tests/fixtures/custom_nodes/zimage_test_lora_stacker, whose stacker emits ComfyUI's common LORA_STACK the way
Efficiency Nodes, Comfyroll and Lora-Manager do (a list of (lora_name, model_strength, clip_strength) tuples).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools import lora_formats
from devtools.model_builder import TINY

FIXTURE_NODES = Path(__file__).resolve().parents[1] / "fixtures" / "custom_nodes" / "zimage_test_lora_stacker"
TRIGGER = "zit glow"


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    from scripts.comfy_client import COMFY_DIR, ComfyServer

    if not (COMFY_DIR / "main.py").is_file():
        pytest.fail(f"ComfyUI is not set up in {COMFY_DIR}: run `make test` (or scripts/setup.sh) first.")
    base = tmp_path_factory.mktemp("interop_base")
    srv = ComfyServer(base)
    srv.prepare()
    # The test-only pack goes in before the server starts: custom nodes are imported at start.
    (base / "custom_nodes" / FIXTURE_NODES.name).symlink_to(FIXTURE_NODES, target_is_directory=True)
    models, built = base / "models", tiny["built"]
    # The diffusers folder is the model here (LoRAs are what this module tests, not file layouts); the split
    # text encoder and VAE are there only because the loader's combos must name existing files.
    shutil.copytree(built.diffusers_dir, models / "diffusers" / "zit_tiny")
    shutil.copy(built.text_encoder_file, models / "text_encoders" / "zit_tiny_te.safetensors")
    shutil.copy(built.vae_file, models / "vae" / "zit_tiny_ae.safetensors")
    loras = models / "loras"
    (loras / "sub").mkdir(parents=True, exist_ok=True)
    lora_formats.build_lora(loras / "trig_lokr.safetensors", TINY.transformer, "lokr_w2_factored", rank=2, seed=41,
                            metadata={"modelspec.trigger_phrase": TRIGGER})
    lora_formats.build_lora(loras / "sub" / "kohya_style.safetensors", TINY.transformer, "kohya_fused", seed=42,
                            metadata={"trigger_words": "sks style"})
    for layout in ("loha", "diff", "comfy_distill_patch"):
        lora_formats.build_lora(loras / f"{layout}.safetensors", TINY.transformer, layout, seed=43)
    srv.start()
    yield srv
    srv.stop()


def graph(seed=3, prompt="a cat in a garden", sampler=None, extra=None) -> dict:
    g = {
        "1": {"class_type": "ZImageTurboLoader", "inputs": {
            "model": "[diffusers] zit_tiny", "text_encoder": "zit_tiny_te.safetensors", "vae": "zit_tiny_ae.safetensors",
            "dtype": "fp32", "device": "auto", "memory": "resident", "compile": "off"}},
        "3": {"class_type": "ZImageTurboSampler", "inputs": {
            "pipe": ["1", 0], "prompt": prompt, "negative_prompt": "", "width": 48, "height": 48, "steps": 4,
            "cfg": 0.0, "shift": 3.0, "seed": seed, "batch_size": 1, **(sampler or {})}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "interop"}},
    }
    g.update(extra or {})
    return g


def stacker(name_1, model_1, clip_1=1.0, name_2="None", model_2=1.0, clip_2=1.0, lora_stack=None) -> dict:
    inputs = {"lora_name_1": name_1, "model_str_1": model_1, "clip_str_1": clip_1,
              "lora_name_2": name_2, "model_str_2": model_2, "clip_str_2": clip_2}
    if lora_stack:
        inputs["lora_stack"] = lora_stack
    return {"class_type": "ZImageTestLoraStacker", "inputs": inputs}


def our_stack(rows, **links) -> dict:
    return {"class_type": "ZImageTurboLoraStack", "inputs": {"loras": json.dumps(rows), **links}}


def ok(server, g):
    res = server.client.run(g, timeout=300)
    assert res.status == "success", (res.error or {}).get("exception_message")
    return res


def image(server, res, node="9") -> np.ndarray:
    info = res.outputs()[node]["images"][0]
    return np.asarray(Image.open(io.BytesIO(server.client.view(info["filename"], info["subfolder"], info["type"]))))


def test_object_info_shows_the_common_stack_type_and_the_trigger_option(server):
    info = server.client.object_info()
    stack, sampler = info["ZImageTurboLoraStack"], info["ZImageTurboSampler"]
    assert stack["output"] == ["ZIMAGE_LORA_STACK", "STRING", "LORA_STACK"]
    assert stack["output_name"] == ["lora_stack", "trigger_words", "LORA_STACK"]
    for node in (stack, sampler):
        spec = node["input"]["optional"]["LORA_STACK"]
        assert spec[0] == "LORA_STACK" and "clip_strength has no meaning here" in spec[1]["tooltip"]
    assert sampler["input"]["optional"]["prepend_trigger_words"][1]["default"] is False
    assert "prepend_trigger_words" not in sampler["input"]["required"]
    assert info["ZImageTestLoraStacker"]["output"] == ["LORA_STACK"]  # the test pack is there


def test_a_lora_stack_from_another_pack_drives_the_sampler_like_our_own_stack(server):
    base = image(server, ok(server, graph()))
    ours = image(server, ok(server, graph(sampler={"lora_stack": ["2", 0]},
                                          extra={"2": our_stack([{"lora": "trig_lokr.safetensors", "strength": 0.9}])})))
    # clip strength 0.1 on purpose: it has no meaning here and changes nothing
    theirs_res = ok(server, graph(sampler={"LORA_STACK": ["7", 0]}, extra={"7": stacker("trig_lokr.safetensors", 0.9, 0.1)}))
    assert np.array_equal(image(server, theirs_res), ours)
    assert np.abs(ours.astype(int) - base.astype(int)).max() > 5  # the LoRA really changes the image


def test_our_stack_takes_their_stack_and_gives_trigger_words_and_a_lora_stack_back(server):
    g = graph(sampler={"lora_stack": ["2", 0]}, extra={
        "7": stacker("sub/kohya_style.safetensors", 0.6, 1.0, "None"),
        "2": our_stack([{"lora": "trig_lokr.safetensors", "strength": 0.9}], LORA_STACK=["7", 0]),
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
        "6": {"class_type": "ZImageTestShowLoraStack", "inputs": {"lora_stack": ["2", 2]}},
    })
    res = ok(server, g)
    assert res.outputs()["5"]["text"] == ["sks style, zit glow"]
    shown = res.outputs()["6"]["lora_stack"][0]
    assert shown["container"] == "list"
    assert shown["entries"] == [{"type": "tuple", "value": ["sub/kohya_style.safetensors", 0.6, 0.6]},
                                {"type": "tuple", "value": ["trig_lokr.safetensors", 0.9, 0.9]}]
    # The same two LoRAs given straight to the sampler, one from each stack type: the same image.
    direct = graph(sampler={"lora_stack": ["2", 0], "LORA_STACK": ["7", 0]}, extra={
        "7": stacker("sub/kohya_style.safetensors", 0.6),
        "2": our_stack([{"lora": "trig_lokr.safetensors", "strength": 0.9}])})
    assert np.array_equal(image(server, ok(server, direct)), image(server, res))
    # And our LORA_STACK output feeds another pack's stacker, which feeds our sampler: the same image again.
    chained = graph(sampler={"LORA_STACK": ["8", 0]}, extra={
        "7": stacker("sub/kohya_style.safetensors", 0.6),
        "2": our_stack([{"lora": "trig_lokr.safetensors", "strength": 0.9}], LORA_STACK=["7", 0]),
        "8": stacker("None", 1.0, lora_stack=["2", 2])})
    assert np.array_equal(image(server, ok(server, chained)), image(server, res))


def test_trigger_words_go_in_front_of_the_prompt_only_when_asked(server):
    lora = {"2": our_stack([{"lora": "trig_lokr.safetensors", "strength": 0.9}])}
    old_prompt = graph(sampler={"lora_stack": ["2", 0]}, extra=lora)  # as API prompts were written before the option
    plain = image(server, ok(server, old_prompt))
    off = image(server, ok(server, graph(sampler={"lora_stack": ["2", 0], "prepend_trigger_words": False}, extra=lora)))
    on = image(server, ok(server, graph(sampler={"lora_stack": ["2", 0], "prepend_trigger_words": True}, extra=lora)))
    typed = image(server, ok(server, graph(prompt=f"{TRIGGER}, a cat in a garden", sampler={"lora_stack": ["2", 0]},
                                           extra=lora)))
    assert np.array_equal(plain, off)
    assert np.array_equal(on, typed) and not np.array_equal(on, plain)
    # through another pack's stack as well
    theirs = graph(sampler={"LORA_STACK": ["7", 0], "prepend_trigger_words": True},
                   extra={"7": stacker("trig_lokr.safetensors", 0.9)})
    assert np.array_equal(image(server, ok(server, theirs)), typed)


@pytest.mark.parametrize("layout", ["loha", "diff", "comfy_distill_patch"])
def test_other_lora_kinds_run_on_the_server(server, layout):
    base = image(server, ok(server, graph(seed=8)))
    res = ok(server, graph(seed=8, sampler={"LORA_STACK": ["7", 0]}, extra={"7": stacker(f"{layout}.safetensors", 0.8)}))
    assert np.abs(image(server, res).astype(int) - base.astype(int)).max() > 5


@pytest.mark.parametrize("entries,message", [
    ([["../vae/zit_tiny_ae.safetensors", 1.0, 1.0]], "../vae/zit_tiny_ae.safetensors: only files inside ComfyUI's "
                                                     "models/loras"),
    ([["/etc/hosts", 1.0, 1.0]], "/etc/hosts: only files inside ComfyUI's models/loras folders can be used"),
    ([["missing.safetensors", 1.0, 1.0]], "missing.safetensors was not found in models/loras"),
    ([["trig_lokr.safetensors", 1.0]], "LORA_STACK entry 1 is ('trig_lokr.safetensors', 1.0): an entry is"),
    ([["trig_lokr.safetensors", 99, 1.0]], "LORA_STACK entry 1 (trig_lokr.safetensors): strength 99 is outside"),
])
def test_bad_lora_stacks_are_errors_naming_the_entry_then_the_server_goes_on(server, entries, message):
    for target in ({"3": {"LORA_STACK": ["7", 0]}}, {"2": {"LORA_STACK": ["7", 0]}}):
        g = graph(sampler={"lora_stack": ["2", 0]}, extra={
            "7": {"class_type": "ZImageTestRawLoraStack", "inputs": {"entries": json.dumps(entries)}},
            "2": our_stack([])})
        for node, links in target.items():
            g[node]["inputs"].update(links)
        res = server.client.run(g, timeout=300)
        assert res.status == "error"
        text = res.error["exception_message"]
        assert message in text and str(server.base_dir) not in text
    ok(server, graph(seed=11))
