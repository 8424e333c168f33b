"""Z-Image-Turbo for ComfyUI: Turbo loader, LoRA stack, fast 8-step sampler, VRAM/latency probe.

ComfyUI imports this file from custom_nodes/<this folder>/. The shipped code is the package
zimage_turbo/: its engine/ does the work (no ComfyUI inside), its nodes/ adapt it to ComfyUI;
web/ is the front end.
"""

import logging

WEB_DIRECTORY = "./web"

try:
    from .zimage_turbo.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as exc:  # a missing dependency must not take ComfyUI down with it
    logging.getLogger("zimage_turbo").error(
        "Z-Image Turbo nodes are disabled: %s. Install them with: pip install -r requirements.txt "
        "(in this node pack's folder, with ComfyUI's Python).", exc
    )
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
else:
    from .zimage_turbo.nodes.comfy_runtime import start_imports_with_server
    from .zimage_turbo.nodes.preload import start_with_server

    start_with_server()  # opt-in (ZIMAGE_TURBO_PRELOAD or user/zimage_turbo_preload.json); never raises, never blocks
    start_imports_with_server()  # the model classes imported once the server starts; never raises, never blocks

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
