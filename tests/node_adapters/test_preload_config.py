"""The start-up preload (nodes/preload.py) without a server: config, validation, states, and the loader picking it up."""

from __future__ import annotations

import json
import threading
import time

import pytest
from model_names import MODEL, TEXT_ENCODER, VAE

DEFAULTS = {"model": MODEL, "text_encoder": TEXT_ENCODER, "vae": VAE, "dtype": "auto", "device": "auto",
            "memory": "resident", "compile": "auto"}


@pytest.fixture()
def pre(pack):
    return pack.zimage_turbo.nodes.preload


# ------------------------------------------------------------------ config


def test_missing_keys_take_the_loaders_own_defaults(pre):
    assert pre.loader_defaults() == DEFAULTS
    assert pre.parse_config({}) == [DEFAULTS]
    assert pre.parse_config([{"dtype": "fp32"}, {"model": "[diffusers] zit", "device": "cpu"}, {"dtype": "fp32"}]) == [
        dict(DEFAULTS, dtype="fp32"), dict(DEFAULTS, model="[diffusers] zit", device="cpu")]  # a repeat is loaded once
    assert pre.parse_config([]) == []


@pytest.mark.parametrize("config,message", [
    ({"modle": MODEL}, "preload config: unknown key(s) 'modle': use model, text_encoder, vae, dtype, device, memory"),
    ([{}, {"lora": "x"}], "preload entry 2: unknown key(s) 'lora'"),
    ({"dtype": 16}, "'dtype' must be a string, not a number"),
    ({"model": None}, "'model' must be a string, not null"),
    ({"compile": True}, "'compile' must be a string, not a boolean"),
    ({"dtype": "fp8"}, "dtype 'fp8' is not one of auto, bf16, fp16, fp32"),
    ({"memory": "offload"}, "memory 'offload' is not one of resident, offload_text_encoder, low_vram"),
    ({"compile": "yes"}, "compile 'yes' is not one of auto, on, off"),
    ({"device": "gpu0"}, "device 'gpu0': use auto, cpu or cuda:N"),
    ({"vae": ""}, "vae is empty: name a file in ComfyUI's models/vae folder"),
    ({"model": "/srv/secret/models/z.safetensors"}, "model must name a file relative to ComfyUI's models/diffusion_models"),
    ({"text_encoder": "../../etc/passwd"}, "text_encoder must name a file relative to ComfyUI's models/text_encoders"),
    ({"vae": "C:\\models\\ae.safetensors"}, "vae must name a file relative to ComfyUI's models/vae"),
    ({"model": "[diffusers] /srv/secret"}, "model must name a file relative to ComfyUI's models/diffusers"),
    (42, "must be a JSON object (one pipeline) or a list of objects, not a number"),
    (["z_image_turbo_bf16.safetensors"], "preload entry 1 must be a JSON object with the loader's inputs, not a string"),
])
def test_a_config_that_is_not_the_schema_is_refused_naming_the_entry_and_key(pre, config, message):
    with pytest.raises(pre.PreloadConfigError) as err:
        pre.parse_config(config)
    assert message in str(err.value)
    assert "/srv/secret" not in str(err.value) and "C:\\" not in str(err.value)  # the value itself is not echoed


