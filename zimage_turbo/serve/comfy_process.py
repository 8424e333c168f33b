"""One ComfyUI server process, owned by one Serve replica: started, waited for until it is warm, watched, stopped.

The process is a child of the replica's worker and must never outlive it (a ComfyUI left behind would keep
holding its GPU): on Linux it gets PR_SET_PDEATHSIG, which the kernel delivers when the *thread* that forked it
ends, so the fork happens on a thread of its own that lives exactly as long as the child (it waits on it).
No ray in here: the replica passes everything in.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("zimage_turbo.serve")

PRELOAD_ENV = "ZIMAGE_TURBO_PRELOAD"
PR_SET_PDEATHSIG = 1
# Ray sets these for its workers (OMP_NUM_THREADS=1 when an actor asks for no CPU); ComfyUI must not inherit them,
# or it would run its CPU work on one thread where a plain ComfyUI uses all cores.
RAY_WORKER_ONLY_ENV = ("OMP_NUM_THREADS",)


class ComfyStartError(RuntimeError):
    """ComfyUI did not start or did not get ready; the message says why and ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the replica's stop() is the only guard
        pass


def http_json(url: str, body=None, timeout: float = 10.0) -> tuple[int, object]:
    """(status, decoded JSON or raw bytes) of one request; OSError when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw
    except ValueError:
        return status, raw


@dataclass
class ComfySpec:
    """How to start one ComfyUI. `work_dir` is this process's own folder (temp files, log, empty front end)."""
    comfy_dir: str
    work_dir: str
    base_directory: str | None = None
    output_directory: str | None = None
    python: str = sys.executable
    cpu: bool = False
    extra_args: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    preload: str | None = None  # ZIMAGE_TURBO_PRELOAD's value (inline JSON or a file); None: ComfyUI's own config
    wait_for_preload: bool = True
    start_timeout_s: float = 900.0


