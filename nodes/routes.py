"""Routes for people serving ComfyUI over its API (and for the tests).

GET  /zimage_turbo/status  which Turbo pipelines are loaded, where, and how big.
POST /zimage_turbo/free    release every Turbo pipeline on every device. ComfyUI's own
                           POST /free unloads the models of ComfyUI's device only, so a
                           pipeline pinned to another GPU needs this.
"""

from __future__ import annotations

import asyncio
import logging

from ..engine import pipeline as engine_pipeline
from ..engine.loading import DTYPE_NAMES


def status() -> dict:
    pipes = []
    for p in engine_pipeline.cached_pipelines():
        weights = sum(t.numel() * t.element_size() for m in (p.transformer, p.text_encoder, p.vae) for t in m.parameters())
        pipes.append({
            "source": p.comps.source.describe(),
            "device": str(p.device),
            "dtype": DTYPE_NAMES[p.dtype],
            "memory": p.memory,
            "compile": p.compile_mode,
            "weight_bytes": weights,
            "lora_slots": p.tstate.lora.slot_count,
            "last_total_s": p.last_report.total_s if p.last_report else None,
        })
    return {"pipelines": pipes}


def free_all() -> None:
    """Release every pipeline, each once no generation is running on it."""
    for pipe in engine_pipeline.cached_pipelines():
        with pipe.lock:
            engine_pipeline.release_pipeline(pipe)


def register() -> None:
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:  # ComfyUI used as a library, without its server
        return
    if getattr(PromptServer, "instance", None) is None:
        return

    @PromptServer.instance.routes.get("/zimage_turbo/status")
    async def zimage_turbo_status(request):
        return web.json_response(status())

    @PromptServer.instance.routes.post("/zimage_turbo/free")
    async def zimage_turbo_free(request):
        # In a worker thread: it waits for a running generation (the pipeline's lock) without
        # stalling the server's event loop.
        await asyncio.get_running_loop().run_in_executor(None, free_all)
        return web.json_response(status())

    logging.getLogger("zimage_turbo").debug("registered /zimage_turbo/status")
