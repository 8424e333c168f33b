"""The engine's public face: what the ComfyUI nodes, the routes and tools use, and nothing else of it.

    pipe = api.load(source, device, dtype, memory, compile_mode)   # cached per files/dtype/device
    dtype, fp8 = api.resolve_precision("fp8 (fast)", device)     # a loader's dtype choice; fp8 -> api.load(fp8=)
    result = pipe.generate(api.GenerationRequest(...), loras=[api.LoraSpec(path, 0.8)])
    api.loaded()          # one PipelineStatus per loaded pipeline, without waiting for a load
    api.find(source, device, dtype)   # the loaded pipeline for these files, or None (never loads)
    api.release(pipe) / api.release_all()

Everything a caller needs to name (sources, settings, requests, errors, reports) is re-exported
here, so a caller never imports the engine's internal modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import (
    Fp8UnsupportedError,
    InvalidSettingError,
    LoraKeyError,
    ModelFileError,
    NonFiniteError,
    OutOfMemoryError,
    ZImageError,
)
from .files import image_files
from .files.part_lists import SlotVerdict, slot_verdict
from .files.model_files import (
    DTYPE_NAMES,
    DiffusersFolder,
    ModelSource,
    SplitFiles,
    resolve_device,
    resolve_dtype,
)
from .lora import (
    LoraSpec,
    TriggerWords,
    check_strength,
    combine_stack,
    common_stack_of,
    common_stack_rows,
    prompt_with_trigger_words,
    read_trigger_words,
    stack_trigger_words,
)
from .probing.device_stats import nvml_snapshot
from .probing.report import RunReport
from .sampling import pipeline as _pipeline
from .sampling.acceleration import COMPILE_MODES
from . import head_start as _head_start
from .sampling.compile_cache import configure as configure_compile_cache
from .sampling.fp8_mode import FP8_CHOICE, Fp8Policy
from .sampling import fp8_mode as _fp8_mode
from .sampling.pipeline import GenerationRequest, GenerationResult, TurboPipeline
from .sampling.placement import MEMORY_MODES

__all__ = [
    "COMPILE_MODES", "DTYPE_NAMES", "MEMORY_MODES", "PRECISION_CHOICES", "FP8_CHOICE", "Fp8Policy",
    "Fp8UnsupportedError", "resolve_precision", "precision_name", "DiffusersFolder", "GenerationRequest", "GenerationResult",
    "InvalidSettingError", "LoraKeyError", "LoraSpec", "ModelFileError", "ModelSource", "NonFiniteError",
    "OutOfMemoryError", "PipelineStatus", "RunReport", "SplitFiles", "TurboPipeline", "ZImageError",
    "check_strength", "combine_stack", "find_loaded", "slot_verdict", "SlotVerdict", "configure_compile_cache", "image_files", "nvml_snapshot", "find", "load", "prepare_imports", "loaded", "release", "release_all", "resolve_device",
    "resolve_dtype",
    # LoRA stacks: ComfyUI's common LORA_STACK type in and out, trigger words
    "TriggerWords", "common_stack_of", "common_stack_rows", "prompt_with_trigger_words", "read_trigger_words",
    "stack_trigger_words",
]


# The loader's dtype choices: the weights' dtypes, and the opt-in fp8 mode (bf16 with most block matrices in fp8).
PRECISION_CHOICES = ("auto", "bf16", "fp16", "fp32", FP8_CHOICE)


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype, Fp8Policy | None]:
    """A loader's dtype choice as (weights' dtype, fp8 policy or None). "fp8 (fast)" is refused here, before
    anything loads, where it cannot run (Fp8UnsupportedError says what to choose instead); its policy comes from
    ZIMAGE_TURBO_FP8_POLICY (default: "default")."""
    if name == FP8_CHOICE:
        _fp8_mode.check_supported(device)
        return torch.bfloat16, _fp8_mode.policy_from_env()
    return resolve_dtype(name, device), None


def precision_name(dtype: torch.dtype, fp8: Fp8Policy | None) -> str:
    """How a status page names a pipeline's precision: bf16 / fp16 / fp32 / fp8 (fast)."""
    return FP8_CHOICE if fp8 is not None else DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class PipelineStatus:
    """What a status page shows of one loaded pipeline (file names relative to their model folders)."""

    source: str
    device: str
    dtype: str
    memory: str
    compile: str
    compile_status: dict
    weight_bytes: int
    lora_path: str
    lora_slots: int
    last_total_s: float | None
    pipe: TurboPipeline

    def to_dict(self) -> dict:
        return {"source": self.source, "device": self.device, "dtype": self.dtype, "memory": self.memory,
                "compile": self.compile, "compile_status": self.compile_status, "weight_bytes": self.weight_bytes,
                "lora_path": self.lora_path, "lora_slots": self.lora_slots, "last_total_s": self.last_total_s}



def prepare_imports(compiler: bool) -> None:
    """Start the heavy imports (model classes; torch's compiler when `compiler`) on a background thread, now.

    For the node pack to call while ComfyUI starts: the first image then does not wait for them.
    """
    _head_start.import_model_classes()
    if compiler:
        _head_start.import_compiler()


def load(source: ModelSource, device: torch.device, dtype: torch.dtype, memory: str = "resident",
         compile_mode: str = "auto", fp8: Fp8Policy | None = None) -> TurboPipeline:
    """The cached pipeline for these files/dtype/device (and fp8 policy, see resolve_precision), loading what is missing."""
    return _pipeline.get_pipeline(source, device, dtype, memory, compile_mode, fp8)


def _snapshot() -> list[TurboPipeline]:
    # The registry's lock is held for a whole load (seconds to minutes); a status page must answer
    # at once, "loading" included. Copying the values is one step under the GIL.
    return list(_pipeline._PIPELINES.values())


def loaded() -> list[PipelineStatus]:
    out = []
    for p in _snapshot():
        out.append(PipelineStatus(
            source=p.comps.source.describe(), device=str(p.device), dtype=precision_name(p.dtype, p.fp8), memory=p.memory,
            compile=p.compile_mode, compile_status=p.compile_status(), weight_bytes=p.weight_bytes(),
            lora_path=p.tstate.lora.path, lora_slots=p.tstate.lora.slot_count,
            last_total_s=p.last_report.total_s if p.last_report else None, pipe=p))
    return out


def find_loaded(pipe: TurboPipeline) -> bool:
    """Is this pipeline still loaded (not released)? Never waits for a load in progress."""
    return any(p is pipe for p in _snapshot())


def find(source: ModelSource, device: torch.device, dtype: torch.dtype,
         fp8: Fp8Policy | None = None) -> TurboPipeline | None:
    """The loaded pipeline for these files, dtype, device (and fp8 policy), or None: never loads anything."""
    for p in _snapshot():
        if p.comps.source == source and p.device == device and p.dtype == dtype and p.fp8 == fp8:
            return p
    return None


def release(pipe: TurboPipeline, wait: bool = True, collect: bool = True) -> int:
    """Forget this pipeline and the components no other one uses.

    wait: after its running generation (its lock). collect=False skips gc.collect(), and wait=False
    the lock, for callers inside someone else's bookkeeping (ComfyUI's unload loop).
    """
    if not wait:
        return _pipeline.release_pipeline(pipe, collect=collect)
    with pipe.lock:
        return _pipeline.release_pipeline(pipe, collect=collect)


def release_all() -> int:
    return _pipeline.release_all()
