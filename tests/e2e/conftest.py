"""A real ComfyUI 0.3.75 server on 127.0.0.1 (--cpu) with this package in custom_nodes.

Its model folders hold the tiny model under the names users have (z_image_turbo_bf16,
qwen_3_4b, ae), the tiny LoRAs, and a few bad files for the error paths.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from comfy_client import COMFY_DIR, ComfyServer, place_tiny_model
from graphs import MODEL, TEXT_ENCODER, VAE

pytestmark = pytest.mark.e2e

def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def comfy(tiny, tmp_path_factory):
    if not (COMFY_DIR / "main.py").is_file():
        pytest.fail(f"ComfyUI is not set up in {COMFY_DIR}: run `make test` (or scripts/setup.sh) first.")
    base = tmp_path_factory.mktemp("comfy_base")
    server = ComfyServer(base)
    server.prepare()
    models = base / "models"
    built = tiny["built"]
    # The tiny model under the file names of the real one, as the workflows expect them.
    shutil.copy(built.transformer_file, models / "diffusion_models" / MODEL)
    shutil.copy(built.text_encoder_file, models / "text_encoders" / TEXT_ENCODER)
    shutil.copy(built.vae_file, models / "vae" / VAE)
    place_tiny_model(models, built, [p for p, _ in tiny["loras"].values()] + [tiny["foreign_lora"]])
    # Bad files for the error paths.
    torch.save({"w": torch.zeros(2)}, models / "diffusion_models" / "pickled_model.ckpt")
    (models / "diffusion_models" / "corrupt.safetensors").write_bytes(built.transformer_file.read_bytes()[:5000])
    broken = models / "diffusers" / "broken_folder"
    shutil.copytree(built.diffusers_dir, broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    server.start()
    yield server
    server.stop()
