"""GET /zimage_turbo/status: which Turbo pipelines are loaded, where, and how big.

For people serving ComfyUI over its API (and for the tests): after POST /free, this
shows when the pipelines are really gone.
"""

from __future__ import annotations

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

    logging.getLogger("zimage_turbo").debug("registered /zimage_turbo/status")
