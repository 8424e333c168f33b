"""The start-up preload inside real ComfyUI servers: ready before any prompt, picked up by the loader, failures reported.

Two servers of their own, started side by side (the preload is read once, at start):
- `good`: ZIMAGE_TURBO_PRELOAD names a JSON file with the e2e graph's loader settings;
- `bad`: zimage_turbo_preload.json in ComfyUI's user folder holds a key the loader does not have; it also runs with
  ZIMAGE_TURBO_HEAD_START=0 (no background import of the model classes at the start).
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from devtools.graphs import MODEL, TEXT_ENCODER, VAE
from graphs import api_prompt

SETTINGS = {"model": MODEL, "text_encoder": TEXT_ENCODER, "vae": VAE, "dtype": "fp32"}  # as api_prompt's loader


def place(models, built):
    shutil.copy(built.transformer_file, models / "diffusion_models" / MODEL)
    shutil.copy(built.text_encoder_file, models / "text_encoders" / TEXT_ENCODER)
    shutil.copy(built.vae_file, models / "vae" / VAE)


@pytest.fixture(scope="module")
def servers(tiny, tmp_path_factory):
    from scripts.comfy_client import COMFY_DIR, ComfyServer

    if not (COMFY_DIR / "main.py").is_file():
        pytest.fail(f"ComfyUI is not set up in {COMFY_DIR}: run `make test` (or scripts/setup.sh) first.")
    conf = tmp_path_factory.mktemp("preload_conf") / "preload.json"
    conf.write_text(json.dumps(SETTINGS))
    good = ComfyServer(tmp_path_factory.mktemp("preload_good"), env={"ZIMAGE_TURBO_PRELOAD": str(conf)})
    bad = ComfyServer(tmp_path_factory.mktemp("preload_bad"), env={"ZIMAGE_TURBO_HEAD_START": "0"})
    for server in (good, bad):
        server.prepare()
        place(server.base_dir / "models", tiny["built"])
        shutil.copy(tiny["loras"]["kohya_fused"][0], server.base_dir / "models" / "loras" / "style.safetensors")
    (bad.base_dir / "user" / "zimage_turbo_preload.json").write_text(json.dumps({"modle": MODEL, "dtype": "fp32"}))
    with ThreadPoolExecutor(2) as pool:
        started = [pool.submit(s.start) for s in (good, bad)]
        try:
            for f in started:
                f.result()
        except Exception:
            for s in (good, bad):
                s.stop()
            raise
    yield {"good": good, "bad": bad}
    for s in (good, bad):
        s.stop()


def settled(server, timeout=60) -> dict:
    """The status once the preload is neither loading nor warming."""
    deadline = time.monotonic() + timeout
    while True:
        code, body = server.client.get("/zimage_turbo/status")
        assert code == 200
        if body["preload"]["state"] not in ("loading", "warming"):
            return body
        assert time.monotonic() < deadline, f"preload still {body['preload']}"
        time.sleep(0.1)


def probe_of(result) -> dict:
    return result.outputs()["4"]["zimage_probe"][0]


def test_with_the_env_var_the_pipeline_is_ready_before_any_prompt(servers):
    good = servers["good"]
    st = settled(good)
    pre = st["preload"]
    assert pre["state"] == "ready", pre
    assert pre["error"] is None and pre["config"] == "the file named by ZIMAGE_TURBO_PRELOAD"
    (row,) = pre["pipelines"]
    assert row["settings"] == dict(SETTINGS, device="auto", memory="resident", compile="auto")
    assert row["loaded"] and row["load_s"] >= 0 and row["seconds"] >= row["load_s"]
    (pipe,) = st["pipelines"]
    assert pipe["preloaded"] is True and pipe["dtype"] == "fp32" and pipe["device"] == "cpu"
    assert good.client.get("/history")[1] == {}  # nothing was queued: the preload alone loaded it
    assert "Z-Image Turbo preload: ready in" in good.log_text()


def test_a_loader_with_the_same_settings_runs_without_loading_again(servers):
    good = servers["good"]
    assert settled(good)["preload"]["state"] == "ready"
    res = good.client.run(api_prompt(seed=5), timeout=120)
    assert res.status == "success", (res.error or {}).get("exception_message")
    probe = probe_of(res)
    assert probe["load_s"] == {} and probe["base_reloaded"] is False
    # A LoRA on the preloaded weights (loaded in the preload's thread) works as on the loader's own.
    styled = good.client.run(api_prompt(seed=5, loras=[{"lora": "style.safetensors", "strength": 0.8, "on": True}]),
                             timeout=120)
    assert styled.status == "success", (styled.error or {}).get("exception_message")
    assert probe_of(styled)["load_s"] == {} and len(probe_of(styled)["lora"]) == 1
    st = settled(good)
    assert len(st["pipelines"]) == 1 and st["pipelines"][0]["last_total_s"] is not None


def test_a_bad_config_is_reported_as_failed_and_the_server_still_serves(servers):
    bad = servers["bad"]
    st = settled(bad)
    pre = st["preload"]
    assert pre["state"] == "failed" and pre["pipelines"] == [] and st["pipelines"] == []
    assert pre["config"] == "zimage_turbo_preload.json in ComfyUI's user folder"
    assert "preload config: unknown key(s) 'modle': use model, text_encoder, vae, dtype, device, memory, compile" in (
        pre["error"])
    assert str(bad.base_dir) not in json.dumps(st)
    assert "Z-Image Turbo preload failed: preload config: unknown key(s) 'modle'" in bad.log_text()
    res = bad.client.run(api_prompt(seed=6), timeout=120)
    assert res.status == "success", (res.error or {}).get("exception_message")
    assert probe_of(res)["base_reloaded"] is True  # no preload: this prompt loaded the model


def test_post_preload_answers_at_once_and_loads_in_the_background(servers):
    bad = servers["bad"]
    settled(bad)
    code, body = bad.client.post("/zimage_turbo/preload", {"bogus": 1})
    assert code == 400 and "unknown key(s) 'bogus'" in body["error"]
    code, body = bad.client.post("/zimage_turbo/preload", dict(SETTINGS, vae="no_such_vae.safetensors"))
    assert code == 202 and body["preload"]["state"] in ("loading", "failed")
    st = settled(bad)
    assert st["preload"]["state"] == "failed"
    assert "no_such_vae.safetensors was not found in models/vae" in st["preload"]["error"]
    assert str(bad.base_dir) not in json.dumps(st)
    # The right settings, in bf16 (the test graph's earlier prompt loaded fp32): a new pipeline.
    t0 = time.monotonic()
    code, body = bad.client.post("/zimage_turbo/preload", [dict(SETTINGS, dtype="bf16")])
    assert code == 202 and time.monotonic() - t0 < 5
    assert body["preload"]["config"] == "POST /zimage_turbo/preload"
    st = settled(bad)
    assert st["preload"]["state"] == "ready" and st["preload"]["error"] is None  # the failed entry was replaced
    assert len(st["pipelines"]) == 2 and sorted(p["preloaded"] for p in st["pipelines"]) == [False, True]
    res = bad.client.run(api_prompt(seed=7, dtype="bf16"), timeout=120)
    assert res.status == "success", (res.error or {}).get("exception_message")
    assert probe_of(res)["load_s"] == {}
    # Released by ComfyUI's /free? The preload says so, and POST with an empty body (no env var here: the
    # user-folder config, still bad) is refused naming it.
    code, _ = bad.client.post("/zimage_turbo/free", {})
    assert code == 200
    assert settled(bad)["preload"]["state"] == "off"
    code, body = bad.client.post("/zimage_turbo/preload", None)
    assert code == 400 and "unknown key(s) 'modle'" in body["error"]


def test_the_head_start_can_be_turned_off(servers):
    """ZIMAGE_TURBO_HEAD_START=0: the server does not import the model classes after its start (for servers that
    never run a Z-Image graph); a loader still imports them when it runs (test above: the bad server serves)."""
    bad, good = servers["bad"].log_text(), servers["good"].log_text()
    assert "ZIMAGE_TURBO_HEAD_START is off: the model classes are imported at the first load" in bad
    before_any_prompt = bad.split("got prompt")[0]
    assert "head start model_classes done" not in before_any_prompt
    assert "ZIMAGE_TURBO_HEAD_START is off" not in good
    deadline = time.monotonic() + 120  # the good server's head start (and its preload) import them at the start
    while "head start model_classes done" not in servers["good"].log_text():
        assert time.monotonic() < deadline
        time.sleep(0.2)
