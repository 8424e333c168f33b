"""The front door's pure helpers: graph shape, LoRA-set keys, file renaming, messages, redaction (no Ray, no server)."""

from __future__ import annotations

import json

import pytest

from serve_helpers import graph
from zimage_turbo.serve import prompts
from zimage_turbo.serve.prompts import PromptShapeError


@pytest.mark.parametrize("bad,message", [
    ([1, 2], "the prompt must be an API-format workflow"),
    ({"nodes": [], "links": []}, "this is a UI-format workflow, not the API format"),
    ({}, "the prompt has no nodes"),
    ({"1": "KSampler"}, "node '1' must be an object with class_type and inputs, not a string"),
    ({"1": {"inputs": {}}}, "node '1' has no class_type"),
    ({"1": {"class_type": "X", "inputs": [1]}}, "node '1': inputs must be an object, not a list"),
])
def test_what_is_not_an_api_workflow_is_refused_with_what_it_is(bad, message):
    with pytest.raises(PromptShapeError) as info:
        prompts.check_graph(bad)
    assert info.value.message == message
    body = info.value.body()
    assert body["error"]["type"] == "invalid_prompt" and body["node_errors"] == {}
    assert "Export (API)" in body["error"]["details"]


def test_a_post_prompt_body_is_read_as_comfyui_reads_it():
    g = graph(1)
    assert prompts.parse_prompt_request({"prompt": g, "client_id": "c", "extra_data": {"a": 1}}) == (g, {"a": 1}, "c")
    assert prompts.parse_prompt_request({"prompt": g}) == (g, {}, None)
    with pytest.raises(PromptShapeError) as info:
        prompts.parse_prompt_request({"client_id": "c"})
    assert info.value.body()["error"]["type"] == "no_prompt"  # ComfyUI's own answer to a body without a prompt
    for body, message in (("text", "the request body must be a JSON object"),
                          ({"prompt": g, "extra_data": []}, "extra_data must be an object"),
                          ({"prompt": g, "client_id": 5}, "client_id must be a string")):
        with pytest.raises(PromptShapeError, match=message):
            prompts.parse_prompt_request(body)


def test_the_lora_key_names_the_active_loras_and_their_strengths():
    a = [{"lora": "a.safetensors", "strength": 0.8, "on": True}, {"lora": "b.safetensors", "strength": 1, "on": True}]
    assert prompts.lora_key(graph(1)) == ""  # no LoRA: no affinity
    key = prompts.lora_key(graph(1, loras=a))
    assert key.startswith("loras-") and len(key) == 6 + 16
    # Order of the rows, seed, prompt, and rows that are off do not change the merged weights, nor the key.
    assert prompts.lora_key(graph(2, negative="x", loras=a[::-1] + [{"lora": "c.safetensors", "on": False}])) == key
    assert prompts.lora_key(graph(1, loras=[dict(a[0], strength=0.80000001), a[1]])) == key
    # Another strength or another file is another set.
    assert prompts.lora_key(graph(1, loras=[dict(a[0], strength=0.7), a[1]])) != key
    assert prompts.lora_key(graph(1, loras=a[:1])) != key
    # ComfyUI's own loaders count too; rows that are not well formed are skipped (ComfyUI refuses the prompt).
    native = {"1": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "a.safetensors",
                                                                   "strength_model": 0.8}}}
    assert prompts.lora_set(native) == [("a.safetensors", 0.8)]
    broken = graph(1)
    broken["2"]["inputs"]["loras"] = "not json"
    assert prompts.lora_key(broken) == ""


def test_files_of_a_prompt_are_renamed_under_its_id_and_nothing_else_changes():
    outputs = {"5": {"images": [{"filename": "ZImage_00001_.png", "subfolder": "", "type": "output"},
                                {"filename": "b.png", "subfolder": "portraits", "type": "output"}],
                     "zimage_save": [{"seconds": 0.01}]},
               "4": {"text": ["report"], "zimage_probe": [{"total_s": 1.0}]}}
    renamed = prompts.rename_outputs(outputs, "p1")
    assert [(f["subfolder"], f["filename"]) for f in prompts.output_files(renamed)] == [
        ("p1", "ZImage_00001_.png"), ("p1/portraits", "b.png")]
    assert renamed["4"] == outputs["4"] and renamed["5"]["zimage_save"] == outputs["5"]["zimage_save"]
    assert outputs["5"]["images"][0]["subfolder"] == ""  # the original is left as it was
    assert prompts.probe_reports(outputs) == {"4": {"total_s": 1.0}}


def test_messages_get_the_front_doors_prompt_id_and_the_end_is_recognised():
    msg = {"type": "executed", "data": {"node": "5", "prompt_id": "replica-id",
                                        "output": {"images": [{"filename": "x.png", "subfolder": "", "type": "output"}]}}}
    new = prompts.rewrite_message(msg, "front-id")
    assert new["data"]["prompt_id"] == "front-id" and new["data"]["output"]["images"][0]["subfolder"] == "front-id"
    assert msg["data"]["prompt_id"] == "replica-id"
    assert prompts.is_terminal({"type": "execution_success", "data": {}})
    assert prompts.is_terminal({"type": "executing", "data": {"node": None}})
    assert not prompts.is_terminal({"type": "executing", "data": {"node": "3"}})
    assert not prompts.is_terminal({"type": "progress", "data": {"value": 1}})


def test_server_paths_never_reach_clients():
    error = {"exception_message": "cannot read /srv/comfy/models/loras/x.safetensors",
             "traceback": ['  File "/srv/comfy/execution.py", line 3, in run\n',
                           '  File "/usr/lib/python3.11/site-packages/torch/nn.py", line 9\n'],
             "nested": [("/work/replica-1/output/a.png", 1)]}
    out = prompts.redact(error, [("/srv/comfy", "<ComfyUI>"), ("/work/replica-1", "<replica>"), ("/work", "<work>")])
    text = json.dumps(out)
    assert "/srv" not in text and "/usr/lib" not in text and "/work" not in text
    assert out["exception_message"] == "cannot read <ComfyUI>/models/loras/x.safetensors"
    assert out["traceback"] == ['  File "<ComfyUI>/execution.py", line 3, in run\n',  # a known folder by its label,
                                '  File "nn.py", line 9\n']  # any other by the file's name alone
    assert out["nested"] == [("<replica>/output/a.png", 1)]  # the longest prefix wins
