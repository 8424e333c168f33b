"""Save Image node: the images as PNG, WebP or JPEG in ComfyUI's output folder, with the workflow kept.

A thin adapter over engine/image_files.py: ComfyUI's output folder and file naming
(folder_paths.get_save_image_path, as SaveImage), its --disable-metadata switch, and the same
`ui.images` result as SaveImage, so /history and /view work unchanged for API clients. Each file
is complete on disk before the node returns: a success in /history means the file is there.
"""

from __future__ import annotations

import os
import time

import folder_paths

from ..engine.api import ZImageError, image_files
from .constants import CATEGORY

DEFAULT_PREFIX = "ZImage"


def prefix_problem(prefix) -> str | None:
    """Why `prefix` cannot name files inside the output folder, or None (no server paths in the message)."""
    if not isinstance(prefix, str) or not prefix.strip():
        return "filename_prefix is empty: give a name such as ZImage, or sub/folder/name."
    if "\0" in prefix:
        return "filename_prefix holds a NUL character."
    if os.path.isabs(prefix) or prefix.startswith(("/", "\\")):
        return (f"filename_prefix {prefix!r} is an absolute path: images are saved inside ComfyUI's output folder; "
                "give a name such as ZImage, or sub/folder/name.")
    normal = os.path.normpath(prefix)
    if normal == ".." or normal.startswith(".." + os.sep):
        return (f"filename_prefix {prefix!r} leads out of ComfyUI's output folder ('..'): give a name inside it, "
                "such as ZImage, or sub/folder/name.")
    return None


def _metadata_disabled() -> bool:
    try:
        from comfy.cli_args import args
    except ImportError:
        return False
    return bool(getattr(args, "disable_metadata", False))


class ZImageTurboSave:
    DESCRIPTION = (
        "Saves the images to ComfyUI's output folder like Save Image, with the prompt and workflow inside "
        "(drop a PNG or WebP on the canvas to load its workflow), but fast: png is lossless, written on all CPU "
        "cores, and smaller than Save Image's files on photos; png_fast trades some size for speed; webp and jpeg "
        "are lossy at the given quality. The file is complete on disk when the node finishes."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save, one file each."}),
                "filename_prefix": ("STRING", {
                    "default": DEFAULT_PREFIX,
                    "tooltip": "The files' name before the counter (ZImage -> ZImage_00001_.png); may hold sub "
                               "folders (portraits/ZImage) inside the output folder, and %width%, %height%, "
                               "%year%... or %Node name.widget% as in Save Image. Absolute paths and '..' are "
                               "refused.",
                }),
                "format": (list(image_files.FORMATS), {
                    "default": "png",
                    "tooltip": "png: lossless, smaller than Save Image on photos, on all CPU cores (default). "
                               "png_fast: lossless, run-length coding only: fastest, larger files. webp: lossy, "
                               "smallest files; ComfyUI reads its workflow back. jpeg: lossy, fast; ComfyUI cannot "
                               "load a workflow from a JPEG (the metadata is still in its EXIF).",
                }),
                "quality": ("INT", {
                    "default": 90, "min": 1, "max": 100,
                    "tooltip": "Quality of webp and jpeg (1-100); png ignores it (always lossless).",
                }),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    # No VALIDATE_INPUTS for the prefix, on purpose: when one output node of a prompt fails validation,
    # ComfyUI 0.3.75 still runs the others (here the probe) and /history reports success with no file.
    # A bad prefix must be an error, so it is refused when the node runs, as SaveImage refuses it.
    def save(self, images, filename_prefix=DEFAULT_PREFIX, format="png", quality=90, prompt=None,
             extra_pnginfo=None):
        problem = prefix_problem(filename_prefix)
        if problem:
            raise ZImageError(problem)
        pixels = image_files.to_uint8(images)
        _, height, width, _ = pixels.shape
        output_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir, width,
                                                                               height)
        extension = image_files.FORMATS[format][0]
        text = None if _metadata_disabled() else image_files.comfy_metadata(prompt, extra_pnginfo)
        results, timings = [], []
        for batch_number, image in enumerate(pixels):
            file = f"{name.replace('%batch_num%', str(batch_number))}_{counter:05}_{extension}"
            started = time.perf_counter()
            data = image_files.encode(image, format, text, quality)
            encoded = time.perf_counter()
            image_files.write_file(os.path.join(folder, file), data)
            timings.append({"file": file, "bytes": len(data), "encode_s": round(encoded - started, 5),
                            "write_s": round(time.perf_counter() - encoded, 5)})
            results.append({"filename": file, "subfolder": subfolder, "type": "output"})
            counter += 1
        # "images" is exactly SaveImage's; "zimage_save" adds what writing each file cost.
        return {"ui": {"images": results, "zimage_save": timings}}
