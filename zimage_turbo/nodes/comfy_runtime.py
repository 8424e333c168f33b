"""The few places where the nodes talk to ComfyUI's runtime: device, progress, cancel, memory.

Our pipelines register with ComfyUI's model manager through a ModelPatcher that
stands for the whole pipeline (its real size, its device). When ComfyUI unloads
models, for "Unload models" / POST /free or to make room for another model, the
patcher's detach callback releases the pipeline so its memory really goes back.
"""

from __future__ import annotations

import logging
import weakref

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
from comfy.patcher_extension import CallbacksMP

from ..engine import api
from . import comfy_paths, constants

log = logging.getLogger("zimage_turbo")
# ZIMAGE_TURBO_CACHE_DIR, when set, wins over this (engine/compile_cache.py).
api.configure_compile_cache(comfy_paths.compile_cache_dir())


def head_start_wanted(environ=None) -> bool:
    """False when ZIMAGE_TURBO_HEAD_START says 0/off/false/no: a server that never runs a Z-Image graph then pays
    neither the import's CPU after its start (4-7 s on a GPU host) nor the memory of diffusers' model classes."""
    import os

    value = (os.environ if environ is None else environ).get(constants.HEAD_START_ENV, "").strip().lower()
    return value not in ("0", "off", "false", "no")


def start_imports_with_server() -> None:
    """Once ComfyUI has imported every custom node, import the model classes on a background thread: the first
    image then need not. Not torch's compiler: by default the first image runs eagerly and the compile comes after
    it (warmup.py); imported beside the first image, the compiler took the interpreter from it (H100: a cold first
    image waited 3.8 s for it). ZIMAGE_TURBO_HEAD_START=0 turns this off (head_start_wanted).

    Not at our own import: a pack imported after ours could be importing diffusers at that very moment.
    Without a running server (the pack used as a library, tests) it does nothing; loading imports on demand.
    """
    if not head_start_wanted():
        log.info("Z-Image Turbo: %s is off: the model classes are imported at the first load",
                 constants.HEAD_START_ENV)
        return
    try:
        from server import PromptServer

        instance = getattr(PromptServer, "instance", None)
        if instance is None:
            return

        async def on_startup(app):
            api.prepare_imports(compiler=False)

        try:
            instance.app.on_startup.append(on_startup)
        except (AttributeError, RuntimeError):  # no aiohttp app to hook, or it already runs
            api.prepare_imports(compiler=False)
    except ImportError:
        return
    except Exception:  # noqa: BLE001 - a head start is never worth a failed start
        log.exception("Z-Image Turbo could not schedule its imports; they happen at the first load instead")


def device_choices() -> list[str]:
    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return choices


def comfy_device() -> torch.device:
    return mm.get_torch_device()


def progress_callback(total: int):
    bar = comfy.utils.ProgressBar(total)
    return lambda done, total_: bar.update_absolute(done, total_)


def check_interrupt() -> None:
    mm.throw_exception_if_processing_interrupted()


class _PipelineStandIn(torch.nn.Module):
    """A weightless module ComfyUI's manager can hold in place of the pipeline."""


class PipelinePatcher(comfy.model_patcher.ModelPatcher):
    """Reports the pipeline's size as loaded; never moves weights itself."""

    def __init__(self, pipe: api.TurboPipeline, size: int):
        super().__init__(_PipelineStandIn(), load_device=pipe.device, offload_device=torch.device("cpu"), size=size)
        self.model.model_loaded_weight_memory = size
        self.pipe_ref = weakref.ref(pipe)

    def loaded_size(self):
        return self.size if self.pipe_ref() is not None else 0

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        return 0

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        return 0


def _on_detach(patcher: PipelinePatcher, unpatch_all: bool) -> None:
    # load_models_gpu also detaches (unpatch_all=False) and re-attaches models that are already
    # loaded; only a real unload (unpatch_all=True) releases the pipeline.
    pipe = patcher.pipe_ref()
    if pipe is None or not unpatch_all:
        return
    log.info("Z-Image Turbo: ComfyUI unloaded models; releasing the pipeline on %s", pipe.device)
    # We are inside ComfyUI's free_memory loop: only drop references here. No gc.collect() and
    # the patcher stays alive, because a finalizer running now would edit the list ComfyUI is
    # iterating (and stop its prompt worker).
    api.release(pipe, wait=False, collect=False)


_PATCHERS: dict[int, PipelinePatcher] = {}


def register_with_model_manager(pipe: api.TurboPipeline) -> None:
    """Tell ComfyUI this pipeline is loaded (again, after an unload); cheap when already known."""
    for key, old in list(_PATCHERS.items()):  # patchers of released pipelines, safe to drop here
        if old.pipe_ref() is None:
            del _PATCHERS[key]
    patcher = _PATCHERS.get(id(pipe))
    if patcher is None or patcher.pipe_ref() is not pipe:
        patcher = PipelinePatcher(pipe, pipe.weight_bytes())
        patcher.add_callback(CallbacksMP.ON_DETACH, _on_detach)
        _PATCHERS[id(pipe)] = patcher
    mm.load_models_gpu([patcher], force_full_load=True)
