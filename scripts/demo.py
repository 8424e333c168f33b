"""`make demo`: start ComfyUI with this package, queue one generation through the API, show the result.

Uses the real Z-Image-Turbo files when they are in ComfyUI's model folders
(diffusion_models/z_image_turbo_bf16.safetensors, text_encoders/qwen_3_4b.safetensors,
vae/ae.safetensors); otherwise builds the tiny random-weight model and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from comfy_client import COMFY_DIR, ComfyServer  # noqa: E402

REAL = {"model": "z_image_turbo_bf16.safetensors", "text_encoder": "qwen_3_4b.safetensors", "vae": "ae.safetensors"}
TINY_NAME = "zimage_turbo_tiny"


def choose_model(models: Path) -> tuple[dict, bool]:
    present = all((models / sub / REAL[key]).is_file() for key, sub in
                  (("model", "diffusion_models"), ("text_encoder", "text_encoders"), ("vae", "vae")))
    if present:
        return dict(REAL), True
    from devtools import model_builder

    print("[demo] real Z-Image-Turbo files not found in", models)
    print("[demo] building the tiny random-weight model (real architecture, images are noise)")
    built = model_builder.build_random_model(REPO / ".build" / "demo_model", TINY_NAME, model_builder.TINY, seed=0,
                                             layouts=("split", "diffusers"))
    for src, sub in ((built.transformer_file, "diffusion_models"), (built.text_encoder_file, "text_encoders"),
                     (built.vae_file, "vae")):
        (models / sub).mkdir(parents=True, exist_ok=True)
        (models / sub / src.name).write_bytes(src.read_bytes())
    lora = models / "loras" / "tiny_style_lora.safetensors"
    model_builder.build_random_lora(lora, model_builder.TINY.transformer, "kohya_fused", rank=4, seed=3)
    return {"model": built.transformer_file.name, "text_encoder": built.text_encoder_file.name,
            "vae": built.vae_file.name, "lora": lora.name}, False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt", default="Sugar面部,纯欲甜妹脸部,淡颜系清甜长相,清透水光肌,微醺蜜桃腮红, soft window light")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    models = COMFY_DIR / "models"
    names, real = choose_model(models)
    size = 1024 if real else 256
    loras = [{"lora": names["lora"], "strength": 0.8, "on": True}] if "lora" in names else []
    graph = {
        "1": {"class_type": "ZImageTurboLoader", "inputs": {
            "model": names["model"], "text_encoder": names["text_encoder"], "vae": names["vae"],
            "dtype": "auto", "device": "auto", "memory": "resident", "compile": "auto"}},
        "2": {"class_type": "ZImageTurboLoraStack", "inputs": {"loras": json.dumps(loras)}},
        "3": {"class_type": "ZImageTurboSampler", "inputs": {
            "pipe": ["1", 0], "lora_stack": ["2", 0], "prompt": args.prompt, "negative_prompt": "", "width": size,
            "height": size, "steps": 8, "cfg": 0.0, "shift": 3.0, "seed": args.seed, "batch_size": 1}},
        "4": {"class_type": "ZImageTurboProbe", "inputs": {"images": ["3", 0], "report": ["3", 2]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "zimage_turbo_demo"}},
    }
    server = ComfyServer(COMFY_DIR, cpu=not torch.cuda.is_available(), log_path=REPO / ".build" / "demo_comfyui.log")
    print(f"[demo] starting ComfyUI on 127.0.0.1:{server.port} (log: {server.log_path})")
    with server:
        print(f"[demo] queueing a {size}x{size} generation through POST /prompt")
        result = server.client.run(graph, timeout=1800)
        if result.status != "success":
            print("[demo] FAILED:", json.dumps(result.error, indent=1)[:3000])
            return 1
        img = result.outputs()["5"]["images"][0]
        path = COMFY_DIR / "output" / img["subfolder"] / img["filename"]
        print(f"\n[demo] image: {path}")
        print("[demo] weights:", "real Z-Image-Turbo" if real else "TINY RANDOM MODEL (noise image; put the real files "
              "in .build/ComfyUI/models to generate real images)")
        print("\n" + result.outputs()["4"]["text"][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
