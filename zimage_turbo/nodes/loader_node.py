"""Turbo Loader node: picks the model files and settings, loads (or reuses) the pipeline."""

from __future__ import annotations

from ..engine.api import (COMPILE_MODES, MEMORY_MODES, PRECISION_CHOICES, DiffusersFolder, SplitFiles, ZImageError,
                          resolve_device, resolve_precision)
from . import comfy_paths, comfy_runtime
from .constants import CATEGORY, PIPE_TYPE
from .pipe_handle import PipeHandle


class ZImageTurboLoader:
    DESCRIPTION = (
        "Loads Z-Image-Turbo (transformer, Qwen3 text encoder, VAE) straight onto the chosen device and keeps it "
        "there. Loading is cached for the whole server: queuing again, or another loader with the same files and "
        "settings, never reads the weights again. ComfyUI's 'Unload models' releases it."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PIPE_TYPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The loaded pipeline; connect it to the Sampler and the Probe.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (comfy_paths.model_choices(), {
                    "default": "z_image_turbo_bf16.safetensors",
                    "tooltip": "The diffusion model: a file in models/diffusion_models (ComfyUI's split files, e.g. "
                               "z_image_turbo_bf16.safetensors) or a '[diffusers]' folder in models/diffusers, which "
                               "brings its own text encoder and VAE. Only .safetensors files are loaded. Listed: "
                               "Z-Image models first, then the diffusers folders, then files whose header cannot tell. "
                               "Files that are other models (Flux, SD3, SDXL, a LoRA...) are left out; a prompt naming "
                               "one is refused with the reason.",
                }),
                "text_encoder": (comfy_paths.list_files("text_encoders"), {
                    "default": "qwen_3_4b.safetensors",
                    "tooltip": "Qwen3-4B text encoder in models/text_encoders (qwen_3_4b.safetensors). Ignored when "
                               "the model is a diffusers folder. Listed: Qwen3 text encoders first, then files whose "
                               "header cannot tell. CLIP, T5, Gemma, Llama-style encoders and other files that are not "
                               "a Z-Image text encoder are left out; a prompt naming one is refused with the reason.",
                }),
                "vae": (comfy_paths.list_files("vae"), {
                    "default": "ae.safetensors",
                    "tooltip": "The Flux VAE in models/vae (ae.safetensors). Ignored when the model is a diffusers folder. "
                               "Listed: 16-channel VAEs first, then files whose header cannot tell. Stable Diffusion's "
                               "4-channel VAEs, video VAEs and other files that are not a Z-Image VAE are left out; a "
                               "prompt naming one is refused with the reason.",
                }),
                "dtype": (list(PRECISION_CHOICES), {
                    "default": "auto",
                    "tooltip": "Weights and compute precision. auto: bf16 where the device supports it, else fp16. "
                               "fp16 is kept finite by clamping the activations that pass 65504. fp8 (fast): bf16 with "
                               "most of the transformer's matrix products in fp8 (torchao), faster and half the "
                               "transformer's memory, images close to bf16 but not equal; first/last blocks, refiners, "
                               "embedders and final layer stay bf16. Needs a GPU with fp8 tensor cores (RTX 40xx, "
                               "L4/L40, H100/H200, Blackwell) and torchao; refused elsewhere, and with low_vram.",
                }),
                "device": (comfy_runtime.device_choices(), {
                    "default": "auto",
                    "tooltip": "Where the model lives. auto: ComfyUI's device. cuda:N pins it to that GPU; weights go "
                               "straight there from disk.",
                }),
                "memory": (list(MEMORY_MODES), {
                    "default": "resident",
                    "tooltip": "resident: everything stays on the GPU (fastest). offload_text_encoder: the text encoder "
                               "waits in pinned host memory and streams in to encode a new prompt (about 8 GB less). "
                               "low_vram: every block streams in as it runs (slowest, smallest). No effect on CPU.",
                }),
            },
            # Optional, so prompts written before it existed still validate.
            "optional": {
                "compile": (list(COMPILE_MODES), {
                    "default": "auto",
                    "tooltip": "torch.compile of the transformer blocks, text encoder and VAE decoder: about a third "
                               "faster per image. auto: on a CUDA GPU the first images run uncompiled at once while it "
                               "compiles in the background (about a minute at full size the first time, seconds after a "
                               "restart: compiled code is kept in ComfyUI's user folder), then it switches; off on CPU. "
                               "on: compile first, the first image waits (every image from the compiled code). off: never. "
                               "New sizes, prompts, LoRAs and strengths do not recompile. The probe says which path ran. "
                               "Streamed modules (offload modes) are not compiled.",
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model=None):
        # Runs when the prompt is queued: a missing model is reported before anything loads. Only
        # `model` is checked here (it may be a diffusers folder, which ComfyUI's list check does not
        # know): ComfyUI files every message of this function under each input it names, and skips
        # its own list check for them. text_encoder and vae keep ComfyUI's list check, so a missing
        # VAE is reported once, under "vae".
        try:
            _model_source_name(model)
        except ZImageError as exc:
            return str(exc)
        if not model.startswith(comfy_paths.DIFFUSERS_PREFIX):
            # A Flux/SD3 model, a LoRA, a VAE... in models/diffusion_models: left out of the list, refused here with
            # the reason (the text encoder and VAE are refused the same way when the loader runs: see comfy_paths).
            why = comfy_paths.refusal("diffusion_models", model)
            if why:
                return why
        return True

    def load(self, model, text_encoder, vae, dtype, device, memory, compile="auto"):
        source, dev, dt, fp8 = resolve(model, text_encoder, vae, dtype, device)
        handle = PipeHandle(source, dev, dt, memory, compile, fp8)
        handle.get()  # preload now, so the load shows up on this node and the sampler starts warm
        return (handle,)


def resolve(model, text_encoder, vae, dtype, device):
    """The loader's inputs as the engine's cache sees them: (source files, device, dtype, fp8 policy or None).

    Shared with the start-up preload (preload.py), so both find the same cached pipeline.
    """
    source = _source(model, text_encoder, vae)
    dev = resolve_device(device, comfy_runtime.comfy_device())
    dt, fp8 = resolve_precision(dtype, dev)  # fp8 (fast) is refused here where it cannot run, before anything loads
    return source, dev, dt, fp8


def _model_source_name(model):
    if model and model.startswith(comfy_paths.DIFFUSERS_PREFIX):
        return comfy_paths.resolve_diffusers_folder(model)
    return comfy_paths.resolve_file("diffusion_models", model)


def _source(model, text_encoder, vae):
    if model and model.startswith(comfy_paths.DIFFUSERS_PREFIX):
        return DiffusersFolder(comfy_paths.resolve_diffusers_folder(model))
    return SplitFiles(
        comfy_paths.resolve_part("diffusion_models", model),
        comfy_paths.resolve_part("text_encoders", text_encoder),
        comfy_paths.resolve_part("vae", vae),
        comfy_paths.qwen_tokenizer_dir(),
    )
