"""What flows along a ZIMAGE_TURBO_PIPE link: the recipe of a pipeline, not its weights.

ComfyUI caches node outputs; if the output held the weights, "Unload models" could
never free them. The handle holds the sources and settings, and fetches the cached
pipeline (loading it again if it was released) each time a node needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import api
from . import comfy_runtime



@dataclass(eq=False)
class PipeHandle:
    source: api.ModelSource
    device: torch.device
    dtype: torch.dtype
    memory: str
    compile_mode: str = "auto"
    fp8: api.Fp8Policy | None = None  # the fp8 (fast) mode's policy

    def __repr__(self) -> str:
        # ComfyUI shows str() of node inputs in its error reports to API clients: file names only.
        precision = api.FP8_CHOICE if self.fp8 is not None else str(self.dtype).replace('torch.', '')
        return (f"ZImageTurboPipe({self.source.describe()}, {self.device}, {precision}, "
                f"{self.memory}, compile={self.compile_mode})")

    def get(self) -> api.TurboPipeline:
        pipe = api.load(self.source, self.device, self.dtype, self.memory, self.compile_mode, self.fp8)
        comfy_runtime.register_with_model_manager(pipe)
        return pipe

    def peek(self) -> api.TurboPipeline | None:
        """The pipeline if it is loaded, else None: never loads (20 GB) just to show something."""
        return api.find(self.source, self.device, self.dtype, self.fp8)
