"""ComfyUI node classes: thin adapters over the engine."""

from . import routes
from .loader_node import ZImageTurboLoader
from .lora_stack_node import ZImageTurboLoraStack
from .probe_node import ZImageTurboProbe
from .sampler_node import ZImageTurboSampler

NODE_CLASS_MAPPINGS = {
    "ZImageTurboLoader": ZImageTurboLoader,
    "ZImageTurboLoraStack": ZImageTurboLoraStack,
    "ZImageTurboSampler": ZImageTurboSampler,
    "ZImageTurboProbe": ZImageTurboProbe,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ZImageTurboLoader": "Z-Image Turbo Loader",
    "ZImageTurboLoraStack": "Z-Image Turbo LoRA Stack",
    "ZImageTurboSampler": "Z-Image Turbo Sampler (8-step)",
    "ZImageTurboProbe": "Z-Image Turbo VRAM/Latency Probe",
}

routes.register()
