"""The front door: Serve's ingress deployment, one replica, in front of the ComfyUI replicas.

It speaks ComfyUI's API, so existing clients point at it unchanged: POST /prompt (ComfyUI's validation error comes
back as HTTP 400, as from ComfyUI), GET /history[/{id}], GET /view, GET /queue, POST /queue and /interrupt, the
/ws websocket with the prompt's messages, and read-only GETs (/object_info, /system_stats ...) answered by a
replica. POST /zimage_serve/run takes any API-format workflow and answers with its images (base64) and the probe
reports when the graph has a probe; GET /zimage_serve/status counts what happened.

Each prompt is one streaming call to the replica deployment through Ray Serve's handle: Serve picks the replica
(least loaded of two random ones, its default), queues while every replica is busy, and keeps the replica set
healthy. What this class adds is the retry: when a replica's ComfyUI dies (or the replica itself), the prompt is
sent again through the handle, so Serve gives it to another replica; the same graph with the same seed makes the
same image. A prompt that ComfyUI was *running* when it died, twice, is not sent a third time (a prompt that kills
ComfyUI would otherwise take down every replica in turn).

The results (history entries and the files' bytes) of the last `keep_results` prompts stay in memory here; a
replica's files are renamed under the prompt's id (subfolder), since every replica numbers its own files.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations (Request, WebSocket)
# as real classes once Serve has wrapped the methods.
import asyncio
import base64
import contextlib
import itertools
import json
import logging
import mimetypes
import time
import urllib.parse
import uuid
from collections import Counter, OrderedDict, defaultdict
from dataclasses import asdict, dataclass, field

import ray.exceptions as rex
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from ray import serve
from ray.serve import exceptions as serve_exceptions

from .prompts import (PromptShapeError, check_graph, is_terminal, lora_key, parse_prompt_request, probe_reports,
                      rename_outputs, renamed_subfolder, rewrite_message)
from .replica import ComfyUnavailable

log = logging.getLogger("ray.serve")

ROUTES = ("least_loaded", "lora")
# What may go wrong with a replica rather than with the prompt: the prompt is sent again.
RETRYABLE = (ComfyUnavailable, rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.OwnerDiedError,
             rex.ObjectLostError, rex.LocalRayletDiedError, rex.OutOfMemoryError,
             serve_exceptions.ReplicaUnavailableError, serve_exceptions.DeploymentUnavailableError)
PROXIED = ("/object_info", "/system_stats", "/embeddings", "/extensions", "/features", "/models",
           "/zimage_turbo/status")


@dataclass
class FrontSettings:
    route: str = "least_loaded"  # or "lora": prompts with the same LoRA set prefer the replica that ran it last
    retry_window_s: float = 600.0  # how long a prompt may wait for a working replica, retries included
    max_crashes: int = 2  # a prompt that was running when ComfyUI died this often is not sent again
    keep_results: int = 500  # finished prompts whose history and files stay here
    keep_bytes: int = 2 << 30  # and at most this many bytes of files

    def __post_init__(self):
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, not {self.route!r}")


@dataclass
class Job:
    id: str
    number: int
    graph: dict
    extra_data: dict
    client_id: str | None
    lora_key: str
    route: str
    created: float = field(default_factory=time.monotonic)
    state: str = "pending"  # pending -> running -> success | error | interrupted | rejected | lost
    accepted: asyncio.Future | None = None  # ("queued", info) | ("rejected", status, body) | ("lost", message)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    history: dict | None = None
    rejection: tuple | None = None
    attempts: int = 0
    started: bool = False  # this attempt's ComfyUI began executing it
    node_errors: dict = field(default_factory=dict)  # ComfyUI runs a prompt whose other outputs are valid
    crashes: int = 0
    replicas: list = field(default_factory=list)
    error: str | None = None
    file_keys: list = field(default_factory=list)
    file_bytes: int = 0
    finished: float | None = None
    task: asyncio.Task | None = None

    def queue_row(self) -> list:
        return [self.number, self.id, self.graph, self.extra_data, sorted(self.graph)]


def _json(data, status: int = 200) -> Response:
    # json.dumps allows NaN like ComfyUI's own answers (a prompt may carry NaN, and its history echoes it).
    return Response(json.dumps(data), status_code=status, media_type="application/json")


def _bad_request(message: str, details: str = "") -> Response:
    return _json(PromptShapeError(message, details).body(), 400)


app = FastAPI(title="Z-Image Turbo on Ray Serve", docs_url=None, redoc_url=None)


@serve.ingress(app)
class FrontDoor:
    def __init__(self, replicas, settings: dict):
        self.replicas = replicas
        self.settings = FrontSettings(**settings)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.files: dict[tuple, bytes] = {}
        self.sockets: dict[str, set] = defaultdict(set)
        self.numbers = itertools.count()
        self.counts: Counter = Counter()
        self._tasks: set = set()

    # ------------------------------------------------------------------ the prompt's life

    def _new_job(self, graph: dict, extra_data: dict, client_id: str | None, route: str | None) -> Job:
        options = extra_data.pop("zimage_serve", None) or {}
        route = route or (options.get("route") if isinstance(options, dict) else None) or self.settings.route
        if route not in ROUTES:
            raise PromptShapeError(f"route must be one of {', '.join(ROUTES)}", f"got {route!r}")
        job = Job(uuid.uuid4().hex, next(self.numbers), graph, extra_data, client_id, lora_key(graph), route)
        job.accepted = asyncio.get_running_loop().create_future()
        self.jobs[job.id] = job
        job.task = asyncio.create_task(self._drive(job))
        self.counts["prompts"] += 1
        return job

    async def _drive(self, job: Job) -> None:
        deadline = time.monotonic() + self.settings.retry_window_s
        try:
            while True:
                job.attempts += 1
                try:
                    if await self._attempt(job):
                        return
                    raise ComfyUnavailable("the replica's stream ended without a result")
                except RETRYABLE as exc:
                    job.crashes += job.started
                    self.counts["retries"] += 1
                    log.warning("prompt %s, attempt %d: %s", job.id, job.attempts, exc)
                    if job.crashes >= self.settings.max_crashes:
                        return self._lose(job, f"ComfyUI stopped while running this prompt on {job.crashes} replicas; "
                                               "it is not tried again")
                    if time.monotonic() > deadline:
                        return self._lose(job, f"no replica could run it within {self.settings.retry_window_s:g} s "
                                               f"({job.attempts} attempts; last: {exc})")
                    await asyncio.sleep(min(0.25 * 2 ** min(job.attempts - 1, 4), 2.0))
        except asyncio.CancelledError:
            self._end(job, "interrupted", error="interrupted by a client")
            await self._send(job.client_id, {"type": "execution_interrupted", "data": {
                "prompt_id": job.id, "node_id": None, "node_type": None, "executed": [],
                "timestamp": int(time.time() * 1000)}})
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must still end the prompt, with a message
            log.exception("prompt %s failed in the front door", job.id)
            self._lose(job, f"internal error: {type(exc).__name__}: {exc}")

    async def _attempt(self, job: Job) -> bool:
        """One call to a replica; True once the prompt has ended (result stored, or rejected)."""
        opts = {"stream": True}
        if job.route == "lora" and job.lora_key:
            opts["multiplexed_model_id"] = job.lora_key
        payload = {"prompt_id": job.id if job.attempts == 1 else f"{job.id}-{job.attempts}", "graph": job.graph,
                   "extra_data": job.extra_data, "lora_key": job.lora_key}
        held = []  # the end messages wait until history and files are here: a client may ask for them at once
        job.started = False
        async for ev in self.replicas.options(**opts).run.remote(payload):
            kind = ev["event"]
            if kind == "queued":
                job.node_errors = ev.get("node_errors") or {}
                if job.state == "pending":
                    job.state = "running"
                    if not job.accepted.done():
                        job.accepted.set_result(("queued", ev))
                    await self._broadcast_status()
            elif kind == "rejected":
                job.rejection = (ev["status"], ev["body"])
                self._end(job, "rejected")
                if not job.accepted.done():
                    job.accepted.set_result(("rejected", ev["status"], ev["body"]))
                return True
            elif kind == "message":
                msg = rewrite_message(ev["message"], job.id)
                job.started = job.started or msg.get("type") == "execution_start"
                if is_terminal(msg):
                    held.append(msg)
                else:
                    await self._send(job.client_id, msg)
            elif kind == "result":
                self._store(job, ev)
                for msg in held:
                    await self._send(job.client_id, msg)
                await self._broadcast_status()
                return True
            elif kind == "failed":
                self._end(job, "error", error=ev.get("reason"))
                await self._send(job.client_id, self._error_message(job, "TimeoutError", job.error))
                return True
        return False

    def _store(self, job: Job, ev: dict) -> None:
        entry = dict(ev["history"])
        entry["outputs"] = rename_outputs(entry.get("outputs") or {}, job.id)
        if isinstance(entry.get("prompt"), list) and len(entry["prompt"]) >= 2:
            entry["prompt"] = [job.number, job.id, *entry["prompt"][2:]]
        replica = {k: ev.get(k) for k in ("replica", "node_id", "node_ip", "gpu")}
        job.replicas.append(replica)
        entry["zimage_serve"] = {**replica, "attempts": job.attempts, "fetch_s": ev.get("fetch_s")}
        for f in ev["files"]:
            key = (f["type"], renamed_subfolder(job.id, f.get("subfolder", "")), f["filename"])
            self.files[key] = f["data"]
            job.file_keys.append(key)
            job.file_bytes += len(f["data"])
        job.history = entry
        status = (entry.get("status") or {}).get("status_str")
        messages = [m[0] for m in (entry.get("status") or {}).get("messages", []) if isinstance(m, list) and m]
        state = ("success" if status == "success" else
                 "interrupted" if "execution_interrupted" in messages else "error")
        self._end(job, state)

    def _end(self, job: Job, state: str, error: str | None = None) -> None:
        if job.done.is_set():
            return
        job.state, job.error, job.finished = state, error or job.error, time.monotonic()
        if job.history is None and state in ("error", "interrupted", "lost"):
            kind = "execution_interrupted" if state == "interrupted" else "execution_error"
            job.history = {"prompt": job.queue_row(), "outputs": {},
                           "status": {"status_str": "error", "completed": False,
                                      "messages": [[kind, self._error_message(job, "ReplicaUnavailable", error)["data"]]]},
                           "zimage_serve": {"attempts": job.attempts}}
        if state == "rejected":  # ComfyUI keeps no history of refused prompts
            self.jobs.pop(job.id, None)
        self.counts[state] += 1
        job.done.set()
        self._evict()

    def _lose(self, job: Job, message: str) -> None:
        log.error("prompt %s lost: %s", job.id, message)
        self._end(job, "lost", error=message)
        if not job.accepted.done():
            job.accepted.set_result(("lost", message))
        else:
            task = asyncio.ensure_future(self._send(job.client_id, self._error_message(job, "ReplicaUnavailable", message)))
            self._tasks.add(task)  # a reference until it ends (the loop keeps only weak ones)
            task.add_done_callback(self._tasks.discard)

    def _error_message(self, job: Job, kind: str, message: str | None) -> dict:
        return {"type": "execution_error", "data": {
            "prompt_id": job.id, "node_id": None, "node_type": None, "executed": [], "exception_type": kind,
            "exception_message": message or "", "traceback": [], "current_inputs": {}, "current_outputs": {},
            "timestamp": int(time.time() * 1000)}}

    def _evict(self) -> None:
        done = [j for j in self.jobs.values() if j.done.is_set()]
        total = sum(j.file_bytes for j in done)
        for j in done:
            if len(done) <= self.settings.keep_results and total <= self.settings.keep_bytes:
                break
            self.jobs.pop(j.id, None)
            for key in j.file_keys:
                self.files.pop(key, None)
            total -= j.file_bytes
            done = done[1:]

    @staticmethod
    async def _admit(job: Job) -> tuple:
        """Wait until a replica's ComfyUI queued the prompt or refused it (shielded: a client that hangs up does not
        cancel the prompt, as with ComfyUI)."""
        return await asyncio.shield(job.accepted)

    # ------------------------------------------------------------------ websocket

    async def _send(self, client_id: str | None, msg: dict) -> None:
        if not client_id:
            return
        text = json.dumps(msg)
        for ws in list(self.sockets.get(client_id, ())):
            try:
                await ws.send_text(text)
            except Exception:  # noqa: BLE001 - the client went away
                self.sockets[client_id].discard(ws)

    def _queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": sum(1 for j in self.jobs.values() if not j.done.is_set())}}

    async def _broadcast_status(self) -> None:
        text = json.dumps({"type": "status", "data": {"status": self._queue_info()}})
        for cid, sockets in list(self.sockets.items()):
            for ws in list(sockets):
                try:
                    await ws.send_text(text)
                except Exception:  # noqa: BLE001
                    sockets.discard(ws)

    @app.websocket("/ws")
    async def websocket(self, websocket: WebSocket):
        cid = websocket.query_params.get("clientId") or uuid.uuid4().hex
        await websocket.accept()
        self.sockets[cid].add(websocket)
        try:
            await websocket.send_text(json.dumps({"type": "status", "data": {"status": self._queue_info(), "sid": cid}}))
            first = True
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if first and msg.get("text"):
                    with contextlib.suppress(ValueError):
                        if json.loads(msg["text"]).get("type") == "feature_flags":
                            await websocket.send_text(json.dumps({"type": "feature_flags", "data": {}}))
                first = False
        finally:
            self.sockets[cid].discard(websocket)
            if not self.sockets[cid]:
                self.sockets.pop(cid, None)

    # ------------------------------------------------------------------ ComfyUI's routes

    @app.post("/prompt")
    async def post_prompt(self, request: Request):
        try:
            graph, extra, client_id = parse_prompt_request(await self._body(request))
            job = self._new_job(graph, extra, client_id, None)
        except PromptShapeError as exc:
            return _json(exc.body(), 400)
        outcome = await self._admit(job)
        if outcome[0] == "rejected":
            return _json(outcome[2], outcome[1])
        if outcome[0] == "lost":
            return _json({"error": {"type": "no_replica", "message": outcome[1], "details": outcome[1],
                                    "extra_info": {}}, "node_errors": {}}, 503)
        return _json({"prompt_id": job.id, "number": job.number, "node_errors": outcome[1].get("node_errors") or {}})

    @app.get("/prompt")
    async def get_prompt(self):
        return _json(self._queue_info())

    @app.get("/history")
    async def get_history(self, max_items: int | None = None):
        done = [j for j in self.jobs.values() if j.done.is_set() and j.history is not None]
        if max_items is not None:
            done = done[-max_items:] if max_items > 0 else []
        return _json({j.id: j.history for j in done})

    @app.get("/history/{prompt_id}")
    async def get_history_of(self, prompt_id: str):
        job = self.jobs.get(prompt_id)
        if job is None or not job.done.is_set() or job.history is None:
            return _json({})
        return _json({prompt_id: job.history})

    @app.post("/history")
    async def post_history(self, request: Request):
        body = await self._body_or_empty(request)
        ids = [j.id for j in self.jobs.values() if j.done.is_set()] if body.get("clear") else body.get("delete") or []
        for pid in ids:
            job = self.jobs.get(pid)
            if job is not None and job.done.is_set():
                self.jobs.pop(pid)
                for key in job.file_keys:
                    self.files.pop(key, None)
        return Response(status_code=200)

    @app.get("/view")
    async def view(self, filename: str = "", subfolder: str = "", type: str = "output"):  # noqa: A002 - ComfyUI's name
        data = self.files.get((type, subfolder, filename))
        if data is None:
            return Response(status_code=404)
        mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return Response(data, media_type=mime, headers={"Content-Disposition": f'filename="{filename}"'})

    @app.get("/queue")
    async def get_queue(self):
        live = [j for j in self.jobs.values() if not j.done.is_set()]
        return _json({"queue_running": [j.queue_row() for j in live if j.state == "running"],
                      "queue_pending": [j.queue_row() for j in live if j.state == "pending"]})

    @app.post("/queue")
    async def post_queue(self, request: Request):
        body = await self._body_or_empty(request)
        live = [j for j in self.jobs.values() if not j.done.is_set()]
        ids = {j.id for j in live if j.state == "pending"} if body.get("clear") else set(body.get("delete") or [])
        for job in live:
            if job.id in ids:
                job.task.cancel()
        return Response(status_code=200)

    @app.post("/interrupt")
    async def post_interrupt(self, request: Request):
        """With a prompt_id: stop that prompt. Without: stop every running prompt (ComfyUI's global interrupt
        stops the one prompt a server runs; here every replica's)."""
        pid = (await self._body_or_empty(request)).get("prompt_id")
        for job in [j for j in self.jobs.values() if not j.done.is_set()]:
            if job.id == pid or (pid is None and job.state == "running"):
                job.task.cancel()
        return Response(status_code=200)

    @app.post("/free")
    async def post_free(self):
        return _json({"error": "POST /free is not served by the front door: it would reach one replica of many. "
                               "Scale the deployment down, or call /free on a replica's own ComfyUI."}, 501)

    @app.get("/object_info")
    async def object_info(self, request: Request):
        return await self._proxy(request)

    @app.get("/object_info/{node_class}")
    async def object_info_of(self, request: Request):
        return await self._proxy(request)

    @app.get("/system_stats")
    async def system_stats(self, request: Request):
        return await self._proxy(request)

    @app.get("/models")
    async def models(self, request: Request):
        return await self._proxy(request)

    @app.get("/models/{folder}")
    async def models_of(self, request: Request):
        return await self._proxy(request)

    @app.get("/embeddings")
    async def embeddings(self, request: Request):
        return await self._proxy(request)

    @app.get("/extensions")
    async def extensions(self, request: Request):
        return await self._proxy(request)

    @app.get("/features")
    async def features(self, request: Request):
        return await self._proxy(request)

    @app.get("/zimage_turbo/status")
    async def pack_status(self, request: Request):
        return await self._proxy(request)

    async def _proxy(self, request: Request) -> Response:
        path_q = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        for attempt in range(5):
            try:
                status, ctype, body = await self.replicas.comfy_get.remote(path_q)
                return Response(body, status_code=status, media_type=ctype)
            except RETRYABLE:
                await asyncio.sleep(0.5 * (attempt + 1))
        return _json({"error": "no replica answered"}, 503)

    # ------------------------------------------------------------------ this package's routes

    @app.post("/zimage_serve/run")
    async def run(self, request: Request):
        """Body: an API-format workflow, or {"prompt": workflow, "extra_data"?, "route"?, "include_data"?}.
        200: {"status": "success", "images": [...], "probe": {...}, ...}; 400: ComfyUI's validation error; 422: the
        graph failed while running (its error); 503: no replica could run it."""
        try:
            body = await self._body(request)
        except PromptShapeError as exc:
            return _json(exc.body(), 400)
        if isinstance(body, dict) and isinstance(body.get("prompt"), dict) and "class_type" not in body["prompt"]:
            graph, extra, route = body["prompt"], body.get("extra_data") or {}, body.get("route")
            include = body.get("include_data", True) is not False
        else:
            graph, extra, route, include = body, {}, None, True
        try:
            if not isinstance(extra, dict):
                raise PromptShapeError("extra_data must be an object")
            job = self._new_job(check_graph(graph), dict(extra), None, route)
        except PromptShapeError as exc:
            return _json(exc.body(), 400)
        t0 = time.monotonic()
        outcome = await self._admit(job)
        if outcome[0] == "rejected":
            return _json(outcome[2], outcome[1])
        await job.done.wait()
        return _json(self._run_answer(job, include, time.monotonic() - t0), self._run_status(job))

    @staticmethod
    def _run_status(job: Job) -> int:
        return {"success": 200, "lost": 503}.get(job.state, 422)

    def _run_answer(self, job: Job, include: bool, seconds: float) -> dict:
        entry = job.history or {}
        outputs = entry.get("outputs") or {}
        images = []
        for nid, out in outputs.items():
            for item in (out.get("images") or []) if isinstance(out, dict) else []:
                info = {"node": nid, **item, "url": "/view?" + urllib.parse.urlencode(
                    {"filename": item["filename"], "subfolder": item.get("subfolder", ""), "type": item["type"]})}
                data = self.files.get((item["type"], item.get("subfolder", ""), item["filename"]))
                if include and data is not None:
                    info["mime"] = mimetypes.guess_type(item["filename"])[0] or "application/octet-stream"
                    info["data_base64"] = base64.b64encode(data).decode()
                images.append(info)
        error = None
        for kind, data in (entry.get("status") or {}).get("messages", []):
            if kind == "execution_error":
                error = {k: data.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message")}
        if job.state == "lost":
            error = {"exception_type": "ReplicaUnavailable", "exception_message": job.error}
        return {"prompt_id": job.id, "status": job.state, "images": images, "probe": probe_reports(outputs),
                "outputs": outputs, "error": error, "node_errors": job.node_errors, "serve": entry.get("zimage_serve"),
                "seconds": round(seconds, 4)}

    @app.get("/zimage_serve/status")
    async def status(self):
        live = [j for j in self.jobs.values() if not j.done.is_set()]
        return _json({"route": self.settings.route, "settings": asdict(self.settings), "counts": dict(self.counts),
                      "pending": sum(j.state == "pending" for j in live),
                      "running": sum(j.state == "running" for j in live),
                      "kept_results": sum(j.done.is_set() for j in self.jobs.values()),
                      "kept_bytes": sum(len(b) for b in self.files.values())})

    @staticmethod
    async def _body(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise PromptShapeError("the request body is not JSON", str(exc)) from None

    async def _body_or_empty(self, request: Request) -> dict:
        try:
            body = await self._body(request)
        except PromptShapeError:
            return {}
        return body if isinstance(body, dict) else {}
