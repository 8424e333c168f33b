"""Shared fixtures: the tiny model (real classes, random weights) built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent

from devtools import model_builder
from devtools.model_builder import LORA_FORMATS, TINY

torch.set_num_threads(2)


def pytest_collection_modifyitems(items):
    for item in items:
        for folder in ("e2e", "browser"):
            if f"/{folder}/" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny Z-Image model in both layouts, plus one LoRA per key format and a foreign one."""
    root = tmp_path_factory.mktemp("tiny")
    built = model_builder.build_random_model(root, "zit_tiny", TINY, seed=0)
    loras = {}
    for i, fmt in enumerate(LORA_FORMATS):
        path = root / "loras" / f"tiny_{fmt}.safetensors"
        loras[fmt] = (path, model_builder.build_random_lora(path, TINY.transformer, fmt, rank=4, alpha=2.0, seed=10 + i))
    foreign = root / "loras" / "sdxl_style.safetensors"
    model_builder.build_foreign_lora(foreign)
    return {"root": root, "built": built, "loras": loras, "foreign_lora": foreign}


@pytest.fixture()
def fresh_engine():
    """Each test that needs it starts with empty engine caches (and leaves them empty)."""
    from zimage_turbo.engine.sampling import pipeline

    pipeline.release_all()
    yield
    pipeline.release_all()


@pytest.fixture(scope="session")
def comfy(tiny, tmp_path_factory):
    """A real ComfyUI 0.3.75 server on 127.0.0.1 (--cpu) with this package in custom_nodes.

    Its model folders hold the tiny model under the real file names, the tiny LoRAs (also
    under the style LoRA names), and a few bad files for the error paths.
    """
    from devtools import install_tiny_models
    from scripts.comfy_client import COMFY_DIR, ComfyServer

    if not (COMFY_DIR / "main.py").is_file():
        pytest.fail(f"ComfyUI is not set up in {COMFY_DIR}: run `make test` (or scripts/setup.sh) first.")
    base = tmp_path_factory.mktemp("comfy_base")
    server = ComfyServer(base)
    server.prepare()
    models = base / "models"
    built = tiny["built"]
    # The tiny model under the file names the workflows expect, placed as contributors place it.
    install_tiny_models.install(models, built, {fmt: path for fmt, (path, _) in tiny["loras"].items()})
    shutil.copy(tiny["foreign_lora"], models / "loras" / tiny["foreign_lora"].name)
    # Bad files for the error paths.
    torch.save({"w": torch.zeros(2)}, models / "diffusion_models" / "pickled_model.ckpt")
    (models / "diffusion_models" / "corrupt.safetensors").write_bytes(built.transformer_file.read_bytes()[:5000])
    loras = models / "loras"
    sd = load_file(str(tiny["loras"]["diffusers"][0]))
    save_file({k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in sd.items()},
              str(loras / "nan_weights.safetensors"))
    save_file({k: torch.full_like(v, 1e30) if "lora_B" in k else v for k, v in sd.items()},
              str(loras / "huge_weights.safetensors"))
    # Links: one to a text file outside the model folders, one to a real LoRA kept on "another disk".
    (loras / "passwd_link.safetensors").symlink_to("/etc/passwd")
    elsewhere = base / "other_disk"
    elsewhere.mkdir()
    shutil.copy(tiny["loras"]["kohya_fused"][0], elsewhere / "kept_elsewhere.safetensors")
    (loras / "linked_style.safetensors").symlink_to(elsewhere / "kept_elsewhere.safetensors")
    # Other models sharing the folders (the loader's lists leave them out): a Flux-keyed file, an SDXL-sized VAE,
    # a CLIP text encoder and a LoRA put among the text encoders.
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(8, 4)}, str(models / "diffusion_models" / "flux1-dev.safetensors"))
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)},
              str(models / "vae" / "sdxl_vae.safetensors"))
    save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)},
              str(models / "text_encoders" / "clip_l.safetensors"))
    shutil.copy(tiny["loras"]["diffusers"][0], models / "text_encoders" / "a_lora_in_the_wrong_folder.safetensors")
    broken = models / "diffusers" / "broken_folder"
    shutil.copytree(built.diffusers_dir, broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    server.start()
    yield server
    server.stop()
