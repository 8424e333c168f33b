"""Which files the loader's lists leave out: recognisably other models, told from the header alone, cached."""

import os
import time

import pytest
import torch
from safetensors.torch import save_file

from zimage_turbo.engine.files import check
from zimage_turbo.engine.files.check import foreign_to_slot


def write(path, shapes: dict) -> str:
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))
    return str(path)


@pytest.fixture()
def foreign(tmp_path):
    return {
        "flux": write(tmp_path / "flux1-dev.safetensors", {"double_blocks.0.img_attn.qkv.weight": (8, 4)}),
        "clip": write(tmp_path / "clip_l.safetensors",
                      {"text_model.encoder.layers.0.self_attn.q_proj.weight": (4, 4)}),
        "t5": write(tmp_path / "t5xxl.safetensors", {"encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4)}),
        "sdxl_vae": write(tmp_path / "sdxl_vae.safetensors",
                          {"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_in.weight": (8, 4, 3, 3)}),
        "unknown": write(tmp_path / "mystery.safetensors", {"foo.bar": (2,)}),
    }


@pytest.fixture(autouse=True)
def empty_cache():
    check._SLOT_CACHE.clear()
    yield
    check._SLOT_CACHE.clear()


def test_the_tiny_models_parts_are_listed_in_their_own_slot(tiny):
    built = tiny["built"]
    assert foreign_to_slot(built.transformer_file, "transformer") is None
    assert foreign_to_slot(built.text_encoder_file, "text_encoder") is None
    assert foreign_to_slot(built.vae_file, "vae") is None


def test_parts_in_the_wrong_slot_and_loras_are_left_out_with_the_reason(tiny):
    built = tiny["built"]
    lora = tiny["loras"]["diffusers"][0]
    assert "is a VAE, not a Z-Image diffusion model" in foreign_to_slot(built.vae_file, "transformer")
    assert "is a Z-Image diffusion model, not a Z-Image VAE" in foreign_to_slot(built.transformer_file, "vae")
    assert "is a text encoder, not a Z-Image VAE" in foreign_to_slot(built.text_encoder_file, "vae")
    for slot in check.SLOTS:
        assert "a LoRA (it belongs in models/loras)" in foreign_to_slot(lora, slot)


def test_other_model_families_are_left_out(foreign):
    assert "Flux diffusion model" in foreign_to_slot(foreign["flux"], "transformer")
    assert "CLIP or T5" in foreign_to_slot(foreign["clip"], "text_encoder")
    assert "CLIP or T5" in foreign_to_slot(foreign["t5"], "text_encoder")
    why = foreign_to_slot(foreign["sdxl_vae"], "vae")
    assert "4-channel VAE" in why and "16-channel" in why
    # Names only the file, never where it is on the server (messages reach API clients).
    assert os.sep not in why.split(" is ")[0]


def test_files_that_cannot_be_told_stay_listed(foreign, tmp_path):
    """Unknown, corrupt, pickle and missing files are listed: choosing one gets the loader's exact refusal."""
    corrupt = tmp_path / "cut.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    pickled = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(1)}, pickled)
    for path in (foreign["unknown"], corrupt, pickled, tmp_path / "missing.safetensors"):
        for slot in check.SLOTS:
            assert foreign_to_slot(path, slot) is None


def test_the_header_is_read_once_per_file_version(foreign, monkeypatch):
    reads = []
    real = check.list_tensors
    monkeypatch.setattr(check, "list_tensors", lambda p: reads.append(p) or real(p))
    first = foreign_to_slot(foreign["flux"], "transformer")
    assert foreign_to_slot(foreign["flux"], "transformer") == first
    assert len(reads) == 1
    # A file replaced under the same name (new size / mtime) is read again.
    write(foreign["flux"], {"double_blocks.0.img_attn.qkv.weight": (16, 4)})
    os.utime(foreign["flux"], ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    foreign_to_slot(foreign["flux"], "transformer")
    assert len(reads) == 2


def test_an_unknown_slot_is_a_programming_error(foreign):
    with pytest.raises(ValueError):
        foreign_to_slot(foreign["flux"], "lora")
