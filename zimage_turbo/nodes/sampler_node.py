"""Fast 8-step Sampler node: prompt in, IMAGE and LATENT out, on a Turbo pipeline."""

from __future__ import annotations

from ..engine.api import GenerationRequest, combine_stack, prompt_with_trigger_words, stack_trigger_words
from . import comfy_runtime
from .constants import CATEGORY, COMMON_LORA_STACK_TYPE, LORA_STACK_TYPE, PIPE_TYPE, REPORT_TYPE
from .lora_stack_node import common_stack_tooltip, resolve_common_stack


class ZImageTurboSampler:
    DESCRIPTION = (
        "Generates images with Z-Image-Turbo: 8 flow-matching Euler steps, no guidance (cfg 0), shift 3. "
        "An unchanged prompt skips the text encoder; the same inputs and seed give the same image. "
        "LoRAs come from a LoRA Stack and/or another pack's LORA_STACK; their trigger words can be put in front of "
        "the prompt. "
        "The progress bar advances per step and Cancel stops between steps."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "LATENT", REPORT_TYPE)
    RETURN_NAMES = ("images", "latent", "report")
    OUTPUT_TOOLTIPS = (
        "The images, batch x height x width x RGB in 0..1.",
        "The final latents in VAE space (16 channels, 1/8 size), usable by ComfyUI's VAE Decode with ae.safetensors.",
        "What this very generation cost (timings, memory, LoRAs); connect it to the VRAM/Latency Probe.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": (PIPE_TYPE, {"tooltip": "The pipeline from the Turbo Loader."}),
                "prompt": ("STRING", {
                    "multiline": True,
                    "default": "",
                    "tooltip": "What to draw, in Chinese or English (or both). Up to 512 tokens; longer prompts are "
                               "cut and the probe says so.",
                }),
                "negative_prompt": ("STRING", {
                    "multiline": True,
                    "default": "",
                    "tooltip": "What to avoid. Used only when cfg is above 1 (Turbo normally runs without guidance).",
                }),
                "width": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Image width in pixels; must be a multiple of 16."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Image height in pixels; must be a multiple of 16."}),
                "steps": ("INT", {"default": 8, "min": 1, "max": 200,
                                  "tooltip": "Denoising steps; Turbo is distilled for 8 (each step is one transformer call)."}),
                "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance, ComfyUI's scale: 0 or 1 = off (Turbo's setting, "
                                             "one model call per step); above 1 uses the negative prompt and doubles the work."}),
                "shift": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 20.0, "step": 0.05,
                                    "tooltip": "Timestep shift of the flow schedule; Turbo uses 3."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Noise seed; the same seed and inputs give the same image on the same device."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 16,
                                       "tooltip": "Images generated together from one seed."}),
            },
            # Optional, and the new widget last: workflows and API prompts saved before it existed keep their
            # widget values in place and run as before (off).
            "optional": {
                "lora_stack": (LORA_STACK_TYPE, {"tooltip": "LoRAs to apply (from a LoRA Stack). Leave empty for the base model."}),
                "LORA_STACK": (COMMON_LORA_STACK_TYPE, {
                    "tooltip": common_stack_tooltip("after the LoRAs of the lora_stack input (a LoRA on in both is refused)")}),
                "prepend_trigger_words": ("BOOLEAN", {
                    "default": False,
                    "label_on": "on",
                    "label_off": "off",
                    "tooltip": "Put the trigger words of the LoRAs that are on (from the files' metadata) in front of the "
                               "prompt, each one the prompt does not already contain. Off: the prompt is used as written.",
                }),
            },
        }

    def sample(self, pipe, prompt, negative_prompt, width, height, steps, cfg, shift, seed, batch_size, lora_stack=None,
               LORA_STACK=None, prepend_trigger_words=False):  # noqa: N803 -- the input's name is the type's name
        loras = combine_stack(lora_stack or (), resolve_common_stack(LORA_STACK))
        if prepend_trigger_words:
            prompt = prompt_with_trigger_words(prompt, stack_trigger_words(loras))
        request = GenerationRequest(prompt, negative_prompt, width, height, steps, cfg, shift, seed, batch_size)
        request.validate()  # before touching the model: a bad size fails at once
        pipeline = pipe.get()
        result = pipeline.generate(
            request,
            list(loras),
            on_step=comfy_runtime.progress_callback(steps),
            check_interrupt=comfy_runtime.check_interrupt,
            # The settings of *this* loader: two loaders of the same files share one pipeline.
            memory=pipe.memory,
            compile_mode=pipe.compile_mode,
        )
        # The report travels along the link to the probe, so the figures beside an image are that
        # image's, however many samplers share the loader.
        return (result.images, {"samples": result.latents}, result.report)
