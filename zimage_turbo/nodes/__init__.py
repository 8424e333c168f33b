"""ComfyUI node classes: thin adapters over the engine."""

from . import routes
from .constants import DISPLAY_NAMES
from .loader_node import ZImageTurboLoader
from .lora_stack_node import ZImageTurboLoraStack
from .probe_node import ZImageTurboProbe
from .sampler_node import ZImageTurboSampler
from .save_node import ZImageTurboSave

NODE_CLASS_MAPPINGS = {
    "ZImageTurboLoader": ZImageTurboLoader,
    "ZImageTurboLoraStack": ZImageTurboLoraStack,
    "ZImageTurboSampler": ZImageTurboSampler,
    "ZImageTurboProbe": ZImageTurboProbe,
    "ZImageTurboSave": ZImageTurboSave,
}

NODE_DISPLAY_NAME_MAPPINGS = dict(DISPLAY_NAMES)

routes.register()
