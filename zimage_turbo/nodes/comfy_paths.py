"""Where model files live: ComfyUI's model folders.

Policy (the README says the same): a file is chosen by its name *relative to* one of ComfyUI's
model folders for its kind (no absolute paths, no ".."). Symbolic links inside those folders are
followed, as ComfyUI itself does, because users keep models on other disks; what makes a file
usable is its content: every file is parsed as safetensors first and refused after its header
if it is not one, so a link to a non-model file is never read further. Messages name files
relative to their model folder, never by the server's absolute paths (they reach API clients).
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..engine.api import ModelFileError, foreign_to_slot

DIFFUSERS_PREFIX = "[diffusers] "
NONE_FOUND = "(none found)"
# Pickle checkpoints are listed so that choosing one gets a clear refusal, not a silent absence.
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
# The loader slot each folder feeds. Folders are shared with other models (Flux, SDXL, CLIP, T5, LoRAs put in the
# wrong place): the loader's lists leave out files whose header shows they are something else, so nobody picks a
# Flux or SDXL VAE-sized file by mistake. Hidden, not marked: a combo value is the file name itself, and a renamed
# entry would break saved workflows. A prompt that still names such a file is refused with the reason
# (the model input by our validation, text encoder and VAE by ComfyUI's "not in list").
FOLDER_SLOTS = {"diffusion_models": "transformer", "text_encoders": "text_encoder", "vae": "vae"}


def _within(root: str, candidate: str) -> bool:
    root = os.path.abspath(root)
    return os.path.commonpath([root, os.path.abspath(candidate)]) == root


def list_files(folder: str) -> list[str]:
    names = [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(MODEL_SUFFIXES)]
    slot = FOLDER_SLOTS.get(folder)
    if slot is not None:
        names = [n for n in names if foreign_reason(folder, n) is None]
    return sorted(names) or [NONE_FOUND]


def foreign_reason(folder: str, name: str) -> str | None:
    """Why `name` in `folder` is not a Z-Image part for its loader slot (None: it is one, or cannot be told)."""
    slot = FOLDER_SLOTS.get(folder)
    if slot is None:
        return None
    try:
        path = resolve_file(folder, name)
    except ModelFileError:  # not there: the caller's own check says so
        return None
    return foreign_to_slot(path, slot)


def list_diffusers_folders() -> list[str]:
    out = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            if os.path.isfile(os.path.join(root, name, "model_index.json")):
                out.append(DIFFUSERS_PREFIX + name)
    return out


def model_choices() -> list[str]:
    files = [n for n in list_files("diffusion_models") if n != NONE_FOUND]
    return (files + list_diffusers_folders()) or [NONE_FOUND]


def folder_roots(folder: str) -> list[str]:
    return list(folder_paths.get_folder_paths(folder))


def _searched(folder: str) -> str:
    n = len(folder_roots(folder))
    return f"{n} folder{'s' if n != 1 else ''} searched, including extra_model_paths.yaml entries"


def resolve_file(folder: str, name: str) -> Path:
    """The full path of `name` inside one of the `folder` model folders; a clear error otherwise."""
    label = folder.replace("_", " ")
    if not name or name == NONE_FOUND:
        raise ModelFileError(f"no {label} file selected: put one in ComfyUI's models/{folder} folder and press R.")
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise ModelFileError(f"{name}: only files inside ComfyUI's models/{folder} folders can be used.")
    for root in folder_roots(folder):
        candidate = os.path.normpath(os.path.join(root, name))
        if _within(root, candidate) and os.path.isfile(candidate):
            return Path(candidate)
    raise ModelFileError(
        f"{name} was not found in models/{folder} ({_searched(folder)}): put the file there and press R to refresh."
    )


def resolve_diffusers_folder(choice: str) -> Path:
    name = choice[len(DIFFUSERS_PREFIX):] if choice.startswith(DIFFUSERS_PREFIX) else choice
    if os.path.isabs(name) or ".." in Path(name).parts or "/" in name or "\\" in name:
        raise ModelFileError(f"{name}: only folders directly inside ComfyUI's models/diffusers can be used.")
    for root in folder_roots("diffusers"):
        candidate = os.path.join(root, name)
        if os.path.isfile(os.path.join(candidate, "model_index.json")):
            return Path(candidate)
    raise ModelFileError(f"diffusers folder {name} was not found in models/diffusers ({_searched('diffusers')}).")


def qwen_tokenizer_dir() -> Path:
    """The Qwen tokenizer files ComfyUI ships (used when the text encoder is a single file)."""
    return Path(os.path.dirname(os.path.abspath(folder_paths.__file__))) / "comfy" / "text_encoders" / "qwen25_tokenizer"


def compile_cache_dir() -> Path:
    """Compiled code kept between server starts: ComfyUI's user directory (its temp folder is emptied at start)."""
    return Path(folder_paths.get_user_directory()) / "zimage_turbo" / "compile_cache"