class ComfyProcess:
    def __init__(self, spec: ComfySpec):
        self.spec = spec
        self.comfy_dir = Path(spec.comfy_dir)
        self.work_dir = Path(spec.work_dir)
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = self.work_dir / "comfyui.log"
        self.preload_state: dict | None = None
        self.ready_s: float | None = None
        self._spawn_error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # ------------------------------------------------------------------ start

    def args(self) -> list[str]:
        spec = self.spec
        main = self.comfy_dir / "main.py"
        if not main.is_file():
            raise ComfyStartError(f"no ComfyUI at {self.comfy_dir} (main.py not found): give --comfyui the folder "
                                  "that holds ComfyUI's main.py")
        temp = self.work_dir / "temp_parent"  # ComfyUI empties <this>/temp when it starts: one per process
        args = [spec.python, str(main), "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
                "--temp-directory", str(temp)]
        if spec.base_directory:
            args += ["--base-directory", spec.base_directory]
        args += ["--output-directory", spec.output_directory or str(self.work_dir / "output")]
        cli = (self.comfy_dir / "comfy" / "cli_args.py")
        if cli.is_file() and "--database-url" in cli.read_text(errors="replace"):
            # One database file shared by several servers would race (and an in-memory one breaks across threads).
            args += ["--database-url", f"sqlite:///{self.work_dir / 'comfyui.db'}"]
        if spec.cpu:
            args.append("--cpu")
        if "--front-end-root" not in spec.extra_args and not self._has_front_end_package():
            # ComfyUI 0.3.75 exits without its front-end package unless it is given a folder to serve.
            front = self.work_dir / "front_end_empty"
            front.mkdir(parents=True, exist_ok=True)
            (front / "index.html").write_text("")
            args += ["--front-end-root", str(front)]
        return args + [str(a) for a in spec.extra_args]

    def _has_front_end_package(self) -> bool:
        probe = subprocess.run([self.spec.python, "-c", "import comfyui_frontend_package"], capture_output=True)
        return probe.returncode == 0

    def environment(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in RAY_WORKER_ONLY_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        if self.spec.preload is not None:
            env[PRELOAD_ENV] = self.spec.preload
        env.update({k: str(v) for k, v in self.spec.env.items()})
        return env

    def start(self, attempts: int = 3) -> "ComfyProcess":
        """Start ComfyUI and return once it answers and its preload (if any) is warm; ComfyStartError otherwise."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        for attempt in range(attempts):
            self.port = free_port()
            self._spawn(self.args())
            try:
                self._wait_until_answering(t0)
                break
            except ComfyStartError:
                # Another process may have taken the port between free_port() and ComfyUI's bind: try another.
                if attempt + 1 < attempts and "address already in use" in self.log_tail().lower():
                    self.stop()
                    continue
                self.stop()
                raise
        try:
            self._wait_until_warm(t0)
        except ComfyStartError:
            self.stop()
            raise
        self.ready_s = time.monotonic() - t0
        log.info("ComfyUI pid %s on port %s ready in %.1f s", self.pid, self.port, self.ready_s)
        return self

    def _spawn(self, args: list[str]) -> None:
        started = threading.Event()
        log_file = open(self.log_path, "ab")

        def parent():  # this thread is the child's parent for PR_SET_PDEATHSIG: it lives until the child exits
            try:
                self.proc = subprocess.Popen(args, cwd=self.comfy_dir, stdout=log_file, stderr=subprocess.STDOUT,
                                             env=self.environment(), start_new_session=True,
                                             preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                self._spawn_error = exc
                started.set()
                return
            finally:
                log_file.close()  # the child holds its own copy
            started.set()
            self.proc.wait()

        self.proc, self._spawn_error = None, None
        threading.Thread(target=parent, name=f"comfyui-parent-{self.port}", daemon=True).start()
        started.wait()
        if self._spawn_error is not None:
            raise ComfyStartError(f"could not start ComfyUI ({self.spec.python}): {self._spawn_error}")

    def _fail(self, why: str) -> ComfyStartError:
        return ComfyStartError(f"{why}; the end of ComfyUI's log ({self.log_path}):\n{self.log_tail()}")

    def _deadline_passed(self, t0: float) -> bool:
        return time.monotonic() - t0 > self.spec.start_timeout_s

    def _wait_until_answering(self, t0: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise self._fail(f"ComfyUI exited with code {self.proc.returncode} while starting")
            try:
                if http_json(self.base_url + "/system_stats", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if self._deadline_passed(t0):
                raise self._fail(f"ComfyUI did not answer within {self.spec.start_timeout_s:g} s")
            time.sleep(0.25)

    def _wait_until_warm(self, t0: float) -> None:
        """Until the pack's preload is neither loading nor warming (GET /zimage_turbo/status)."""
        if not self.spec.wait_for_preload:
            return
        while True:
            if self.proc.poll() is not None:
                raise self._fail(f"ComfyUI exited with code {self.proc.returncode} while preloading")
            try:
                status, body = http_json(self.base_url + "/zimage_turbo/status", timeout=10)
            except OSError:
                status, body = 0, None
            if status == 404:
                raise self._fail("this ComfyUI has no Z-Image Turbo node pack (GET /zimage_turbo/status is 404): "
                                 "link or clone it into ComfyUI's custom_nodes")
            if status == 200 and isinstance(body, dict):
                pre = body.get("preload") or {}
                self.preload_state = pre
                state = pre.get("state")
                if state == "failed":
                    raise self._fail(f"the model preload failed: {pre.get('error')}")
                if state in ("ready", "off"):
                    return
            if self._deadline_passed(t0):
                raise self._fail(f"the preload was not warm within {self.spec.start_timeout_s:g} s "
                                 f"(state {(self.preload_state or {}).get('state')})")
            time.sleep(0.25)

    # ------------------------------------------------------------------ watch

    def exited(self) -> int | None:
        """ComfyUI's exit code once it has exited, else None."""
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ stop

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to ComfyUI's process group, SIGKILL after `timeout_s`; its temp folder is removed."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.work_dir / "temp_parent", ignore_errors=True)
