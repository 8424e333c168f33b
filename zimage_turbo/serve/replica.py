"""The Serve replica: one ComfyUI server process (on the GPU Ray gave this replica), driven over its own API.

Ready means warm: the constructor returns only once ComfyUI answers and the pack's preload has loaded (and, on a
GPU, compiled) the base model, so Serve sends no prompt to a cold replica. `check_health` is what Serve asks
every few seconds: a ComfyUI that exited or stopped answering makes the replica unhealthy, and Serve replaces it.

`run` is a streaming method: it yields ComfyUI's answer to POST /prompt ("queued" or "rejected" with ComfyUI's
validation error, which harms nobody: the replica stays healthy), then every websocket message of that prompt,
then the result (history entry and the bytes of its files). When ComfyUI dies under a prompt it raises
ComfyUnavailable and the front door runs the prompt on another replica: same graph, same seed, same image.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import ray
from ray import serve

from .comfy_process import ComfyProcess, ComfySpec
from .prompts import is_terminal, output_files, redact

log = logging.getLogger("ray.serve")

# Read-only ComfyUI routes the front door may ask a replica for (object_info for clients that check node inputs,
# system_stats, model lists ...). Everything that changes state goes through run().
END_GRACE_S = 5.0  # how long after execution_success etc. the final `executing` (node null) may take
PROXIED_GET = re.compile(r"^/(object_info(/[\w.\- ]+)?|system_stats|embeddings|extensions|features|models(/[\w.\-]+)?"
                         r"|zimage_turbo/status)$")


class ComfyUnavailable(RuntimeError):
    """This replica's ComfyUI is gone or not answering: the prompt may run on another replica."""


@dataclass
class ReplicaSettings:
    comfyui: str  # ComfyUI's folder (main.py); ZIMAGE_SERVE_COMFYUI on a node overrides it for that node
    work_dir: str  # per replica: <work_dir>/<replica>/ holds ComfyUI's temp folder and log
    base_directory: str | None = None
    output_directory: str | None = None  # per replica: <this>/<replica>/
    python: str | None = None  # default: the replica's own Python
    cpu: bool = False
    comfy_args: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    preload: str | None = None
    wait_for_preload: bool = True
    serial_start: bool = True  # replicas of one machine start one after another (see _start_lock)
    start_timeout_s: float = 900.0
    prompt_timeout_s: float = 1800.0
    unanswered_health_checks: int = 3  # a running ComfyUI that misses this many in a row is unhealthy

    def to_dict(self) -> dict:
        return asdict(self)


