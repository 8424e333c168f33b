"""The loader's file lists: Z-Image parts first, files that cannot be told after, other models left out; and a
prompt naming a left-out file gets the reason (see comfy_paths.FOLDER_SLOTS)."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from model_names import MODEL, TEXT_ENCODER, VAE


@pytest.fixture()
def folders(pack, tiny):
    """The tiny parts under their real names, beside other models' files, as users' shared folders hold them."""
    models, built = pack.models, tiny["built"]
    shutil.copy(built.transformer_file, models / "diffusion_models" / MODEL)
    shutil.copy(built.text_encoder_file, models / "text_encoders" / TEXT_ENCODER)
    shutil.copy(built.vae_file, models / "vae" / VAE)
    shutil.copytree(built.diffusers_dir, models / "diffusers" / built.diffusers_dir.name)
    (models / "diffusion_models" / "flux").mkdir()
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)},
              str(models / "diffusion_models" / "flux" / "flux1-dev.safetensors"))
    shutil.copy(tiny["loras"]["diffusers"][0], models / "diffusion_models" / "a_style_lora.safetensors")
    torch.save({"w": torch.zeros(2)}, models / "diffusion_models" / "old_model.ckpt")
    (models / "diffusion_models" / "cut.safetensors").write_bytes(built.transformer_file.read_bytes()[:-100])
    save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)},
              str(models / "text_encoders" / "clip_l.safetensors"))
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)},
              str(models / "vae" / "sdxl_vae.safetensors"))
    save_file({"foo.bar": torch.zeros(2)}, str(models / "vae" / "mystery.safetensors"))
    return pack


def loader(pack):
    return pack.NODE_CLASS_MAPPINGS["ZImageTurboLoader"]


def lists(pack) -> dict:
    required = loader(pack).INPUT_TYPES()["required"]
    return {name: required[name][0] for name in ("model", "text_encoder", "vae")}


def test_parts_come_first_then_files_that_cannot_be_told_and_other_models_are_left_out(folders):
    shown = lists(folders)
    assert shown["model"] == [MODEL, "[diffusers] zit_tiny", "cut.safetensors", "old_model.ckpt"]
    assert shown["text_encoder"] == [TEXT_ENCODER]
    assert shown["vae"] == [VAE, "mystery.safetensors"]
    # What /object_info sends: the shown names only, as plain JSON lists.
    assert json.loads(json.dumps(shown)) == {k: list(v) for k, v in shown.items()}


def test_a_folder_of_other_models_only_shows_none_found(pack):
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)},
              str(pack.models / "vae" / "sdxl_vae.safetensors"))
    vae = lists(pack)["vae"]
    assert list(vae) == ["(none found)"] and "sdxl_vae.safetensors" in vae


def test_comfyuis_list_check_accepts_a_left_out_text_encoder_or_vae(folders):
    """ComfyUI 0.3.75 refuses a combo value with `val not in combo_options`: a left-out file passes it, so the loader
    can say what is wrong with it; a name that is not there at all still fails it."""
    shown = lists(folders)
    assert "sdxl_vae.safetensors" in shown["vae"] and "clip_l.safetensors" in shown["text_encoder"]
    assert "no_such_vae.safetensors" not in shown["vae"]
    assert {"__value__": "x"} not in shown["vae"]  # whatever a prompt sends, the check never raises


def test_a_left_out_model_is_refused_when_queued_with_the_reason(folders):
    message = loader(folders).VALIDATE_INPUTS(model="flux/flux1-dev.safetensors")
    assert message.startswith("flux/flux1-dev.safetensors is a Flux diffusion model, not a Z-Image diffusion model: "
                              "choose a Z-Image-Turbo diffusion model (z_image_turbo_bf16.safetensors).")
    assert "left out of the loader's diffusion models list" in message and "python -m zimage_turbo check" in message
    assert str(folders.models) not in message
    assert "a LoRA (it belongs in models/loras" in loader(folders).VALIDATE_INPUTS(model="a_style_lora.safetensors")
    for listed in (MODEL, "cut.safetensors", "old_model.ckpt", "[diffusers] zit_tiny"):
        assert loader(folders).VALIDATE_INPUTS(model=listed) is True  # cannot-tell files: the loader says why


@pytest.mark.parametrize("text_encoder,vae,message", [
    ("clip_l.safetensors", VAE, "clip_l.safetensors is a CLIP text encoder, not the Qwen3-4B text encoder Z-Image uses: "
                                "choose qwen_3_4b.safetensors"),
    (TEXT_ENCODER, "sdxl_vae.safetensors", "sdxl_vae.safetensors is a 4-channel VAE (Stable Diffusion 1.x/2.x/SDXL's), "
                                           "not the 16-channel Flux VAE Z-Image uses: choose ae.safetensors."),
])
def test_a_left_out_text_encoder_or_vae_is_refused_by_the_loader_before_anything_loads(folders, text_encoder, vae,
                                                                                        message):
    nodes = importlib.import_module(folders.__name__ + ".zimage_turbo.nodes.loader_node")
    api = importlib.import_module(folders.__name__ + ".zimage_turbo.engine.api")
    with pytest.raises(api.ModelFileError) as err:
        nodes.resolve(MODEL, text_encoder, vae, "fp32", "cpu")
    assert str(err.value).startswith(message) and str(folders.models) not in str(err.value)
    source, _, _, _ = nodes.resolve(MODEL, TEXT_ENCODER, VAE, "fp32", "cpu")  # the parts themselves resolve
    assert source.vae.name == VAE
