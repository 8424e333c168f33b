"""A small client for ComfyUI's HTTP + websocket API, and a helper to run a ComfyUI server.

Used by the demo, the end-to-end tests and the load-test client in bench/.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMFY_DIR = REPO / ".build" / "ComfyUI"
PACK_NAME = "comfyui-zimage-turbo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(RuntimeError):
    pass


@dataclass
class PromptResult:
    prompt_id: str
    status: str  # "success" | "error" | "interrupted"; a ClientSession adds "rejected" | "timeout" | "disconnected"
    messages: list = field(default_factory=list)
    error: dict | None = None
    history: dict | None = None
    seconds: float = 0.0
    started_s: float | None = None  # execution_start, seconds after the POST
    first_progress_s: float | None = None

    def outputs(self) -> dict:
        return (self.history or {}).get("outputs", {})

    def cached_nodes(self) -> list:
        """The node ids ComfyUI served from its cache for this prompt (its execution_cached message)."""
        for msg in self.messages:
            if msg.get("type") == "execution_cached":
                return list(msg.get("data", {}).get("nodes", []))
        return []

    def executed_nodes(self) -> list:
        """The node ids that really ran (an `executing` message named them)."""
        return [m["data"]["node"] for m in self.messages
                if m.get("type") == "executing" and m.get("data", {}).get("node") is not None]


def follow(result: PromptResult, msg: dict, t0: float, on_message=None, now: float | None = None) -> bool:
    """Record one websocket message of `result`'s prompt (queued at perf_counter `t0`; `now`: when the message
    arrived, default now); True once the prompt has ended. The one reading of ComfyUI's message kinds."""
    data = msg.get("data") or {}
    result.messages.append(msg)
    kind = msg.get("type")
    since = (time.perf_counter() if now is None else now) - t0
    if kind == "execution_start" and result.started_s is None:
        result.started_s = since
    if kind == "progress" and result.first_progress_s is None:
        result.first_progress_s = since
    if on_message is not None:
        on_message(result, msg)
    if kind == "execution_error":
        result.status, result.error = "error", data
        return True
    if kind == "execution_interrupted":
        result.status = "interrupted"
        return True
    if kind == "execution_success" or (kind == "executing" and data.get("node") is None):
        result.status = "success"
        return True
    return False


class ComfyClient:
    def __init__(self, host: str = "127.0.0.1", port: int = 8188):
        self.base = f"http://{host}:{port}"
        self.ws_url = f"ws://{host}:{port}/ws"

    # ---- plain HTTP
    def request(self, method: str, path: str, body=None, timeout: float = 60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw and raw[:1] in b"{[" else raw)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except json.JSONDecodeError:
                return e.code, raw

    def get(self, path: str, timeout: float = 60):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body, timeout: float = 60):
        return self.request("POST", path, body, timeout=timeout)

    def alive(self) -> bool:
        try:
            return self.get("/system_stats", timeout=2)[0] == 200
        except OSError:
            return False

    def object_info(self) -> dict:
        return self.get("/object_info")[1]

    def queue(self, prompt: dict, client_id: str) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id})

    def history(self, prompt_id: str) -> dict | None:
        status, body = self.get(f"/history/{prompt_id}")
        return body.get(prompt_id) if status == 200 and isinstance(body, dict) else None

    def view(self, filename: str, subfolder: str = "", type_: str = "output") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type_})
        return self.get(f"/view?{q}")[1]

    def session(self, client_id: str | None = None, connect_timeout: float = 30) -> "ClientSession":
        """A client with its own client id and one websocket kept open for many prompts."""
        return ClientSession(self, client_id or uuid.uuid4().hex, connect_timeout)

    # ---- queue and wait on the websocket
    def run(self, prompt: dict, timeout: float = 600) -> PromptResult:
        """Queue `prompt` and follow it on the websocket until it succeeds, fails or is interrupted.

        Raises ComfyError when the prompt is refused, does not end within `timeout` or the connection drops."""
        with self.session(connect_timeout=timeout) as session:
            result = session.run(prompt, timeout=timeout)
        if result.status == "rejected":
            raise ComfyError(f"prompt rejected ({result.error['http_status']}): "
                             f"{json.dumps(result.error['body'], default=str)[:2000]}")
        if result.status in ("timeout", "disconnected"):
            raise ComfyError(f"prompt {result.prompt_id}: {result.status}: {result.error or f'{timeout} s'}")
        return result


