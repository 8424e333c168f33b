"""The four nodes inside a real ComfyUI server, driven over HTTP and websocket."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graphs import MODEL, api_prompt

NODES = {"ZImageTurboLoader", "ZImageTurboLoraStack", "ZImageTurboSampler", "ZImageTurboProbe"}


def image_of(comfy, result, node="5") -> np.ndarray:
    info = result.outputs()[node]["images"][0]
    raw = comfy.client.view(info["filename"], info["subfolder"], info["type"])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def probe_of(result) -> dict:
    return result.outputs()["4"]["zimage_probe"][0]


def ok(comfy, graph):
    res = comfy.client.run(graph, timeout=300)
    assert res.status == "success", (res.error or {}).get("exception_message")
    return res


def test_object_info_lists_the_four_nodes(comfy):
    info = comfy.client.object_info()
    assert NODES <= set(info)
    for name in NODES:
        node = info[name]
        assert node["category"] == "Z-Image Turbo"
        assert len(node["description"]) > 40
        for inp, spec in {**node["input"]["required"], **node["input"].get("optional", {})}.items():
            assert spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert set(info["ZImageTurboLoader"]["input"]["required"]) == {"model", "text_encoder", "vae", "dtype", "device", "memory"}
    assert set(info["ZImageTurboLoader"]["input"]["optional"]) == {"compile"}
    assert MODEL in info["ZImageTurboLoader"]["input"]["required"]["model"][0]
    assert "[diffusers] zit_tiny" in info["ZImageTurboLoader"]["input"]["required"]["model"][0]
    sampler = info["ZImageTurboSampler"]["input"]["required"]
    assert sampler["steps"][1]["default"] == 8 and sampler["cfg"][1]["default"] == 0.0 and sampler["shift"][1]["default"] == 3.0
    assert info["ZImageTurboProbe"]["output_name"] == ["images", "report", "json", "chart"]
    assert info["ZImageTurboSampler"]["output"] == ["IMAGE", "LATENT", "ZIMAGE_TURBO_REPORT"]
    assert set(info["ZImageTurboProbe"]["input"]["required"]) == {"images"}
    assert set(info["ZImageTurboProbe"]["input"]["optional"]) == {"report", "pipe"}


def test_full_prompt_saves_an_image_of_the_requested_size(comfy):
    res = ok(comfy, api_prompt(seed=101, width=80, height=48))
    assert image_of(comfy, res).shape == (48, 80, 3)
    probe = probe_of(res)
    assert probe["width"] == 80 and probe["steps"] == 8 and len(probe["step_s"]) == 8
    text = res.outputs()["4"]["text"][0]
    assert "denoise" in text and "VAE decode" in text
    progress = [m["data"] for m in res.messages if m["type"] == "progress"]
    assert [p["value"] for p in progress] == list(range(1, 9)) and {p["max"] for p in progress} == {8}


@pytest.mark.parametrize("dtype", ["auto", "bf16", "fp16"])
def test_every_dtype_generates_a_finite_image(comfy, dtype):
    res = ok(comfy, api_prompt(seed=3, dtype=dtype))
    assert probe_of(res)["dtype"] == ("bf16" if dtype == "auto" else dtype)  # auto on a CPU: bf16
    assert image_of(comfy, res).std() > 1


def test_prompt_without_the_optional_compile_input_still_runs(comfy):
    graph = api_prompt(seed=9)
    del graph["1"]["inputs"]["compile"]  # as written before the input existed
    assert probe_of(ok(comfy, graph))["compiled"] is False  # auto on a CPU: eager


def test_diffusers_folder_source(comfy):
    res = ok(comfy, api_prompt(seed=5, model="[diffusers] zit_tiny"))
    assert "diffusers folder" in probe_of(res)["source"]


def test_changing_lora_strength_never_reloads_and_going_back_restores_the_image(comfy):
    def graph(strength):
        return api_prompt(seed=7, loras=[{"lora": "tiny_kohya_fused.safetensors", "strength": strength, "on": True}])

    ok(comfy, api_prompt(seed=7))  # pipeline loaded and warm
    a = ok(comfy, graph(0.5))
    b = ok(comfy, graph(1.2))
    a2 = ok(comfy, graph(0.5))
    pa, pb, pa2 = probe_of(a), probe_of(b), probe_of(a2)
    for p in (pa, pb, pa2):
        assert p["base_reloaded"] is False and p["load_s"] == {}
    assert pa["component_loads_total"] == pb["component_loads_total"] == pa2["component_loads_total"]
    assert pb["lora"][0]["strength"] == 1.2 and pb["lora_files_read"] == 0
    assert any(m["type"] == "executing" and m["data"].get("node") == "3" for m in a2.messages)  # really sampled again
    img_a, img_b, img_a2 = image_of(comfy, a), image_of(comfy, b), image_of(comfy, a2)
    assert np.abs(img_a.astype(int) - img_b.astype(int)).max() > 5
    assert np.array_equal(img_a, img_a2)


def test_off_row_and_no_lora_give_the_base_image(comfy):
    base = image_of(comfy, ok(comfy, api_prompt(seed=8)))
    off = ok(comfy, api_prompt(seed=8, loras=[{"lora": "tiny_diffusers.safetensors", "strength": 1.0, "on": False}]))
    assert np.array_equal(base, image_of(comfy, off))


BAD_EXECUTIONS = [
    ("size", dict(width=1000, height=1024), "not a multiple of 16"),
    ("pickle", dict(model="pickled_model.ckpt"), "pickle checkpoints (.ckpt) are refused"),
    ("corrupt", dict(model="corrupt.safetensors"), "corrupt or truncated"),
    ("missing weights", dict(model="[diffusers] broken_folder"), "no .safetensors weights found for the transformer"),
    ("foreign lora", dict(loras=[{"lora": "sdxl_style.safetensors", "strength": 1.0, "on": True}]), "fit no layer"),
    ("lora file holding NaN", dict(loras=[{"lora": "nan_weights.safetensors", "strength": 1.0, "on": True}]),
     "hold NaN or infinite values"),
    ("lora that overflows the model", dict(loras=[{"lora": "huge_weights.safetensors", "strength": 1.0, "on": True}]),
     "so no image is returned (it would be black)"),
    ("link to a text file", dict(loras=[{"lora": "passwd_link.safetensors", "strength": 1.0, "on": True}]),
     "passwd_link.safetensors"),
    ("NaN shift", dict(shift=float("nan")), "shift nan"),
]


@pytest.mark.parametrize("kwargs,message", [b[1:] for b in BAD_EXECUTIONS], ids=[b[0] for b in BAD_EXECUTIONS])
def test_bad_input_is_an_execution_error_and_the_server_goes_on(comfy, kwargs, message):
    shift = kwargs.pop("shift", None)
    graph = api_prompt(seed=11, **kwargs)
    if shift is not None:
        graph["3"]["inputs"]["shift"] = shift  # sent as the JSON token NaN, which ComfyUI's parser accepts
    saved = image_count(comfy)
    res = comfy.client.run(graph, timeout=300)
    assert res.status == "error"
    assert message in res.error["exception_message"]
    assert image_count(comfy) == saved  # no image, black or other, was saved
    assert res.error["node_type"] in {"ZImageTurboLoader", "ZImageTurboSampler"}
    # What reaches the API client names files relative to their model folder, never by server path.
    shown = json.dumps({k: res.error.get(k) for k in ("exception_message", "current_inputs", "current_outputs")})
    assert str(comfy.base_dir) not in shown and "/tmp/" not in shown
    ok(comfy, api_prompt(seed=12))


def image_count(comfy) -> int:
    return len(list((comfy.base_dir / "output").glob("*.png")))


BAD_VALIDATIONS = [
    ("missing lora", dict(loras=[{"lora": "not_there.safetensors", "strength": 1.0, "on": True}]),
     "not_there.safetensors was not found in models/loras", "2"),
    ("missing model", dict(model="nope.safetensors"), "nope.safetensors was not found in models/diffusion_models", "1"),
    ("bad lora json", dict(loras="oops"), "loras must be a JSON list", "2"),
    ("on as a string", dict(loras=[{"lora": "tiny_diffusers.safetensors", "strength": 1.0, "on": "false"}]),
     '\\"on\\" must be true or false', "2"),
    ("NaN strength", dict(loras=[{"lora": "tiny_diffusers.safetensors", "strength": float("nan"), "on": True}]),
     "strength nan is not a finite number", "2"),
    ("infinite strength", dict(loras=[{"lora": "tiny_diffusers.safetensors", "strength": float("inf"), "on": True}]),
     "strength inf is not a finite number", "2"),
    ("huge strength", dict(loras=[{"lora": "tiny_diffusers.safetensors", "strength": 1e30, "on": True}]),
     "strength 1e+30 is outside", "2"),
    ("same lora twice", dict(loras=[{"lora": "tiny_diffusers.safetensors", "strength": 0.8, "on": True}] * 200),
     "switched on twice", "2"),
]


@pytest.mark.parametrize("kwargs,message,node", [b[1:] for b in BAD_VALIDATIONS], ids=[b[0] for b in BAD_VALIDATIONS])
def test_missing_files_are_reported_when_queued(comfy, kwargs, message, node):
    graph = api_prompt(seed=13, **{k: v for k, v in kwargs.items() if k != "loras" or isinstance(v, list)})
    if kwargs.get("loras") == "oops":
        graph["2"]["inputs"]["loras"] = "oops"
    status, body = comfy.client.queue(graph, "validation-test")
    assert status == 400
    details = json.dumps(body["node_errors"][node])
    assert message in details
    assert str(comfy.base_dir) not in json.dumps(body)
    ok(comfy, api_prompt(seed=14))


def test_a_missing_vae_is_reported_once_under_vae(comfy):
    graph = api_prompt(seed=15)
    graph["1"]["inputs"]["vae"] = "no_such_vae.safetensors"
    status, body = comfy.client.queue(graph, "validation-test")
    assert status == 400
    errors = body["node_errors"]["1"]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["vae"]
    assert "no_such_vae.safetensors" in errors[0]["details"]


def test_the_loader_lists_show_parts_first_and_leave_out_other_models(comfy):
    loader = comfy.client.object_info()["ZImageTurboLoader"]["input"]["required"]
    models, encoders, vaes = loader["model"][0], loader["text_encoder"][0], loader["vae"][0]
    # Z-Image parts first, then the diffusers folders, then files whose header cannot tell (the loader's exact
    # refusal comes when one is chosen); other models are left out.
    assert models == [MODEL, "[diffusers] broken_folder", "[diffusers] zit_tiny", "corrupt.safetensors",
                      "pickled_model.ckpt"]
    assert encoders == ["qwen_3_4b.safetensors"]  # not clip_l.safetensors, not a_lora_in_the_wrong_folder
    assert vaes == ["ae.safetensors"]  # not sdxl_vae.safetensors
    for name in ("model", "text_encoder", "vae"):
        assert "left out" in loader[name][1]["tooltip"]


def test_a_prompt_naming_a_left_out_model_is_refused_when_queued_with_the_reason(comfy):
    graph = api_prompt(seed=17)
    graph["1"]["inputs"]["model"] = "flux1-dev.safetensors"
    status, body = comfy.client.queue(graph, "validation-test")
    assert status == 400
    errors = body["node_errors"]["1"]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["model"]
    assert ("flux1-dev.safetensors is a Flux diffusion model, not a Z-Image diffusion model: choose a Z-Image-Turbo "
            "diffusion model (z_image_turbo_bf16.safetensors).") in errors[0]["details"]
    assert "python -m zimage_turbo check" in errors[0]["details"]
    assert str(comfy.base_dir) not in json.dumps(body)
    ok(comfy, api_prompt(seed=18))


@pytest.mark.parametrize("name,value,message", [
    ("text_encoder", "clip_l.safetensors",
     "clip_l.safetensors is a CLIP text encoder, not the Qwen3-4B text encoder Z-Image uses: choose qwen_3_4b"),
    ("text_encoder", "a_lora_in_the_wrong_folder.safetensors",
     "a_lora_in_the_wrong_folder.safetensors is a LoRA (it belongs in models/loras"),
    ("vae", "sdxl_vae.safetensors", "sdxl_vae.safetensors is a 4-channel VAE (Stable Diffusion 1.x/2.x/SDXL's), not "
                                    "the 16-channel Flux VAE Z-Image uses: choose ae.safetensors."),
])
def test_a_prompt_naming_a_left_out_text_encoder_or_vae_gets_the_reason_not_value_not_in_list(comfy, name, value,
                                                                                               message):
    """ComfyUI's own list check would only say "value not in list"; the loader refuses the file with the reason
    before anything loads, and the server goes on."""
    graph = api_prompt(seed=19)
    graph["1"]["inputs"][name] = value
    res = comfy.client.run(graph, timeout=300)
    assert res.status == "error" and res.error["node_type"] == "ZImageTurboLoader"
    assert message in res.error["exception_message"]
    assert "left out of the loader's" in res.error["exception_message"]
    shown = json.dumps({k: res.error.get(k) for k in ("exception_message", "current_inputs", "current_outputs")})
    assert str(comfy.base_dir) not in shown and "/tmp/" not in shown
    ok(comfy, api_prompt(seed=20))


def test_a_lora_linked_from_another_disk_is_used(comfy):
    linked = ok(comfy, api_prompt(seed=16, loras=[{"lora": "linked_style.safetensors", "strength": 0.8, "on": True}]))
    direct = ok(comfy, api_prompt(seed=16, loras=[{"lora": "tiny_kohya_fused.safetensors", "strength": 0.8, "on": True}]))
    assert np.array_equal(image_of(comfy, linked), image_of(comfy, direct))


def test_comfy_cli_runs_the_prompt(comfy, tmp_path):
    wf = tmp_path / "api_workflow.json"
    wf.write_text(json.dumps(api_prompt(seed=31)))
    comfy_cli = Path(sys.executable).with_name("comfy")
    out = subprocess.run([str(comfy_cli), "--skip-prompt", "run", "--workflow", str(wf), "--wait",
                          "--host", "127.0.0.1", "--port", str(comfy.port)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    envelope = json.loads(out.stdout.strip().splitlines()[-1])
    assert envelope["ok"] is True and envelope["data"]["status"] == "completed"
    assert any("e2e_" in url for url in envelope["data"]["outputs"])


def test_unload_models_releases_the_pipeline(comfy):
    ok(comfy, api_prompt(seed=41))
    loaded = comfy.client.get("/zimage_turbo/status")[1]["pipelines"]
    assert any(p["device"] == "cpu" and p["weight_bytes"] > 0 for p in loaded)
    # ComfyUI applies /free between prompts, and its worker can miss the wake-up (then it sleeps until the
    # next prompt): post it again until the pipelines are gone.
    deadline = time.time() + 30
    while time.time() < deadline:
        status, _ = comfy.client.post("/free", {"unload_models": True, "free_memory": True})
        assert status == 200
        time.sleep(0.5)
        if not comfy.client.get("/zimage_turbo/status")[1]["pipelines"]:
            break
    assert comfy.client.get("/zimage_turbo/status")[1]["pipelines"] == []
    again = ok(comfy, api_prompt(seed=42))
    assert probe_of(again)["base_reloaded"] is True
    assert "ComfyUI unloaded models; releasing the pipeline" in comfy.log_text()


def test_own_free_route_releases_pipelines_on_every_device(comfy):
    ok(comfy, api_prompt(seed=45))
    assert comfy.client.get("/zimage_turbo/status")[1]["pipelines"]
    status, body = comfy.client.post("/zimage_turbo/free", {})
    assert status == 200 and body["pipelines"] == []
    assert probe_of(ok(comfy, api_prompt(seed=46)))["base_reloaded"] is True


def test_cancel_stops_between_steps_and_the_server_goes_on(comfy):
    import websocket

    graph = api_prompt(seed=51, width=256, height=256, steps=200)
    ws = websocket.create_connection(f"{comfy.client.ws_url}?clientId=cancel-test", timeout=120)
    try:
        status, body = comfy.client.queue(graph, "cancel-test")
        assert status == 200
        kinds, value = [], 0
        while True:
            msg = ws.recv()
            if isinstance(msg, bytes):
                continue
            msg = json.loads(msg)
            kinds.append(msg["type"])
            if msg["type"] == "progress" and msg["data"]["value"] == 2:
                comfy.client.post("/interrupt", {})
            if msg["type"] == "progress":
                value = msg["data"]["value"]
            if msg["type"] in ("execution_interrupted", "execution_success", "execution_error"):
                break
    finally:
        ws.close()
    assert kinds[-1] == "execution_interrupted"
    assert value < 200
    ok(comfy, api_prompt(seed=52))


def test_each_probe_reports_its_own_sampler_with_two_samplers_on_one_loader(comfy):
    graph = api_prompt(seed=61, width=64, height=48)
    graph["6"] = {"class_type": "ZImageTurboSampler", "inputs": dict(graph["3"]["inputs"], seed=62, width=80)}
    graph["7"] = {"class_type": "ZImageTurboProbe", "inputs": {"images": ["6", 0], "report": ["6", 2]}}
    graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "e2e_b"}}
    res = ok(comfy, graph)
    a, b = res.outputs()["4"]["zimage_probe"][0], res.outputs()["7"]["zimage_probe"][0]
    assert (a["seed"], a["width"]) == (61, 64) and (b["seed"], b["width"]) == (62, 80)
    assert image_of(comfy, res, "5").shape == (48, 64, 3) and image_of(comfy, res, "8").shape == (48, 80, 3)


def test_two_loaders_of_the_same_files_keep_their_own_settings(comfy):
    graph = api_prompt(seed=63, memory="resident")
    graph["11"] = {"class_type": "ZImageTurboLoader", "inputs": dict(graph["1"]["inputs"], memory="low_vram")}
    graph["12"] = {"class_type": "ZImageTurboSampler", "inputs": dict(graph["3"]["inputs"], pipe=["11", 0], seed=64)}
    graph["13"] = {"class_type": "ZImageTurboProbe", "inputs": {"images": ["12", 0], "report": ["12", 2]}}
    graph["14"] = {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "e2e_c"}}
    res = ok(comfy, graph)
    assert res.outputs()["4"]["zimage_probe"][0]["memory_mode"] == "resident"
    assert res.outputs()["13"]["zimage_probe"][0]["memory_mode"] == "low_vram"


def test_a_probe_saved_before_the_report_output_still_works(comfy):
    graph = api_prompt(seed=65, width=96, height=48)
    graph["4"]["inputs"] = {"pipe": ["1", 0], "images": ["3", 0]}  # as saved before the report link existed
    res = ok(comfy, graph)
    probe = probe_of(res)
    assert probe["width"] == 96 and probe["seed"] == 65
    assert res.outputs()["4"]["text"][0].startswith("(last generation on this pipeline")
