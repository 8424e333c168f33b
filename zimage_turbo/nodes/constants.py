"""Names the nodes, the front end and saved workflows share: one place for each."""

CATEGORY = "Z-Image Turbo"

# Link types between our nodes.
PIPE_TYPE = "ZIMAGE_TURBO_PIPE"  # the loader's recipe of a pipeline (nodes/pipe_handle.py)
LORA_STACK_TYPE = "ZIMAGE_LORA_STACK"  # a tuple of engine LoraSpec rows
# ComfyUI's common stack type (Efficiency Nodes, Comfyroll, Lora-Manager, ...): a list of
# (lora_name, model_strength, clip_strength) tuples, lora_name relative to models/loras.
COMMON_LORA_STACK_TYPE = "LORA_STACK"
CLIP_STRENGTH_NOTE = ("clip_strength has no meaning here: Z-Image's text encoder is not LoRA-patched, only the "
                      "transformer is (with model_strength).")
REPORT_TYPE = "ZIMAGE_TURBO_REPORT"  # what one generation cost, sampler -> probe
# 0 / off / false / no: no background import of the model classes when the server starts (comfy_runtime.py)
HEAD_START_ENV = "ZIMAGE_TURBO_HEAD_START"

# Node ids (saved in workflows: never rename) and the names shown in the editor.
DISPLAY_NAMES = {
    "ZImageTurboLoader": "Z-Image Turbo Loader",
    "ZImageTurboLoraStack": "Z-Image Turbo LoRA Stack",
    "ZImageTurboSampler": "Z-Image Turbo Sampler (8-step)",
    "ZImageTurboProbe": "Z-Image Turbo VRAM/Latency Probe",
    "ZImageTurboSave": "Z-Image Turbo Save Image",
}
