"""The browser tests really drive the two front ends they name."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from comfy_page import newest_frontend
from tests.workflows.workflow_files import ui_workflow


@pytest.mark.uis("vendored-classic", "newest-vue")
def test_each_ui_is_the_front_end_and_rendering_it_names(comfy_page, ui):
    if ui.frontend == "vendored":
        assert comfy_page.frontend_version() == version("comfyui_frontend_package")  # what ComfyUI 0.3.75 pins
    else:
        newest, _ = newest_frontend()
        assert comfy_page.frontend_version() == newest
        assert tuple(int(p) for p in newest.split(".")) > tuple(
            int(p) for p in version("comfyui_frontend_package").split("."))
    setting = comfy_page.page.evaluate(
        "() => window.comfyAPI.app.app.extensionManager.setting.get('Comfy.VueNodes.Enabled')")
    assert setting is ui.vue
    comfy_page.load_workflow(ui_workflow("zimage_sugar"))
    vue_nodes = comfy_page.page.locator("[data-node-id]:visible").count()
    assert vue_nodes == (6 if ui.vue else 0)  # Vue nodes are elements; the classic canvas draws them
