"""Routes for people serving ComfyUI over its API (and for the tests).

GET  /zimage_turbo/status  which Turbo pipelines are loaded, where, and how big.
POST /zimage_turbo/free    release every Turbo pipeline on every device. ComfyUI's own
                           POST /free unloads the models of ComfyUI's device only, so a
                           pipeline pinned to another GPU needs this.
POST /zimage_turbo/preload load (and warm) pipelines in the background: the body is the
                           preload config's JSON (an empty body: the configured one again);
                           answers 202 at once, or 400 naming what is wrong (preload.py).
"""

from __future__ import annotations

import asyncio
import logging

from ..engine import api
from . import preload


def status() -> dict:
    pipes = []
    for st in api.loaded():  # never waits for a load in progress: this runs on the event loop
        pipes.append({**st.to_dict(), "preloaded": preload.PRELOADER.preloaded(st.pipe)})
    return {"pipelines": pipes, "preload": preload.PRELOADER.status()}


def free_all() -> None:
    """Release every pipeline, each once no generation is running on it."""
    for st in api.loaded():
        api.release(st.pipe)


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

    @PromptServer.instance.routes.post("/zimage_turbo/preload")
    async def zimage_turbo_preload(request):
        raw = await request.read()
        # In a worker thread: the config file and the model folders are read.
        code, body = await asyncio.get_running_loop().run_in_executor(None, preload.request_from_body, raw)
        if code == 202:
            body = status()
        return web.json_response(body, status=code)

    logging.getLogger("zimage_turbo").debug("registered /zimage_turbo/status")
