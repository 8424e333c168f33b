"""VRAM/Latency Probe node: passes images through and reports what the last generation cost."""

from __future__ import annotations

import json

import torch

from ..engine import api
from .constants import CATEGORY, PIPE_TYPE, REPORT_TYPE


class ZImageTurboProbe:
    DESCRIPTION = (
        "Passes the images through and reports the generation that made them (connect the sampler's report): "
        "seconds per phase (load, "
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
                "images": ("IMAGE", {"tooltip": "Images to pass through; links the probe after the sampler."}),
            },
            "optional": {
                "report": (REPORT_TYPE, {"tooltip": "The sampler's report output: the figures of the generation "
                                                    "that made these images."}),
                "pipe": (PIPE_TYPE, {"tooltip": "Only for workflows saved before the report output existed: "
                                                "reports the last generation on this pipeline, which with several "
                                                "samplers may be another image's. Connect the report instead."}),
            },
        }

    def probe(self, images, report=None, pipe=None):
        note = ""
        if report is None and pipe is not None:
            # Saved before the sampler had a report output: the pipeline's last generation.
            loaded = pipe.peek()  # a released pipeline is not loaded again just for its old report
            report = loaded.last_report if loaded is not None else None
            note = ("(last generation on this pipeline: connect the sampler's report output to this probe for the "
                    "figures of these very images)\n")
        if report is None:
            text = "No report: connect the sampler's report output to this probe."
            device = pipe.device if pipe is not None else "cpu"
            data = {"device": str(device), "nvml": api.nvml_snapshot(device)}
            chart = torch.zeros((1, 64, 64, 3))
        else:
            text = note + report.to_text()
            data = report.to_dict()
            chart = torch.from_numpy(report.chart())[None]
        as_json = json.dumps(data, default=str)
        return {"ui": {"text": [text], "zimage_probe": [data]}, "result": (images, text, as_json, chart)}
