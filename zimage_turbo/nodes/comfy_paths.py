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

from ..engine.api import ModelFileError, slot_verdict

DIFFUSERS_PREFIX = "[diffusers] "
NONE_FOUND = "(none found)"
# Pickle checkpoints are listed so that choosing one gets a clear refusal, not a silent absence.
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
# The loader input ("slot") each folder feeds. ComfyUI's model folders are shared with every other model (Flux, SDXL,
# Wan, CLIP, T5, LoRAs put in the wrong folder): a long list where few files can work invites the wrong pick, and a
# wrong text encoder or VAE would only fail after the model had loaded. So each list shows the Z-Image
# parts first (their safetensors header says so; engine/files/part_lists.py), then the files whose header cannot
# tell (a pickle, a cut download, an unknown layout: choosing one gets the loader's exact refusal), and leaves out
# the files whose header shows they are something else.
# Left out rather than marked: a combo's value *is* the file name that saved workflows and API prompts carry, and
# ComfyUI has no label apart from the value, so a marked entry ("sdxl_vae.safetensors (not Z-Image)") would be a
# different value. A prompt that names a left-out file gets the reason instead of ComfyUI's "value not in list":
# for the model when it is queued (the loader's VALIDATE_INPUTS), for the text encoder and VAE when the loader
# runs (their lists accept the names they leave out: FileChoices).
FOLDER_SLOTS = {"diffusion_models": "transformer", "text_encoders": "text_encoder", "vae": "vae"}
CHECK_HINT = "`python -m zimage_turbo check FILE` (run in this node pack's folder) says what any file is."


class FileChoices(list):
    """A loader file list that also accepts the names it leaves out.

    ComfyUI 0.3.75 checks a combo value as `value not in options` (execution.py, validate_inputs) unless the node's
    VALIDATE_INPUTS takes that input; taking text_encoder and vae there would file each of its messages under all
    three inputs (ComfyUI repeats a message once per input the function takes: a missing model would be reported
    under the VAE too). So this list answers `in` for a left-out file as well, and the loader refuses that file with
    the reason when it runs. /object_info sends only the list's items (JSON sees a plain list). Should a later
    ComfyUI test membership some other way, a left-out name gets ComfyUI's plain "value not in list" instead.
    """

    def __init__(self, shown, left_out=()):
        super().__init__(shown)
        self.left_out = frozenset(left_out)

    def __contains__(self, value) -> bool:
        return list.__contains__(self, value) or (isinstance(value, str) and value in self.left_out)


def _within(root: str, candidate: str) -> bool:
    root = os.path.abspath(root)
    return os.path.commonpath([root, os.path.abspath(candidate)]) == root


def _model_files(folder: str) -> list[str]:
    return sorted(n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(MODEL_SUFFIXES))


def list_files(folder: str) -> list[str]:
    names = _model_files(folder)
    if folder not in FOLDER_SLOTS:
        return names or [NONE_FOUND]
    parts, unknown, left_out = _by_verdict(folder, names)
    return FileChoices(parts + unknown or [NONE_FOUND], left_out)


def _by_verdict(folder: str, names: list[str]) -> tuple[list[str], list[str], list[str]]:
    """`names` split into (Z-Image parts, cannot tell, left out) for the folder's loader slot, each in order."""
    parts, unknown, left_out = [], [], []
    for name in names:
        verdict = _verdict(folder, name)
        if verdict is None or not verdict.listed:
            (unknown if verdict is None else left_out).append(name)
        else:
            (parts if verdict.is_part else unknown).append(name)
    return parts, unknown, left_out


def _verdict(folder: str, name: str):
    """The engine's SlotVerdict for a file of `folder`; None when it is not there (the loader's own check says so)."""
    try:
        path = resolve_file(folder, name)
    except ModelFileError:
        return None
    return slot_verdict(path, FOLDER_SLOTS[folder])


def refusal(folder: str, name: str) -> str | None:
    """Why the file `name`, chosen for the loader input fed by `folder`, is not a Z-Image part (None: it is one, or
    its header cannot tell). Names the file as the user did, never by its path on the server."""
    if folder not in FOLDER_SLOTS or not name or name == NONE_FOUND:
        return None
    verdict = _verdict(folder, name)
    if verdict is None or verdict.listed:
        return None
    label = folder.replace("_", " ")
    return f"{verdict.reason(name)} It is left out of the loader's {label} list. {CHECK_HINT}"


def resolve_part(folder: str, name: str) -> Path:
    """resolve_file for a loader input: also refuses a file whose header shows it is not a Z-Image part."""
    path = resolve_file(folder, name)
    why = refusal(folder, name)
    if why:
        raise ModelFileError(why)
    return path


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
    """Z-Image diffusion model files, then the diffusers folders, then the files whose header cannot tell. A plain
    list: the loader's VALIDATE_INPUTS checks the model itself (and names a left-out file's reason)."""
    parts, unknown, _ = _by_verdict("diffusion_models", _model_files("diffusion_models"))
    return (parts + list_diffusers_folders() + unknown) or [NONE_FOUND]


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
