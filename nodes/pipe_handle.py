"""What flows along a ZIMAGE_TURBO_PIPE link: the recipe of a pipeline, not its weights.

ComfyUI caches node outputs; if the output held the weights, "Unload models" could
never free them. The handle holds the sources and settings, and fetches the cached
pipeline (loading it again if it was released) each time a node needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.loading import ModelSource
from ..engine.pipeline import TurboPipeline, get_pipeline
from . import comfy_runtime



@dataclass(eq=False)
class PipeHandle:
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    memory: str
    compile_mode: str = "auto"

    def __repr__(self) -> str:
        # ComfyUI shows str() of node inputs in its error reports to API clients: file names only.
        return (f"ZImageTurboPipe({self.source.describe()}, {self.device}, {str(self.dtype).replace('torch.', '')}, "
                f"{self.memory}, compile={self.compile_mode})")

    def get(self) -> TurboPipeline:
        pipe = get_pipeline(self.source, self.device, self.dtype, self.memory, self.compile_mode)
        comfy_runtime.register_with_model_manager(pipe)
        return pipe
