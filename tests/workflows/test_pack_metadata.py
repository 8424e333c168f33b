"""What ComfyUI, its registry tools and its front ends read about the pack besides the nodes: pyproject.toml
(through comfy-cli's own parser, the one `comfy node publish` uses) and the display name of the template category."""

from __future__ import annotations

import json
import tomllib

from tests.workflows.workflow_files import PACK, REPO


def test_pyproject_has_no_placeholders():
    from comfy_cli.registry.config_parser import extract_node_configuration

    raw = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    config = extract_node_configuration(str(REPO / "pyproject.toml"))
    assert config is not None
    assert config.project.name == PACK and config.tool_comfy.display_name == "Z-Image Turbo"
    # Every value that is there is real: no example URL, no empty icon (unknown ones are left out).
    for url in raw["project"].get("urls", {}).values():
        assert url.startswith("https://") and "example" not in url, url
    assert "Icon" not in raw["tool"]["comfy"] or raw["tool"]["comfy"]["Icon"].startswith("https://")
    assert config.project.supported_comfyui_version == ">=0.3.75"  # what the README and the tests state
    assert config.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]


def test_template_category_has_the_pack_display_name():
    """The front ends name a custom node pack's template category through the i18n key
    templateWorkflows.category.<pack folder>; ComfyUI serves locales/<lang>/main.json at /i18n."""
    messages = json.loads((REPO / "locales" / "en" / "main.json").read_text(encoding="utf-8"))
    assert messages["templateWorkflows"]["category"][PACK] == "Z-Image Turbo"
