"""`python -m devtools.install_tiny_models`: the tiny model and LoRAs land in a ComfyUI's model folders under the
names the workflows expect, and what lands there loads and generates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devtools import install_tiny_models
from devtools.graphs import MODEL, MODEL_FILES, STYLE_LORAS, TEXT_ENCODER, VAE
from devtools.model_builder import LORA_FORMATS
from zimage_turbo.engine import api

REPO = Path(__file__).resolve().parents[2]


def run_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "devtools.install_tiny_models", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory) -> Path:
    """A ComfyUI folder as the command sees one (main.py), the tiny models installed by the documented command."""
    folder = tmp_path_factory.mktemp("ComfyUI")
    (folder / "main.py").write_text("")
    proc = run_command("--comfyui", str(folder))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def test_every_file_the_workflows_name_is_installed(comfyui):
    models = comfyui / "models"
    for sub, name in MODEL_FILES.items():
        assert (models / sub / name).is_file(), (sub, name)
    for name in list(STYLE_LORAS.values()) + [f"tiny_{fmt}.safetensors" for fmt in LORA_FORMATS]:
        assert (models / "loras" / name).is_file(), name
    assert (models / "diffusers" / install_tiny_models.TINY_NAME / "model_index.json").is_file()
    # Every workflow shipped with the pack names only files that are now there.
    for wf in sorted((REPO / "workflows" / "api").glob("*.json")):
        graph = json.loads(wf.read_text())
        for node in graph.values():
            inputs = node["inputs"]
            if node["class_type"] == "ZImageTurboLoader":
                assert (inputs["model"], inputs["text_encoder"], inputs["vae"]) == (MODEL, TEXT_ENCODER, VAE), wf.name
            if node["class_type"] == "ZImageTurboLoraStack":
                for row in json.loads(inputs["loras"]):
                    assert (models / "loras" / row["lora"]).is_file(), (wf.name, row["lora"])


def test_the_installed_files_load_and_every_lora_changes_the_image(comfyui):
    models = comfyui / "models"
    tokenizer = models / "diffusers" / install_tiny_models.TINY_NAME / "tokenizer"
    split = api.SplitFiles(models / "diffusion_models" / MODEL, models / "text_encoders" / TEXT_ENCODER,
                           models / "vae" / VAE, tokenizer)
    req = api.GenerationRequest("a cat in a garden, 一只猫", width=32, height=32, steps=2, seed=3)
    try:
        pipe = api.load(split, torch.device("cpu"), torch.float32, "resident", "off")
        base = pipe.generate(req).images
        assert torch.isfinite(base).all()
        for name in sorted(p.name for p in (models / "loras").glob("*.safetensors")):
            styled = pipe.generate(req, [api.LoraSpec(models / "loras" / name, 1.0)]).images
            assert not torch.equal(styled, base), name
        folder = api.DiffusersFolder(models / "diffusers" / install_tiny_models.TINY_NAME)
        same = api.load(folder, torch.device("cpu"), torch.float32, "resident", "off").generate(req).images
        assert torch.equal(same, base)  # one model in both layouts
    finally:
        api.release_all()


def test_files_already_there_are_kept_unless_forced(tmp_path, capsys):
    real = tmp_path / "models" / "diffusion_models" / MODEL
    real.parent.mkdir(parents=True)
    real.write_bytes(b"the user's real weights")
    assert install_tiny_models.main(["--models", str(tmp_path / "models")]) == 0
    assert real.read_bytes() == b"the user's real weights"
    assert f"kept      {real}" in capsys.readouterr().out and (tmp_path / "models" / "vae" / VAE).is_file()
    assert install_tiny_models.main(["--models", str(tmp_path / "models"), "--force"]) == 0
    assert f"installed {real}" in capsys.readouterr().out and real.stat().st_size > 1000


def test_a_folder_that_is_not_comfyui_is_refused(tmp_path, capsys):
    assert install_tiny_models.main(["--comfyui", str(tmp_path)]) == 2
    assert "not a ComfyUI folder" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()
