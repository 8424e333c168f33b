"""Shared fixtures: the tiny model (real classes, random weights) built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from engine import model_builder  # noqa: E402
from engine.model_builder import LORA_FORMATS, TINY  # noqa: E402

torch.set_num_threads(2)


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
    from engine import pipeline

    pipeline.release_all()
    yield
    pipeline.release_all()