def test_config_comes_from_the_env_var_inline_or_as_a_file_else_from_the_user_folder(pre, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    assert pre.read_config({}, str(user)) is None and not pre.config_present({}, str(user))
    (user / pre.USER_FILE).write_text(json.dumps({"dtype": "fp16"}))
    assert pre.read_config({}, str(user)) == ("zimage_turbo_preload.json in ComfyUI's user folder", {"dtype": "fp16"})
    assert pre.read_config({pre.ENV_VAR: "  "}, str(user))[1] == {"dtype": "fp16"}  # empty: as if unset
    inline = pre.read_config({pre.ENV_VAR: ' [{"dtype": "bf16"}]'}, str(user))
    assert inline == ("ZIMAGE_TURBO_PRELOAD (inline JSON)", [{"dtype": "bf16"}])  # the env var wins
    conf = tmp_path / "preload.json"
    conf.write_text('\ufeff{"memory": "low_vram"}')  # a BOM from a Windows editor is fine
    assert pre.read_config({pre.ENV_VAR: str(conf)}, None) == ("the file named by ZIMAGE_TURBO_PRELOAD",
                                                               {"memory": "low_vram"})
    assert pre.config_present({pre.ENV_VAR: str(conf)}, None)


@pytest.mark.parametrize("text,message", [
    ("{'dtype': 'fp32'}", "is not valid JSON: Expecting property name enclosed in double quotes (line 1, column 2)"),
    ('{"dtype": "fp32", "dtype": "bf16"}', "the key 'dtype' appears twice in one object"),
])
def test_a_config_that_is_not_json_is_refused_with_where_and_why(pre, tmp_path, text, message):
    conf = tmp_path / "secret_dir" / "preload.json"
    conf.parent.mkdir()
    conf.write_text(text)
    with pytest.raises(pre.PreloadConfigError) as err:
        pre.read_config({pre.ENV_VAR: str(conf)}, None)
    assert str(err.value).startswith("the file named by ZIMAGE_TURBO_PRELOAD") and message in str(err.value)
    assert "secret_dir" not in str(err.value)


def test_an_unreadable_config_file_is_named_without_its_path(pre, tmp_path):
    with pytest.raises(pre.PreloadConfigError) as err:
        pre.read_config({pre.ENV_VAR: str(tmp_path / "nope.json")}, None)
    assert str(err.value) == "the file named by ZIMAGE_TURBO_PRELOAD cannot be read (No such file or directory)."


def test_client_messages_cut_absolute_paths_to_file_names(pre):
    msg = pre.client_message(RuntimeError("cannot open /home/me/ComfyUI/models/vae/ae.safetensors: broken, "
                                          "see C:\\Users\\me\\x.log"))
    assert msg == "RuntimeError: cannot open ae.safetensors: broken, see x.log"
    assert pre.client_message(pre.ZImageError("ae.safetensors: truncated")) == "ae.safetensors: truncated"
    kept = "models/vae/ae.safetensors, see https://example.org/a/b"  # relative names and links stay as they are
    assert pre.client_message(pre.ZImageError(kept)) == kept


# ------------------------------------------------------------------ states


class FakePipe:
    """A pipeline with the warm-up methods of engine.pipeline.TurboPipeline, driven by the test."""

    def __init__(self, states=("pending", "compiling", "compiled"), error=None):
        self.states = list(states)
        self.error = error
        self.started = 0
        self.step = threading.Event()

    def start_warmup(self):
        self.started += 1

    def compile_status(self):
        state = self.states[0]
        return {"state": state, "seconds": None, "error": self.error if state == "failed" else None}

    def wait_warm(self, timeout=None):
        if self.step.wait(timeout):
            self.step.clear()
            if len(self.states) > 1:
                self.states.pop(0)
        return self.states[0] == "compiled"


def preloader(pre, load, loaded=lambda pipe: True):
    """A Preloader of its own, loading with `load`; it holds what it loads, as the engine's cache would
    (the preload itself keeps only a weak reference)."""
    held = []

    def keep(settings):
        pipe = load(settings)
        held.append(pipe)
        return pipe

    p = pre.Preloader(load=keep, is_loaded=loaded, poll_s=0.01)
    p.held = held
    return p


def until(pred, timeout=10):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_without_a_config_the_preload_is_off(pre):
    p = preloader(pre, load=lambda s: pytest.fail("nothing may load"))
    assert p.status() == {"state": "off", "error": None, "seconds": None, "config": None, "pipelines": []}
    p.start_from_config({}, "", wait=True)
    assert p.wait(5) and p.status()["state"] == "off"


def test_loading_then_warming_then_ready_and_request_returns_at_once(pre):
    gate = threading.Event()
    pipe = FakePipe()

    def load(settings):
        gate.wait(10)
        return pipe

    p = preloader(pre, load)
    t0 = time.monotonic()
    p.request([DEFAULTS], "test")
    assert time.monotonic() - t0 < 0.5  # loading happens in the background
    st = p.status()
    assert st["state"] == "loading" and st["config"] == "test" and st["pipelines"][0]["settings"] == DEFAULTS
    gate.set()
    until(lambda: p.status()["state"] == "warming")
    row = p.status()["pipelines"][0]
    assert pipe.started == 1 and row["compile_status"]["state"] == "pending" and row["load_s"] is not None
    pipe.step.set()
    until(lambda: p.status()["pipelines"][0]["compile_status"]["state"] == "compiling")
    assert p.status()["state"] == "warming"
    pipe.step.set()
    assert p.wait(10)
    st = p.status()
    assert st["state"] == "ready" and st["error"] is None and st["seconds"] >= 0
    assert st["pipelines"][0]["compile_status"]["state"] == "compiled" and st["pipelines"][0]["loaded"]
    assert p.preloaded(pipe) and not p.preloaded(FakePipe())


def test_a_throw_away_first_image_runs_once_compiled_and_before_ready(pre):
    """The server's preload makes one image before it says ready (rehearse_first_image says why)."""
    pipe = FakePipe(states=("compiled",))
    gate, seen = threading.Event(), []

    def rehearse(p):
        seen.append(p.compile_status()["state"])
        gate.wait(10)
        return 0.25

    p = preloader(pre, lambda s: pipe)
    p.rehearse = rehearse
    p.request([DEFAULTS], "test")
    until(lambda: seen)
    assert seen == ["compiled"] and p.status()["state"] == "warming"  # not ready while the image is made
    gate.set()
    assert p.wait(10)
    row = p.status()["pipelines"][0]
    assert p.status()["state"] == "ready" and row["first_image_s"] == 0.25 and row["note"] is None


def test_a_failed_throw_away_image_leaves_the_preload_ready_and_says_why(pre):
    def rehearse(p):
        raise RuntimeError("CUDA out of memory while writing /home/someone/ComfyUI/temp/x.bin")

    p = preloader(pre, lambda s: FakePipe(states=("compiled",)))
    p.rehearse = rehearse
    p.request([DEFAULTS], "test")
    assert p.wait(10)
    row = p.status()["pipelines"][0]
    assert p.status()["state"] == "ready" and row["first_image_s"] is None
    assert row["note"].startswith("the throw-away first image failed: RuntimeError: CUDA out of memory")
    assert "/home/someone" not in row["note"]


def test_the_throw_away_image_is_a_real_generation_on_the_gpu_only(pre, tiny):
    import torch

    api = pre.api
    pipe = api.load(api.DiffusersFolder(tiny["built"].diffusers_dir), torch.device("cpu"), torch.float32, "resident",
                    "off")
    assert pre.rehearse_first_image(pipe) is None  # a CPU: nothing to warm, no image made
    assert pre.REHEARSAL_PROMPT not in pipe.testate.embeddings
    seconds = pre.rehearse_first_image(pipe, side=64, devices=("cpu",))  # as on a GPU
    assert seconds > 0 and pre.REHEARSAL_PROMPT in pipe.testate.embeddings
    report = pipe.generate(api.GenerationRequest("a cat", width=64, height=64, seed=3)).report
    assert report.load_s == {} and not report.base_reloaded  # the first user image loads nothing
    api.release_all()


def test_compile_off_is_ready_and_a_failed_compile_is_failed_but_loaded(pre):
    p = preloader(pre, lambda s: FakePipe(states=("off",)) if s["compile"] == "off" else
                  FakePipe(states=("failed",), error="inductor crashed"))
    p.request([dict(DEFAULTS, compile="off"), dict(DEFAULTS, compile="on")], "test")
    assert p.wait(10)
    st = p.status()
    assert [r["state"] for r in st["pipelines"]] == ["ready", "failed"] and st["state"] == "failed"
    assert st["pipelines"][1]["error"] == "loaded, but compiling failed: inductor crashed"
    assert st["pipelines"][1]["loaded"]


def test_a_load_that_fails_is_failed_with_a_message_free_of_server_paths(pre):
    def load(settings):
        if settings["model"] == "gone.safetensors":
            raise pre.ZImageError("gone.safetensors was not found in models/diffusion_models (1 folder searched).")
        raise OSError("[Errno 5] Input/output error: '/mnt/private/models/vae/ae.safetensors'")

    p = preloader(pre, load)
    p.request([dict(DEFAULTS, model="gone.safetensors"), DEFAULTS], "test")
    assert p.wait(10)
    st = p.status()
    assert st["state"] == "failed"
    assert [r["error"] for r in st["pipelines"]] == [
        "gone.safetensors was not found in models/diffusion_models (1 folder searched).",
        "OSError: [Errno 5] Input/output error: 'ae.safetensors'"]
    assert st["error"].startswith("gone.safetensors: gone.safetensors was not found") and "/mnt" not in json.dumps(st)


def test_a_config_error_is_failed_and_a_later_good_request_replaces_it(pre, tmp_path):
    p = preloader(pre, lambda s: FakePipe(states=("off",)))
    p.start_from_config({pre.ENV_VAR: '{"modle": "x.safetensors"}'}, None, wait=True)
    st = p.status()
    assert st["state"] == "failed" and st["config"] == "ZIMAGE_TURBO_PRELOAD (inline JSON)"
    assert "unknown key(s) 'modle'" in st["error"] and st["pipelines"] == []
    p.request([DEFAULTS], "POST /zimage_turbo/preload")
    assert p.wait(10) and p.status()["state"] == "ready" and p.status()["error"] is None


def test_a_failed_entry_is_dropped_when_the_next_request_does_not_ask_for_it_again(pre):
    def load(settings):
        if settings["dtype"] == "fp16":
            raise pre.ZImageError("nope")
        return FakePipe(states=("off",))

    p = preloader(pre, load)
    p.request([dict(DEFAULTS, dtype="fp16"), DEFAULTS], "first")
    assert p.wait(10) and p.status()["state"] == "failed"
    p.request([dict(DEFAULTS, dtype="fp32")], "second")
    assert p.wait(10)
    assert [r["settings"]["dtype"] for r in p.status()["pipelines"]] == ["auto", "fp32"]  # the ready one stays
    assert p.status()["state"] == "ready"


def test_a_released_pipeline_shows_off_and_a_new_request_loads_it_again(pre):
    loaded = {"yes": True}
    loads = []
    p = preloader(pre, lambda s: loads.append(s) or FakePipe(states=("off",)), loaded=lambda pipe: loaded["yes"])
    p.request([DEFAULTS], "test")
    assert p.wait(10) and p.status()["state"] == "ready"
    loaded["yes"] = False  # POST /free, Unload models
    st = p.status()
    assert st["state"] == "off" and st["pipelines"][0]["state"] == "off" and not st["pipelines"][0]["loaded"]
    loaded["yes"] = True
    p.request([DEFAULTS], "again")
    assert p.wait(10) and p.status()["state"] == "ready" and len(loads) == 2 and len(p.status()["pipelines"]) == 1


def test_a_pipeline_released_while_warming_stops_the_warm_up(pre):
    loaded = {"yes": True}
    pipe = FakePipe(states=("compiling",))
    p = preloader(pre, lambda s: pipe, loaded=lambda x: loaded["yes"])
    p.request([DEFAULTS], "test")
    until(lambda: p.status()["state"] == "warming")
    loaded["yes"] = False
    assert p.wait(10) and p.status()["pipelines"][0]["state"] == "off"


def test_the_same_settings_asked_again_while_loading_are_not_queued_twice(pre):
    gate = threading.Event()
    loads = []

    def load(settings):
        loads.append(settings)
        gate.wait(10)
        return FakePipe(states=("off",))

    p = preloader(pre, load)
    p.request([DEFAULTS], "a")
    until(lambda: loads)
    p.request([DEFAULTS], "b")
    gate.set()
    assert p.wait(10) and len(loads) == 1 and p.status()["state"] == "ready"


def test_a_bug_in_the_loader_fails_the_entry_and_the_worker_goes_on(pre):
    def load(settings):
        if settings["dtype"] == "fp16":
            raise KeyError("oops")
        return FakePipe(states=("off",))

    p = preloader(pre, load)
    p.request([dict(DEFAULTS, dtype="fp16"), DEFAULTS], "test")
    assert p.wait(10)
    assert [r["state"] for r in p.status()["pipelines"]] == ["failed", "ready"]
    assert p.status()["pipelines"][0]["error"] == "KeyError: 'oops'"


def test_start_with_server_does_nothing_without_a_comfy_server(pre, monkeypatch):
    monkeypatch.setenv(pre.ENV_VAR, "{}")
    pre.start_with_server()  # no `server` module here: nothing starts, nothing raises
    assert pre.PRELOADER.status()["state"] == "off"


# ------------------------------------------------- the real engine, tiny model


def place(pack, tiny) -> str:
    """The tiny model as a diffusers folder (the split files need ComfyUI's tokenizer, which the stand-ins lack)."""
    import shutil

    folder = tiny["built"].diffusers_dir
    shutil.copytree(folder, pack.models / "diffusers" / folder.name)
    return f"[diffusers] {folder.name}"


def test_a_loader_with_the_same_settings_picks_up_the_preloaded_pipeline(pack, pre, tiny, monkeypatch):
    model = place(pack, tiny)
    monkeypatch.setenv(pre.ENV_VAR, json.dumps({"model": model, "dtype": "fp32", "compile": "off"}))
    code, _ = pre.request_from_body(b"")  # an empty body: the configured preload
    assert code == 202
    assert pre.PRELOADER.wait(60)
    routes = pack.zimage_turbo.nodes.routes
    st = routes.status()
    assert st["preload"]["state"] == "ready", st["preload"]
    assert st["preload"]["config"] == "ZIMAGE_TURBO_PRELOAD (inline JSON)"
    assert len(st["pipelines"]) == 1 and st["pipelines"][0]["preloaded"] is True
    nodes = pack.NODE_CLASS_MAPPINGS
    (handle,) = nodes["ZImageTurboLoader"]().load(model, TEXT_ENCODER, VAE, "fp32", "auto", "resident", "off")
    assert handle.get() is pre.PRELOADER.entries[0].pipe()
    _, _, report = nodes["ZImageTurboSampler"]().sample(handle, prompt="a cat", negative_prompt="", width=32,
                                                        height=32, steps=2, cfg=0.0, shift=3.0, seed=1, batch_size=1)
    assert report.load_s == {} and not report.base_reloaded  # the preload paid for the load, not this generation
    assert len(routes.status()["pipelines"]) == 1
    routes.free_all()
    assert routes.status()["preload"]["state"] == "off"  # released: no longer preloaded


def test_a_missing_file_fails_the_preload_naming_it_relative_to_its_folder(pack, pre, tiny):
    place(pack, tiny)
    (pack.models / "diffusion_models" / MODEL).write_bytes(b"")  # present; never read: the VAE is looked up first
    (pack.models / "text_encoders" / TEXT_ENCODER).write_bytes(b"")
    code, _ = pre.request_from_body(json.dumps({"vae": "missing_vae.safetensors"}).encode())
    assert code == 202
    assert pre.PRELOADER.wait(60)
    st = pack.zimage_turbo.nodes.routes.status()
    assert st["preload"]["state"] == "failed"
    assert "missing_vae.safetensors was not found in models/vae" in st["preload"]["error"]
    assert str(pack.models) not in json.dumps(st)
    assert st["pipelines"] == []


@pytest.mark.parametrize("body,message", [
    (b"{", "the request body is not valid JSON"),
    (b'{"steps": 8}', "unknown key(s) 'steps'"),
    (b"", "nothing to preload: send the loader's settings as JSON"),
    (b"[]", "the list is empty"),
])
def test_post_preload_refuses_a_bad_body_with_400_and_changes_nothing(pre, body, message, monkeypatch):
    monkeypatch.delenv(pre.ENV_VAR, raising=False)
    code, answer = pre.request_from_body(body)
    assert code == 400 and message in answer["error"]
    assert answer["preload"]["state"] == "off"