class ComfyReplica:
    def __init__(self, settings: dict):
        self.settings = ReplicaSettings(**settings)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        runtime = ray.get_runtime_context()
        self.node_id = runtime.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
        comfy_dir = os.environ.get("ZIMAGE_SERVE_COMFYUI") or self.settings.comfyui
        folder = re.sub(r"[^\w.-]", "_", f"replica-{self.replica}")
        work = Path(self.settings.work_dir) / folder
        out = Path(self.settings.output_directory) / folder if self.settings.output_directory else None
        self.comfy = ComfyProcess(ComfySpec(
            comfy_dir=comfy_dir, work_dir=str(work), base_directory=self.settings.base_directory,
            output_directory=str(out) if out else None, python=self.settings.python or sys.executable,
            cpu=self.settings.cpu, extra_args=list(self.settings.comfy_args), env=dict(self.settings.env),
            preload=self.settings.preload, wait_for_preload=self.settings.wait_for_preload,
            start_timeout_s=self.settings.start_timeout_s))
        # What clients must never see: where this machine keeps ComfyUI, the models, the work files, Python.
        self.redactions = [(comfy_dir, "<ComfyUI>"), (str(work), "<replica>"), (self.settings.work_dir, "<work>"),
                           (sys.prefix, "<python>"), (os.path.expanduser("~"), "<home>")]
        if self.settings.base_directory:
            self.redactions.append((self.settings.base_directory, "<base>"))
        if self.settings.output_directory:
            self.redactions.append((self.settings.output_directory, "<output>"))
        with self._start_lock(comfy_dir):
            self.comfy.start()
        self.gone: str | None = None  # why ComfyUI is gone, once a prompt or a health check found out
        self.missed_checks = 0
        self.prompts_done = 0
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set = set()
        self.client_id = f"zimage-serve-{self.replica}"
        self._inboxes: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._listen_lock = asyncio.Lock()
        log.info("replica %s: ComfyUI pid %s port %s ready in %.1f s (GPU %s)", self.replica, self.comfy.pid,
                 self.comfy.port, self.comfy.ready_s, self.gpu)

    @contextlib.contextmanager
    def _start_lock(self, comfy_dir: str):
        """One replica of a machine starts (loads, warms, compiles) at a time, when they share a compile cache.

        The first compiles and saves its artifacts; the next ones load them, so every replica of the machine runs the
        same kernels and a prompt retried on a neighbour gives the very same bits (two cold compiles can pick
        different kernels and differ by a few levels). On a CPU nothing is compiled and all start at once."""
        if self.settings.cpu or not self.settings.serial_start:
            yield
            return
        cache = os.environ.get("ZIMAGE_TURBO_CACHE_DIR") or str(
            Path(self.settings.base_directory or comfy_dir) / "user" / "zimage_turbo")
        Path(cache).mkdir(parents=True, exist_ok=True)
        with open(Path(cache) / "serve-start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            yield

    # ------------------------------------------------------------------ Serve's hooks

    async def check_health(self) -> None:
        code = self.comfy.exited()
        if code is not None:
            self.gone = self.gone or f"ComfyUI exited with code {code}"
        if self.gone:
            raise ComfyUnavailable(f"replica {self.replica}: {self.gone}")
        try:
            async with (await self._session()).get(self.comfy.base_url + "/system_stats",
                                                   timeout=aiohttp.ClientTimeout(total=10)) as r:
                ok = r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            ok = False
        self.missed_checks = 0 if ok else self.missed_checks + 1
        if self.missed_checks >= self.settings.unanswered_health_checks:
            self.gone = f"ComfyUI did not answer {self.missed_checks} health checks in a row"
            raise ComfyUnavailable(f"replica {self.replica}: {self.gone}")

    def __del__(self):
        # Serve calls this when the replica is stopped (scale-down, redeploy, shutdown), after draining.
        comfy = getattr(self, "comfy", None)
        if comfy is not None:
            comfy.stop()

    @serve.multiplexed(max_num_models_per_replica=1)
    async def _lora_set(self, key: str) -> str:
        """The LoRA set this replica ran last, as Serve's multiplexing knows it: with LoRA-affinity routing on, a
        prompt with the same set goes to this replica when it has room. Nothing is loaded here: ComfyUI merges the
        LoRAs when the prompt runs (the key only names them)."""
        return key

    # ------------------------------------------------------------------ what the front door calls

    def describe(self) -> dict:
        return {"replica": self.replica, "node_id": self.node_id, "node_ip": self.node_ip, "gpu": self.gpu,
                "comfyui_pid": self.comfy.pid, "comfyui_port": self.comfy.port, "ready_s": self.comfy.ready_s}

    async def info(self) -> dict:
        return {**self.describe(), "prompts_done": self.prompts_done, "gone": self.gone,
                "preload": redact(self.comfy.preload_state, self.redactions)}

    async def comfy_get(self, path_and_query: str) -> tuple[int, str, bytes]:
        """(status, content type, body) of a read-only GET on this replica's ComfyUI (PROXIED_GET paths only)."""
        path = urllib.parse.urlsplit(path_and_query).path
        if not PROXIED_GET.match(path):
            return 404, "application/json", json.dumps({"error": f"{path} is not served by the front door"}).encode()
        self._raise_if_gone()
        try:
            async with (await self._session()).get(self.comfy.base_url + path_and_query,
                                                   timeout=aiohttp.ClientTimeout(total=60)) as r:
                body, ctype, status = await r.read(), r.content_type, r.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._unavailable(f"GET {path} failed: {exc!r}")
        if ctype == "application/json":
            data = json.loads(body)
            if path == "/system_stats":
                data.get("system", {}).pop("argv", None)  # absolute paths of this machine
            body = json.dumps(redact(data, self.redactions)).encode()
        return status, ctype, body

    async def run(self, job: dict):
        """Run one prompt on this replica's ComfyUI; yields events (see the module's docstring).

        job: {"prompt_id", "graph", "extra_data", "lora_key"}."""
        if job.get("lora_key"):
            await self._lora_set(job["lora_key"])
        self._raise_if_gone()
        session = await self._session()
        pid = job["prompt_id"]
        await self._listen()
        inbox: asyncio.Queue = asyncio.Queue()
        self._inboxes[pid] = inbox  # before the POST: no message of this prompt is missed
        try:
            body = {"prompt": job["graph"], "client_id": self.client_id, "extra_data": job.get("extra_data") or {},
                    "prompt_id": pid}
            try:
                async with session.post(self.comfy.base_url + "/prompt", json=body,
                                        timeout=aiohttp.ClientTimeout(total=120)) as r:
                    status, answer = r.status, await r.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                raise self._unavailable(f"POST /prompt: {exc!r}")
            if status == 400 or (status == 200 and not isinstance(answer, dict)):
                # ComfyUI's own validation error: the prompt's fault, not this replica's.
                yield {"event": "rejected", "status": status, "body": redact(answer, self.redactions),
                       **self.describe()}
                return
            if status != 200:
                raise self._unavailable(f"POST /prompt answered HTTP {status}")
            yield {"event": "queued", "number": answer.get("number"), "node_errors": answer.get("node_errors") or {}}
            deadline = time.monotonic() + self.settings.prompt_timeout_s
            # After execution_success (or _error, _interrupted) ComfyUI stores the history, then sends `executing`
            # with node null: the prompt's true end, which clients such as comfy-cli wait for.
            ended_at = None
            while True:
                left = deadline - time.monotonic()
                if ended_at is not None:
                    left = min(left, ended_at + END_GRACE_S - time.monotonic())
                    if left <= 0:
                        break  # a ComfyUI that does not send the final `executing`: the history is polled below
                elif left <= 0:
                    await self._forget(pid, interrupt=True)
                    yield {"event": "failed", "reason": f"no result within {self.settings.prompt_timeout_s:g} s"}
                    return
                try:
                    data = await asyncio.wait_for(inbox.get(), timeout=min(left, 5.0))
                except asyncio.TimeoutError:
                    if self.comfy.exited() is not None:  # a socket of a killed process may linger
                        raise self._unavailable("ComfyUI exited")
                    continue
                if data is None:
                    raise self._unavailable("ComfyUI's websocket closed")
                yield {"event": "message", "message": redact(data, self.redactions)}
                if data.get("type") == "executing" and (data.get("data") or {}).get("node") is None:
                    break
                if is_terminal(data) and ended_at is None:
                    ended_at = time.monotonic()
            t_end = time.perf_counter()
            history = await self._history(pid)
            entries = output_files(history.get("outputs"))
            datas = await asyncio.gather(*(self._view(f) for f in entries))
            files = [{**f, "data": d} for f, d in zip(entries, datas)]
            # Not awaited: it keeps ComfyUI's in-memory history from growing for ever, and nobody waits for it.
            self._background(self._forget(pid))
            self.prompts_done += 1
            yield {"event": "result", "history": redact(history, self.redactions), "files": files,
                   "fetch_s": time.perf_counter() - t_end, **self.describe()}
        except asyncio.CancelledError:
            # The client gave up (POST /interrupt, /queue delete): stop the prompt here too.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._forget(pid, interrupt=True))
            raise
        finally:
            self._inboxes.pop(pid, None)

    async def _listen(self) -> None:
        """One websocket to ComfyUI for every prompt of this replica (the replica's client id): its messages go to
        the inbox of their prompt. Opened at the first prompt, and again after it closed if ComfyUI still runs."""
        async with self._listen_lock:
            if self._reader is not None and not self._reader.done():
                return
            self._raise_if_gone()
            try:
                ws = await (await self._session()).ws_connect(
                    f"{self.comfy.base_url}/ws?clientId={self.client_id}", max_msg_size=0)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise self._unavailable(f"websocket: {exc!r}")
            self._reader = asyncio.ensure_future(self._read(ws))

    async def _read(self, ws) -> None:
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue  # previews (binary)
                data = json.loads(msg.data)
                inbox = self._inboxes.get((data.get("data") or {}).get("prompt_id"))
                if inbox is not None:  # status broadcasts and forgotten prompts have none
                    inbox.put_nowait(data)
        finally:
            for inbox in list(self._inboxes.values()):
                inbox.put_nowait(None)  # the prompts waiting on this socket learn that it closed
            await ws.close()

    # ------------------------------------------------------------------ helpers

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # a reference until it ends (the loop keeps only weak ones)
        task.add_done_callback(self._tasks.discard)

    async def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:  # made in the loop that serves requests
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._http

    def _raise_if_gone(self) -> None:
        code = self.comfy.exited()
        if code is not None:
            self.gone = self.gone or f"ComfyUI exited with code {code}"
        if self.gone:
            raise ComfyUnavailable(f"replica {self.replica}: {self.gone}")

    def _unavailable(self, what: str) -> ComfyUnavailable:
        """The error for a failed exchange with ComfyUI; once ComfyUI has exited, this replica is done for."""
        code = self.comfy.exited()
        if code is None:
            time.sleep(0.2)  # a killed process closes its sockets a moment before it can be reaped
            code = self.comfy.exited()
        if code is not None:
            self.gone = self.gone or f"ComfyUI exited with code {code}"
            log.warning("replica %s: ComfyUI exited with code %s; Serve will replace this replica", self.replica, code)
        return ComfyUnavailable(f"replica {self.replica}: {what}" + (f" ({self.gone})" if self.gone else ""))

    async def _history(self, pid: str) -> dict:
        for _ in range(100):  # the history entry is written just after the last message
            try:
                async with (await self._session()).get(f"{self.comfy.base_url}/history/{pid}",
                                                       timeout=aiohttp.ClientTimeout(total=30)) as r:
                    body = await r.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                raise self._unavailable(f"GET /history: {exc!r}")
            if isinstance(body, dict) and pid in body:
                return body[pid]
            await asyncio.sleep(0.02)
        return {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": []}}

    async def _view(self, f: dict) -> bytes:
        q = urllib.parse.urlencode({"filename": f["filename"], "subfolder": f.get("subfolder", ""), "type": f["type"]})
        try:
            async with (await self._session()).get(f"{self.comfy.base_url}/view?{q}",
                                                   timeout=aiohttp.ClientTimeout(total=120)) as r:
                if r.status != 200:
                    return b""
                return await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._unavailable(f"GET /view: {exc!r}")

    async def _forget(self, pid: str, interrupt: bool = False) -> None:
        session = await self._session()
        calls = [("/history", {"delete": [pid]})]
        if interrupt:
            calls = [("/queue", {"delete": [pid]}), ("/interrupt", {"prompt_id": pid})] + calls
        for path, body in calls:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.post(self.comfy.base_url + path, json=body, timeout=aiohttp.ClientTimeout(total=10)):
                    pass
