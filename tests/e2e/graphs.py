"""API-format graphs the end-to-end tests queue."""

import json

from model_names import MODEL, TEXT_ENCODER, VAE


def api_prompt(seed=1, width=64, height=48, loras=None, model=MODEL, steps=8, prompt="a cat in a garden, 一只猫",
               cfg=0.0, memory="resident", dtype="fp32"):
    """Loader -> LoRA stack -> Sampler -> Probe -> SaveImage, in ComfyUI's API format."""
    graph = {
        "1": {"class_type": "ZImageTurboLoader", "inputs": {
            "model": model, "text_encoder": TEXT_ENCODER, "vae": VAE, "dtype": dtype, "device": "auto", "memory": memory, "compile": "auto"}},
        "2": {"class_type": "ZImageTurboLoraStack", "inputs": {"loras": json.dumps(loras or [])}},
        "3": {"class_type": "ZImageTurboSampler", "inputs": {
            "pipe": ["1", 0], "lora_stack": ["2", 0], "prompt": prompt, "negative_prompt": "", "width": width,
            "height": height, "steps": steps, "cfg": cfg, "shift": 3.0, "seed": seed, "batch_size": 1}},
        "4": {"class_type": "ZImageTurboProbe", "inputs": {"images": ["3", 0], "report": ["3", 2]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "e2e"}},
    }
    return graph
