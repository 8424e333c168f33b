"""The graphs the tests, the benchmarks and the demo queue, and the file names the saved workflows expect.

One source for each: `api_graph()` is this pack's contract in ComfyUI's API format (Loader -> LoRA Stack ->
Sampler -> Probe -> Save), `native_graph()` ComfyUI's own Z-Image-Turbo template that the benchmarks compare with.
Plain data, no imports of ComfyUI or of the pack: the node ids here are the ones saved workflows use.
"""

from __future__ import annotations

import json

# The real model's file names (Comfy-Org's repackage) and the style LoRAs the saved workflows name. Test servers
# and devtools.install_tiny_models hold the tiny model and tiny LoRAs under these names.
MODEL = "z_image_turbo_bf16.safetensors"
TEXT_ENCODER = "qwen_3_4b.safetensors"
VAE = "ae.safetensors"
STYLE_LORAS = {
    "sugar": "sugar_face_zimage_turbo.safetensors",
    "niannian": "meixiong_niannian_turbo_lora.safetensors",
    "sun_zhenni": "sun_zhenni_zimage_turbo_lora.safetensors",
}
# ComfyUI model folder -> the file the loader's defaults and the workflows expect there.
MODEL_FILES = {"diffusion_models": MODEL, "text_encoders": TEXT_ENCODER, "vae": VAE}

# The nodes' class types (saved in workflows: never renamed) and the node ids api_graph gives them.
LOADER_CLASS, STACK_CLASS, SAMPLER_CLASS, PROBE_CLASS, SAVE_CLASS = (
    "ZImageTurboLoader", "ZImageTurboLoraStack", "ZImageTurboSampler", "ZImageTurboProbe", "ZImageTurboSave")
LOADER, STACK, SAMPLER, PROBE, SAVE, FRONT_STACK = "1", "2", "3", "4", "5", "6"
DEFAULT_PROMPT = "a red fox resting in fresh snow at sunrise, 雪地里的红狐狸, soft light"


def api_graph(*, prompt: str = DEFAULT_PROMPT, seed: int = 0, width: int = 1024, height: int = 1024,
              steps: int = 8, cfg: float = 0.0, shift: float = 3.0, negative_prompt: str = "", batch_size: int = 1,
              loras=None, front_loras=None, model: str = MODEL, text_encoder: str = TEXT_ENCODER, vae: str = VAE,
              dtype: str = "auto", device: str = "auto", memory: str = "resident", compile: str | None = "auto",
              loader_inputs: dict | None = None, save_class: str = "SaveImage", prefix: str = "ZImage") -> dict:
    """Loader -> LoRA Stack -> Sampler -> Probe -> Save in ComfyUI's API format.

    loras: the stack's rows ([{"lora": file, "strength": s, "on": bool}]); front_loras: rows of a second stack
    chained in front of it (node FRONT_STACK), as a user chains two stacks. compile=None leaves that input out
    (the server's default); loader_inputs: further loader inputs, set last."""
    loader = {"model": model, "text_encoder": text_encoder, "vae": vae, "dtype": dtype, "device": device,
              "memory": memory}
    if compile is not None:
        loader["compile"] = compile
    loader.update(loader_inputs or {})
    graph = {
        LOADER: {"class_type": LOADER_CLASS, "inputs": loader},
        STACK: {"class_type": STACK_CLASS, "inputs": {"loras": json.dumps(list(loras or []))}},
        SAMPLER: {"class_type": SAMPLER_CLASS, "inputs": {
            "pipe": [LOADER, 0], "lora_stack": [STACK, 0], "prompt": prompt, "negative_prompt": negative_prompt,
            "width": width, "height": height, "steps": steps, "cfg": cfg, "shift": shift, "seed": seed,
            "batch_size": batch_size}},
        PROBE: {"class_type": PROBE_CLASS, "inputs": {"images": [SAMPLER, 0], "report": [SAMPLER, 2]}},
        SAVE: {"class_type": save_class, "inputs": {"images": [PROBE, 0], "filename_prefix": prefix}},
    }
    if front_loras is not None:
        graph[FRONT_STACK] = {"class_type": STACK_CLASS, "inputs": {"loras": json.dumps(list(front_loras))}}
        graph[STACK]["inputs"]["lora_stack"] = [FRONT_STACK, 0]
    return graph


# Node ids of native_graph's nodes, by role.
NATIVE = {"model": "1", "sampling": "2", "encode": "4", "latent": "6", "sample": "7", "decode": "9", "save": "10",
          "lora": "11"}


def native_graph(*, prompt: str = DEFAULT_PROMPT, seed: int = 0, width: int = 1024, height: int = 1024,
                 steps: int = 8, lora: str | None = None, model: str = MODEL, text_encoder: str = TEXT_ENCODER,
                 vae: str = VAE, prefix: str = "ComfyUI") -> dict:
    """ComfyUI's Z-Image-Turbo template: UNETLoader -> ModelSamplingAuraFlow(3) -> KSampler(8 steps, cfg 1,
    res_multistep, simple) with CLIPLoader(lumina2) -> CLIPTextEncode, ConditioningZeroOut as the negative,
    EmptySD3LatentImage, VAELoader -> VAEDecode -> SaveImage; a style is LoraLoaderModelOnly after UNETLoader."""
    n = NATIVE
    graph = {
        n["model"]: {"class_type": "UNETLoader", "inputs": {"unet_name": model, "weight_dtype": "default"}},
        n["sampling"]: {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": [n["model"], 0], "shift": 3.0}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": text_encoder, "type": "lumina2", "device": "default"}},
        n["encode"]: {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": prompt}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": [n["encode"], 0]}},
        n["latent"]: {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height,
                                                                      "batch_size": 1}},
        n["sample"]: {"class_type": "KSampler", "inputs": {
            "model": [n["sampling"], 0], "positive": [n["encode"], 0], "negative": ["5", 0],
            "latent_image": [n["latent"], 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "res_multistep",
            "scheduler": "simple", "denoise": 1.0}},
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        n["decode"]: {"class_type": "VAEDecode", "inputs": {"samples": [n["sample"], 0], "vae": ["8", 0]}},
        n["save"]: {"class_type": "SaveImage", "inputs": {"images": [n["decode"], 0], "filename_prefix": prefix}},
    }
    if lora:
        graph[n["lora"]] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": [n["model"], 0], "lora_name": lora, "strength_model": 1.0}}
        graph[n["sampling"]]["inputs"]["model"] = [n["lora"], 0]
    return graph
