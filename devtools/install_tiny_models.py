"""Put the tiny Z-Image model and tiny LoRAs into a ComfyUI's model folders, under the names the workflows expect.

    python -m devtools.install_tiny_models --comfyui PATH/TO/ComfyUI     # its models/ folder
    python -m devtools.install_tiny_models --models PATH/TO/models      # a models folder itself

For contributors and for reproducing a bug report without the real weights: every saved workflow then loads and
runs (its images are noise). The model has the real classes at small sizes with random weights (devtools/
model_builder.py, the same seeds as the tests' fixture). What goes where, below the models folder:

    diffusion_models/z_image_turbo_bf16.safetensors, text_encoders/qwen_3_4b.safetensors, vae/ae.safetensors
    diffusers/zit_tiny/                        the same model as a diffusers folder ("[diffusers] zit_tiny")
    loras/tiny_<format>.safetensors            one LoRA per key format the pack reads
    loras/<the workflows' style LoRA names>    tiny LoRAs under sugar_face_zimage_turbo.safetensors, ...

A file that is already there is kept (it may be the real model) unless --force is given. Run it with a Python that
has this repository's requirements (e.g. .venv/bin/python), from the repository root.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from devtools import model_builder
from devtools.graphs import MODEL_FILES, STYLE_LORAS

TINY_NAME = "zit_tiny"  # the diffusers folder's name: "[diffusers] zit_tiny" in the loader


def lora_name(fmt: str) -> str:
    return f"tiny_{fmt}.safetensors"


def build(root: Path) -> tuple[model_builder.BuiltModel, dict[str, Path]]:
    """The tiny model in both layouts and one LoRA per key format, under `root` (the tests' fixture seeds)."""
    built = model_builder.build_random_model(root, TINY_NAME, model_builder.TINY, seed=0)
    loras = {}
    for i, fmt in enumerate(model_builder.LORA_FORMATS):
        loras[fmt] = root / "loras" / lora_name(fmt)
        model_builder.build_random_lora(loras[fmt], model_builder.TINY.transformer, fmt, rank=4, alpha=2.0,
                                        seed=10 + i)
    return built, loras


def placements(built: model_builder.BuiltModel, loras: dict[str, Path]) -> list[tuple[Path, str]]:
    """(source, destination relative to the models folder) for every file and folder installed."""
    sources = {"diffusion_models": built.transformer_file, "text_encoders": built.text_encoder_file,
               "vae": built.vae_file}
    out = [(sources[sub], f"{sub}/{name}") for sub, name in MODEL_FILES.items()]
    out.append((built.diffusers_dir, f"diffusers/{built.diffusers_dir.name}"))
    out += [(path, f"loras/{lora_name(fmt)}") for fmt, path in loras.items()]
    # Each style name gets another key format, so the saved workflows exercise several readers.
    out += [(loras[fmt], f"loras/{name}") for fmt, name in zip(model_builder.LORA_FORMATS, STYLE_LORAS.values())]
    return out


def install(models_dir: Path, built: model_builder.BuiltModel | None = None, loras: dict[str, Path] | None = None,
            force: bool = False) -> dict[str, list[str]]:
    """Copy the tiny model (built here unless `built`/`loras` are given) into `models_dir`.

    Returns {"installed": [...], "kept": [...]}: paths relative to `models_dir`; kept ones already existed."""
    models_dir = Path(models_dir)
    done: dict[str, list[str]] = {"installed": [], "kept": []}
    with tempfile.TemporaryDirectory(prefix="zimage_tiny_") as tmp:  # the build, when none is given
        if built is None or loras is None:
            built, loras = build(Path(tmp))
        for src, rel in placements(built, loras):
            dest = models_dir / rel
            if dest.exists() or dest.is_symlink():
                if not force:
                    done["kept"].append(rel)
                    continue
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                else:
                    dest.unlink()
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dest)
            else:
                shutil.copyfile(src, dest)
            done["installed"].append(rel)
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--comfyui", type=Path, help="a ComfyUI folder (the files go to its models/)")
    where.add_argument("--models", type=Path, help="a models folder (diffusion_models/, loras/, ... inside)")
    ap.add_argument("--force", action="store_true", help="replace files that are already there")
    args = ap.parse_args(argv)
    if args.comfyui is not None and not (args.comfyui / "main.py").is_file():
        print(f"{args.comfyui} is not a ComfyUI folder (no main.py); use --models for a models folder",
              file=sys.stderr)
        return 2
    models = args.models if args.models is not None else args.comfyui / "models"
    done = install(models, force=args.force)
    for rel in done["installed"]:
        print(f"installed {models / rel}")
    for rel in done["kept"]:
        print(f"kept      {models / rel} (already there; --force replaces it)")
    print("Tiny random-weight model: the workflows run, their images are noise.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
