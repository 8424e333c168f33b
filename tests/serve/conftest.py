"""Fixtures of the Ray Serve tests: a ComfyUI base folder with the tiny model and this pack.

Everything runs on this machine: Ray clusters on 127.0.0.1, ComfyUI on the CPU, the tiny random-weight model.
"""

from __future__ import annotations

import pytest

from serve_helpers import COMFY_DIR, REPO, place_tiny_model


@pytest.fixture(scope="session")
def serve_base(tiny, tmp_path_factory):
    """ComfyUI's --base-directory for the replicas: the tiny model and LoRAs under the real names, this pack linked."""
    if not (COMFY_DIR / "main.py").is_file():
        pytest.fail(f"ComfyUI is not set up in {COMFY_DIR}: run `make test` (or scripts/setup.sh) first.")
    base = tmp_path_factory.mktemp("serve_base")
    for sub in ("models", "custom_nodes", "user", "input"):
        (base / sub).mkdir()
    (base / "custom_nodes" / "comfyui-zimage-turbo").symlink_to(REPO, target_is_directory=True)
    place_tiny_model(base / "models", tiny)
    return base
