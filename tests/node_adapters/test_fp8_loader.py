"""The loader's "fp8 (fast)" choice through the nodes and the preload: offered, and refused on a CPU saying why."""

from __future__ import annotations

import shutil

import pytest

from model_names import TEXT_ENCODER, VAE


def place(pack, tiny) -> str:
    folder = tiny["built"].diffusers_dir
    shutil.copytree(folder, pack.models / "diffusers" / folder.name)
    return f"[diffusers] {folder.name}"


def test_the_loader_offers_fp8_and_refuses_it_on_a_cpu_before_loading(pack, tiny):
    loader = pack.NODE_CLASS_MAPPINGS["ZImageTurboLoader"]
    choices, options = loader.INPUT_TYPES()["required"]["dtype"]
    assert choices == ["auto", "bf16", "fp16", "fp32", "fp8 (fast)"] and options["default"] == "auto"
    assert "fp8 tensor cores" in options["tooltip"]
    model = place(pack, tiny)
    api = pack.zimage_turbo.engine.api
    with pytest.raises(api.Fp8UnsupportedError) as info:
        loader().load(model, TEXT_ENCODER, VAE, "fp8 (fast)", "cpu", "resident", "off")
    msg = str(info.value)
    assert "fp8 (fast) needs an NVIDIA GPU with fp8 tensor cores" in msg and "the CPU" in msg
    assert "Choose dtype bf16 (or auto) in the Turbo Loader" in msg
    assert isinstance(info.value, api.ZImageError)  # ComfyUI shows it as the node's error, not a crash
    assert str(pack.models) not in msg and api.loaded() == []
    # The same loader in bf16 runs.
    (handle,) = loader().load(model, TEXT_ENCODER, VAE, "bf16", "cpu", "resident", "off")
    assert "bfloat16" in repr(handle) and handle.fp8 is None


def test_a_preload_of_fp8_is_accepted_as_config_and_refused_on_a_cpu(pack, tiny):
    pre = pack.zimage_turbo.nodes.preload
    assert pre.parse_config({"dtype": "fp8 (fast)", "device": "cpu"})[0]["dtype"] == "fp8 (fast)"
    model = place(pack, tiny)
    api = pack.zimage_turbo.engine.api
    settings = dict(pre.parse_config({"model": model, "dtype": "fp8 (fast)", "device": "cpu", "compile": "off"})[0])
    with pytest.raises(api.Fp8UnsupportedError, match="the CPU"):
        pre.load_pipeline(settings)
    assert api.loaded() == []


def test_a_handle_in_fp8_names_it_and_finds_only_an_fp8_pipeline(pack):
    api = pack.zimage_turbo.engine.api
    handle_mod = pack.zimage_turbo.nodes.pipe_handle
    import torch

    policy = api.Fp8Policy()
    handle = handle_mod.PipeHandle(api.DiffusersFolder(pack.models / "diffusers" / "x"), torch.device("cuda:0"),
                                   torch.bfloat16, "resident", "auto", policy)
    assert "fp8 (fast)" in repr(handle) and "/" not in repr(handle).split("(", 1)[1].split(",")[0]
    assert handle.peek() is None  # never loads
