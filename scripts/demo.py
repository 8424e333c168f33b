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

from devtools.graphs import MODEL_FILES, PROBE, SAVE, api_graph
from scripts.comfy_client import COMFY_DIR, REPO, ComfyServer, place_tiny_model

TINY_NAME = "zimage_turbo_tiny"
REAL_MIN_BYTES = 1 << 30  # the real transformer is ~12 GB; tiny files under its name (install_tiny_models) are MBs


def choose_model(models: Path) -> tuple[dict, bool]:
    """The loader's file names and whether they are the real weights."""
    if all((models / sub / name).is_file() for sub, name in MODEL_FILES.items()):
        names = dict(zip(("model", "text_encoder", "vae"), MODEL_FILES.values(), strict=True))
        return names, (models / "diffusion_models" / names["model"]).stat().st_size >= REAL_MIN_BYTES
    from devtools import model_builder

    print("[demo] real Z-Image-Turbo files not found in", models)
    print("[demo] building the tiny random-weight model (real architecture, images are noise)")
    built = model_builder.build_random_model(REPO / ".build" / "demo_model", TINY_NAME, model_builder.TINY, seed=0,
                                             layouts=("split", "diffusers"))
    lora = REPO / ".build" / "demo_model" / "loras" / "tiny_style_lora.safetensors"
    model_builder.build_random_lora(lora, model_builder.TINY.transformer, "kohya_fused", rank=4, seed=3)
    names = place_tiny_model(models, built, [lora])
    return {"model": names["model"], "text_encoder": names["text_encoder"], "vae": names["vae"],
            "lora": lora.name}, False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt", default="Sugar面部,纯欲甜妹脸部,淡颜系清甜长相,清透水光肌,微醺蜜桃腮红, soft window light")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    server = ComfyServer(COMFY_DIR, cpu=not torch.cuda.is_available(), log_path=REPO / ".build" / "demo_comfyui.log")
    server.prepare()  # the model folders, before the tiny model goes into them
    names, real = choose_model(COMFY_DIR / "models")
    size = 1024 if real else 256
    loras = [{"lora": names["lora"], "strength": 0.8, "on": True}] if "lora" in names else []
    graph = api_graph(model=names["model"], text_encoder=names["text_encoder"], vae=names["vae"], loras=loras,
                      prompt=args.prompt, seed=args.seed, width=size, height=size, prefix="zimage_turbo_demo")
    print(f"[demo] starting ComfyUI on 127.0.0.1:{server.port} (log: {server.log_path})")
    with server:
        print(f"[demo] queueing a {size}x{size} generation through POST /prompt")
        result = server.client.run(graph, timeout=1800)
        if result.status != "success":
            print("[demo] FAILED:", json.dumps(result.error, indent=1)[:3000])
            return 1
        img = result.outputs()[SAVE]["images"][0]
        path = COMFY_DIR / "output" / img["subfolder"] / img["filename"]
        print(f"\n[demo] image: {path}")
        print("[demo] weights:", "real Z-Image-Turbo" if real else "TINY RANDOM MODEL (noise image; put the real files "
              "in .build/ComfyUI/models to generate real images)")
        print("\n" + result.outputs()[PROBE]["text"][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
