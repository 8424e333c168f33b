"""Builds Z-Image-Turbo with random weights at its true size (on a GPU machine) in both layouts.

  <root>/diffusion_models/z_image_turbo_bf16.safetensors   ComfyUI names, fused attention.qkv
  <root>/text_encoders/qwen_3_4b.safetensors
  <root>/vae/ae.safetensors
  <root>/diffusers/Z-Image-Turbo/                          diffusers folder (text encoder hard-linked)
  <root>/qwen_tokenizer/                                   the Qwen tokenizer files ComfyUI ships
  <root>/loras/style_a_r32.safetensors, style_b_r32.safetensors   rank-32 LoRAs (~160 MB, bf16)

Weights are random: latency and memory are real, images are noise. --tiny builds the
small test model instead (CPU smoke runs of the benchmark).

    python -m bench.build_model --root /tmp/zfull
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from devtools import model_builder
from devtools.graphs import MODEL, TEXT_ENCODER, VAE
from scripts.comfy_client import COMFY_DIR

SPLIT_NAMES = (MODEL, TEXT_ENCODER, VAE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--qwen-tokenizer", type=Path,
                    default=COMFY_DIR / "comfy" / "text_encoders" / "qwen25_tokenizer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the small test model (CPU smoke runs)")
    args = ap.parse_args()

    sizes = model_builder.TINY if args.tiny else model_builder.FULL
    dtype = torch.float32 if args.tiny else torch.bfloat16
    t0 = time.perf_counter()
    model_builder.build_random_model(
        args.root, "Z-Image-Turbo", sizes, seed=0, device=args.device, dtype=dtype,
        qwen_tokenizer_dir=args.qwen_tokenizer, split_names=SPLIT_NAMES)
    model_seconds = time.perf_counter() - t0
    # The split layout's tokenizer: the Qwen files ComfyUI ships (the diffusers folder got a copy too).
    tok = args.root / "qwen_tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for f in args.qwen_tokenizer.iterdir():
        shutil.copy(f, tok / f.name)
    t1 = time.perf_counter()
    loras = {}
    for name, fmt, seed in (("style_a_r32", "diffusers", 1), ("style_b_r32", "kohya_split", 2)):
        path = args.root / "loras" / f"{name}.safetensors"
        rank = 4 if args.tiny else 32
        model_builder.build_random_lora(path, sizes.transformer, fmt, rank=rank, seed=seed, refiners=True,
                                        scale=0.5 if args.tiny else 0.02, dtype=dtype, device=args.device)
        loras[name] = {"format": fmt, "rank": rank, "bytes": path.stat().st_size}
    manifest = {
        "tiny": args.tiny,
        "dtype": str(dtype),
        "files": {p.relative_to(args.root).as_posix(): p.stat().st_size for p in args.root.rglob("*.safetensors")},
        "loras": loras,
        "build_seconds": model_seconds,
        "lora_seconds": time.perf_counter() - t1,
    }
    (args.root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=1))
    print(f"total bytes {sum(manifest['files'].values()) / 1e9:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