class ClientSession:
    """One client id with one websocket, for many prompts in a row (ComfyClient.run opens one per prompt).

    Never raises for what the server answers: a prompt refused by POST /prompt comes back with status
    "rejected" (error = the response body), a prompt that does not finish in time as "timeout", a dropped
    connection or a server that went away as "disconnected" (the session is then closed; open a new one).
    `on_message(result, msg)` is called for each websocket message of the prompt (e.g. to post /interrupt
    once it makes progress).
    """

    def __init__(self, client: ComfyClient, client_id: str, connect_timeout: float = 30):
        import websocket  # websocket-client

        self.client = client
        self.client_id = client_id
        self.ws = websocket.create_connection(f"{client.ws_url}?clientId={client_id}", timeout=connect_timeout)
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.ws.close()
            except Exception:  # already gone
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, prompt: dict, timeout: float = 600, on_message=None) -> PromptResult:
        import websocket

        t0 = time.perf_counter()
        result = PromptResult("", "pending")
        if self.closed:
            result.status, result.error = "disconnected", {"reason": "session closed"}
            return result
        try:
            status, body = self.client.queue(prompt, self.client_id)
        except OSError as exc:
            result.status, result.error = "disconnected", {"reason": f"POST /prompt failed: {exc!r}"}
            self.close()
            return result
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            result.status, result.error = "rejected", {"http_status": status, "body": body}
            result.seconds = time.perf_counter() - t0
            return result
        pid = result.prompt_id = body["prompt_id"]
        deadline = t0 + timeout
        try:
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    result.status = "timeout"
                    break
                self.ws.settimeout(min(left, 5.0))
                try:
                    raw = self.ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if isinstance(raw, bytes):
                    continue  # previews
                msg = json.loads(raw)
                data = msg.get("data") or {}
                if data.get("prompt_id") != pid:
                    continue  # status broadcasts, an earlier prompt of this client
                if follow(result, msg, t0, on_message):
                    break
        except (OSError, websocket.WebSocketException) as exc:
            result.status, result.error = "disconnected", {"reason": f"websocket: {exc!r}"}
            self.close()
        result.seconds = time.perf_counter() - t0
        if result.status in ("success", "error", "interrupted"):
            for _ in range(100):  # history is written just after the last message
                try:
                    result.history = self.client.history(pid)
                except OSError:
                    break
                if result.history:
                    break
                time.sleep(0.05)
        return result


class ComfyServer:
    """Starts `main.py --cpu` (or on the GPU) with a base directory of our own; stops it on exit."""

    def __init__(self, base_dir: Path, port: int | None = None, cpu: bool = True, extra_args=(), log_path: Path | None = None,
                 python: str = sys.executable, comfy_dir: Path = COMFY_DIR, link_pack: bool = True,
                 env: dict | None = None):
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.log_path = log_path or (self.base_dir / "comfyui.log")
        self.python = python
        self.comfy_dir = Path(comfy_dir)
        self.link_pack = link_pack
        self.env = dict(env or {})  # extra environment variables of the server process
        self.proc: subprocess.Popen | None = None
        self.client = ComfyClient("127.0.0.1", self.port)

    def prepare(self) -> None:
        for sub in ("models/diffusion_models", "models/text_encoders", "models/vae", "models/diffusers",
                    "models/loras", "custom_nodes", "input", "output", "user", "temp"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        if self.link_pack:
            link = self.base_dir / "custom_nodes" / PACK_NAME
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(REPO, target_is_directory=True)

    def start(self, timeout: float = 180) -> "ComfyServer":
        self.prepare()
        args = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base_dir), "--disable-auto-launch"]
        if self.cpu:
            args.append("--cpu")
        args += self.extra_args
        self.log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(args, cwd=self.comfy_dir, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_text()[-4000:]}")
            if self.client.alive():
                return self
            time.sleep(0.5)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {timeout}s; log:\n{self.log_text()[-4000:]}")

    def running(self) -> bool:
        """The server process exists and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int | None:
        """Resident set size of the server process (Linux /proc), None when it is gone or unknown."""
        if not self.running():
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def front_end_args(folder: Path, python: str = sys.executable) -> list[str]:
    """ComfyUI arguments for a machine without ComfyUI's front-end package (e.g. a bare GPU machine).

    ComfyUI 0.3.75 exits when `comfyui_frontend_package` cannot be imported, unless --front-end-root names a
    folder: then serve `folder` holding an empty index.html. Returns [] when the package is there."""
    probe = subprocess.run([python, "-c", "import comfyui_frontend_package"], capture_output=True)
    if probe.returncode == 0:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text("")
    return ["--front-end-root", str(folder)]


def place_tiny_model(models_dir: Path, built, lora_files=()) -> dict:
    """Copy a tiny model (devtools.model_builder.BuiltModel) into ComfyUI's model folders."""
    models_dir = Path(models_dir)
    names = {
        "model": built.transformer_file.name,
        "text_encoder": built.text_encoder_file.name,
        "vae": built.vae_file.name,
        "diffusers": "[diffusers] " + built.diffusers_dir.name,
    }
    shutil.copy(built.transformer_file, models_dir / "diffusion_models" / built.transformer_file.name)
    shutil.copy(built.text_encoder_file, models_dir / "text_encoders" / built.text_encoder_file.name)
    shutil.copy(built.vae_file, models_dir / "vae" / built.vae_file.name)
    shutil.copytree(built.diffusers_dir, models_dir / "diffusers" / built.diffusers_dir.name, dirs_exist_ok=True)
    for f in lora_files:
        shutil.copy(f, models_dir / "loras" / Path(f).name)
    return names
