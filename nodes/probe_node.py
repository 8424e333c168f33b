"""VRAM/Latency Probe node: passes images through and reports what the last generation cost."""

from __future__ import annotations

import json

import torch

from ..engine import device_stats
from .loader_node import CATEGORY
from .pipe_handle import PIPE_TYPE


class ZImageTurboProbe:
    DESCRIPTION = (
        "Passes the images through and reports the last generation on this pipeline: seconds per phase (load, "
        "LoRA apply, text encode, denoise and per step, VAE decode, total), torch's peak and current memory, and "
        "NVML memory / utilization / temperature of that very GPU (on CPU: process RSS). Measured with "
        "synchronised timers, not estimated."
    )
    CATEGORY = CATEGORY
    FUNCTION = "probe"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("images", "report", "json", "chart")
    OUTPUT_TOOLTIPS = (
        "The input images, unchanged.",
        "A readable report.",
        "The same figures as JSON.",
        "A bar chart of the phase times.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": (PIPE_TYPE, {"tooltip": "The pipeline whose last generation is reported."}),
                "images": ("IMAGE", {"tooltip": "Images to pass through; links the probe after the sampler."}),
            }
        }

    def probe(self, pipe, images):
        report = pipe.last_report
        if report is None:
            text = "No generation has run on this pipeline yet."
            data = {"device": str(pipe.device), "nvml": device_stats.nvml_snapshot(pipe.device)}
            chart = torch.zeros((1, 64, 64, 3))
        else:
            text = report.to_text()
            data = report.to_dict()
            chart = torch.from_numpy(report.chart())[None]
        as_json = json.dumps(data, default=str)
        return {"ui": {"text": [text], "zimage_probe": [data]}, "result": (images, text, as_json, chart)}
