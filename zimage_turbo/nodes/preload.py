"""Preload: the Turbo pipeline loaded, warmed and compiled when ComfyUI starts (opt-in).

Config, first found wins:
  1. the environment variable ZIMAGE_TURBO_PRELOAD: inline JSON (starts with { or [) or the path of a JSON file;
  2. zimage_turbo_preload.json in ComfyUI's user folder (folder_paths.get_user_directory()).
Content: one object, or a list of objects, with the Turbo Loader's input names
({"model", "text_encoder", "vae", "dtype", "device", "memory", "compile"}); a missing key takes the loader's default.

Nothing here may make the server slow or fragile to start: the config is read and the weights
loaded in a background thread started once the web server starts; any failure is logged and
shown by GET /zimage_turbo/status as state "failed", and the server serves as usual. The
settings are resolved by the loader's own code (loader_node.resolve), so a loader node with the
same settings finds the pipeline in the engine's cache (files + dtype + device) and loads nothing.
Messages kept for clients never hold the server's absolute paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

from ..engine import api
from ..engine.api import COMPILE_MODES, MEMORY_MODES, ZImageError
from . import comfy_paths

log = logging.getLogger("zimage_turbo")

ENV_VAR = "ZIMAGE_TURBO_PRELOAD"
USER_FILE = "zimage_turbo_preload.json"
KEYS = ("model", "text_encoder", "vae", "dtype", "device", "memory", "compile")
FILE_KEYS = {"model": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae"}
DTYPE_CHOICES = api.PRECISION_CHOICES
MAX_CONFIG_BYTES = 1 << 20
POLL_S = 0.5
# Overall state: the first of these that any entry is in (work still going first, so a client that
# polls until the state is neither loading nor warming sees everything finished).
STATE_ORDER = ("loading", "warming", "failed", "off", "ready")


class PreloadConfigError(ValueError):
    """The preload config is unusable; the message names what to fix and holds no server path."""


# ------------------------------------------------------------------ config


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise PreloadConfigError(f"the key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def _json(text: str, where: str):
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except PreloadConfigError as exc:
        raise PreloadConfigError(f"{where}: {exc}.") from None
    except json.JSONDecodeError as exc:
        raise PreloadConfigError(f"{where} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).") from None


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _outside_the_folders(name: str) -> bool:
    return (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or bool(PureWindowsPath(name).drive)
            or ".." in PurePosixPath(name.replace("\\", "/")).parts)


def loader_defaults() -> dict:
    """The Turbo Loader's own defaults, read from its INPUT_TYPES so the two never drift apart."""
    from .loader_node import ZImageTurboLoader

    spec = ZImageTurboLoader.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, (_, opts) in spec.get(section, {}).items():
            out[name] = opts.get("default")
    return {k: out.get(k) for k in KEYS}


def parse_config(data, defaults: dict | None = None) -> list[dict]:
    """Validate a decoded config (one object or a list of them); the loader's inputs with defaults filled in.

    Strict: unknown keys, values that are not strings, choices the loader does not offer and file
    names that point outside ComfyUI's model folders are refused with a message naming the entry and key.
    """
    if isinstance(data, dict):
        items, label = [data], (lambda i: "preload config")
    elif isinstance(data, list):
        items, label = data, (lambda i: f"preload entry {i + 1}")
    else:
        raise PreloadConfigError(
            f"the preload config must be a JSON object (one pipeline) or a list of objects, not {_kind(data)}.")
    defaults = loader_defaults() if defaults is None else defaults
    out = []
    for i, item in enumerate(items):
        where = label(i)
        if not isinstance(item, dict):
            raise PreloadConfigError(f"{where} must be a JSON object with the loader's inputs, not {_kind(item)}.")
        unknown = sorted(set(item) - set(KEYS))
        if unknown:
            raise PreloadConfigError(
                f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}: use {', '.join(KEYS)} "
                "(the Turbo Loader's inputs).")
        settings = {}
        for key in KEYS:
            value = item.get(key, defaults.get(key))
            if not isinstance(value, str):
                raise PreloadConfigError(f"{where}: {key!r} must be a string, not {_kind(value)}.")
            settings[key] = _check_value(where, key, value)
        if settings not in out:  # the same pipeline twice is loaded once
            out.append(settings)
    return out


def _check_value(where: str, key: str, value: str) -> str:
    choices = {"dtype": DTYPE_CHOICES, "memory": MEMORY_MODES, "compile": COMPILE_MODES}.get(key)
    if choices is not None and value not in choices:
        raise PreloadConfigError(f"{where}: {key} {value!r} is not one of {', '.join(choices)}.")
    if key == "device" and not re.fullmatch(r"auto|cpu|cuda:\d+", value):
        raise PreloadConfigError(f"{where}: device {value!r}: use auto, cpu or cuda:N (e.g. cuda:0).")
    if key in FILE_KEYS:
        diffusers = key == "model" and value.startswith(comfy_paths.DIFFUSERS_PREFIX)
        name = value[len(comfy_paths.DIFFUSERS_PREFIX):] if diffusers else value
        folder = "diffusers" if diffusers else FILE_KEYS[key]
        if not name.strip():
            raise PreloadConfigError(f"{where}: {key} is empty: name a file in ComfyUI's models/{folder} folder.")
        if _outside_the_folders(name):
            # The value itself is not repeated: it may be a server path, and this message reaches API clients.
            raise PreloadConfigError(
                f"{where}: {key} must name a file relative to ComfyUI's models/{folder} folder, as the loader "
                "lists it (absolute paths and '..' are refused).")
    return value


def read_config(environ=None, user_dir: str | None = None) -> tuple[str, object] | None:
    """(where it came from, decoded JSON) of the preload config; None when there is none (preload off).

    `where` is how messages name the config: never an absolute path.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(ENV_VAR, "").strip()
    if value:
        if value[:1] in "{[":
            where = f"{ENV_VAR} (inline JSON)"
            return where, _json(value, where)
        where = f"the file named by {ENV_VAR}"
        return where, _json(_read_file(os.path.expanduser(value), where), where)
    if user_dir is None:
        user_dir = _comfy_user_dir()
    if user_dir:
        path = os.path.join(user_dir, USER_FILE)
        if os.path.isfile(path):
            where = f"{USER_FILE} in ComfyUI's user folder"
            return where, _json(_read_file(path, where), where)
    return None


def _comfy_user_dir() -> str | None:
    try:
        import folder_paths

        return folder_paths.get_user_directory()
    except (ImportError, AttributeError):  # an old ComfyUI or a stand-in without a user folder: no user-folder config
        return None


def _read_file(path: str, where: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        log.error("Z-Image Turbo preload: cannot read %s (%s): %s", where, path, exc)
        raise PreloadConfigError(f"{where} cannot be read ({exc.strerror or type(exc).__name__}).") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise PreloadConfigError(f"{where} is over {MAX_CONFIG_BYTES // 1024} KiB: it should hold a few settings.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PreloadConfigError(f"{where} is not UTF-8 text.") from None


def config_present(environ=None, user_dir: str | None = None) -> bool:
    environ = os.environ if environ is None else environ
    if environ.get(ENV_VAR, "").strip():
        return True
    user_dir = _comfy_user_dir() if user_dir is None else user_dir
    return bool(user_dir) and os.path.isfile(os.path.join(user_dir, USER_FILE))


# ------------------------------------------------------------ client text

_POSIX_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"(),;:]+/)+([^\s/'\"(),;:]*)")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\(?:[^\s\\'\"(),;]+\\)*([^\s\\'\"(),;]*)")


def client_message(exc: BaseException) -> str:
    """What a client may read about a failure: the engine's own words, absolute paths cut to their file name."""
    text = str(exc) if isinstance(exc, ZImageError) else f"{type(exc).__name__}: {exc}"
    text = _POSIX_PATH.sub(lambda m: m.group(1) or "…", text)
    return _WINDOWS_PATH.sub(lambda m: m.group(1) or "…", text)


# ----------------------------------------------------------------- loading


def load_pipeline(settings: dict):
    """Load (or find cached) the pipeline for these loader settings, resolved exactly as the loader node does."""
    import torch

    from .loader_node import resolve

    source, device, dtype, fp8 = resolve(settings["model"], settings["text_encoder"], settings["vae"],
                                         settings["dtype"], settings["device"])
    # In inference mode, as ComfyUI runs the loader node: the weights are the same kind of tensors either way.
    with torch.inference_mode():
        pipe = api.load(source, device, dtype, settings["memory"], settings["compile"], fp8)
    # The weights were read now, not by the first generation: its report must not say it loaded them.
    with pipe.lock:
        pipe.pending_loads.clear()
    return pipe


def _is_cached(pipe) -> bool:
    return api.find_loaded(pipe)


REHEARSAL_PROMPT = "a lighthouse on a cliff at dawn"


def rehearse_first_image(pipe, side: int = 1024, devices: tuple = ("cuda",)) -> float | None:
    """Make one 1024² image and throw it away, before the preload says ready; seconds taken (None: not needed).

    The warm-up compiles on a stream of its own, so the first real image still paid one-time costs on the GPU
    (H100, preloaded server: text encode 0.20 s instead of 0.03, the first step 0.29 s instead of 0.095): the
    memory that image needs was cached by the allocator for the warm-up's stream only. This image runs as a
    user's does, on the default stream, so that memory is there for the first request. A CPU has nothing to warm.
    """
    import torch

    if getattr(pipe, "device", None) is None or pipe.device.type not in devices:
        return None
    t0 = time.perf_counter()
    with torch.inference_mode():
        pipe.generate(api.GenerationRequest(REHEARSAL_PROMPT, width=side, height=side, seed=0))
    with pipe.lock:
        pipe.pending_loads.clear()
    return time.perf_counter() - t0


@dataclass(eq=False)
class _Entry:
    settings: dict
    state: str = "loading"
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    load_s: float | None = None
    rehearsal_s: float | None = None
    note: str | None = None  # what did not work but leaves the pipeline usable
    pipe_ref: Callable | None = None  # weakref: a preload never keeps a released pipeline alive

    def reset(self) -> None:
        self.state, self.error, self.started, self.finished, self.load_s = "loading", None, None, None, None
        self.rehearsal_s, self.note = None, None

    def pipe(self):
        return self.pipe_ref() if self.pipe_ref is not None else None


@dataclass(eq=False)
class Preloader:
    """The preload requests of this server and their states: off → loading → warming → ready, or failed."""

    load: Callable[[dict], object] = load_pipeline
    is_loaded: Callable[[object], bool] = _is_cached  # still in the engine's cache (not released)?
    rehearse: Callable[[object], float | None] | None = None  # one throw-away image before ready (the server's: yes)
    poll_s: float = POLL_S
    entries: list = field(default_factory=list)
    origin: str | None = None
    config_error: str | None = None

    def __post_init__(self):
        self._lock = threading.Lock()
        self._pending: list[_Entry] = []
        self._running: _Entry | None = None
        self._worker: threading.Thread | None = None
        self._reading = False

    # -- requests

    def request(self, settings_list: list[dict], origin: str) -> None:
        """Preload these (validated) settings in the background; returns at once."""
        with self._lock:
            self.origin, self.config_error = origin, None
            # Failures and released pipelines of earlier requests are dropped unless asked for again;
            # what is loaded or still loading stays listed.
            self.entries = [e for e in self.entries if e.state not in ("failed", "off") or e.settings in settings_list]
            for settings in settings_list:
                entry = next((e for e in self.entries if e.settings == settings), None)
                if entry is None:
                    entry = _Entry(dict(settings))
                    self.entries.append(entry)
                elif entry is self._running or entry in self._pending:
                    continue  # already on its way
                entry.reset()
                self._pending.append(entry)
            if self._pending and self._worker is None:
                self._worker = threading.Thread(target=self._work, name="zimage-turbo-preload", daemon=True)
                self._worker.start()
        log.info("Z-Image Turbo preload: %d pipeline(s) requested by %s", len(settings_list), origin)

    def fail(self, message: str, origin: str | None) -> None:
        with self._lock:
            self.origin, self.config_error = origin, message
        log.error("Z-Image Turbo preload failed: %s The server runs without it.", message)

    def start_from_config(self, environ=None, user_dir: str | None = None, wait: bool = False) -> None:
        """Read the config (env var or user folder) and preload what it names; never raises."""
        with self._lock:
            self._reading = True  # "loading" until the config is read, so an early poll does not see "off"
        thread = threading.Thread(target=self._from_config, args=(environ, user_dir), name="zimage-turbo-preload-config",
                                  daemon=True)
        thread.start()
        if wait:
            thread.join()

    def _from_config(self, environ, user_dir) -> None:
        origin = None
        try:
            found = read_config(environ, user_dir)
            if found is None:
                return
            origin, data = found
            settings = parse_config(data)
            if settings:
                self.request(settings, origin)
            else:
                log.info("Z-Image Turbo preload: %s is an empty list: nothing to preload.", origin)
        except PreloadConfigError as exc:
            self.fail(str(exc), origin)
        except Exception as exc:  # never take the server down
            log.exception("Z-Image Turbo preload: reading the config failed")
            self.fail(f"reading the preload config failed: {client_message(exc)}", origin)
        finally:
            with self._lock:
                self._reading = False

    # -- the worker

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._worker = None
                    return
                entry = self._running = self._pending.pop(0)
            try:
                self._run(entry)
            except Exception as exc:  # a bug here must not kill the thread silently
                log.exception("Z-Image Turbo preload: unexpected error")
                self._finish(entry, "failed", client_message(exc))
            finally:
                with self._lock:
                    self._running = None

    def _finish(self, entry: _Entry, state: str, error: str | None = None) -> None:
        with self._lock:
            entry.state, entry.error, entry.finished = state, error, time.monotonic()

    def _run(self, entry: _Entry) -> None:
        desc = ", ".join(f"{k}={v}" for k, v in entry.settings.items())
        with self._lock:
            entry.started = time.monotonic()
        log.info("Z-Image Turbo preload: loading %s", desc)
        t0 = time.perf_counter()
        try:
            pipe = self.load(entry.settings)
        except Exception as exc:
            if isinstance(exc, ZImageError):
                log.error("Z-Image Turbo preload of %s failed: %s", desc, exc)
            else:
                log.exception("Z-Image Turbo preload of %s failed", desc)
            self._finish(entry, "failed", client_message(exc))
            return
        with self._lock:
            entry.load_s = time.perf_counter() - t0
            entry.pipe_ref = weakref.ref(pipe)
        try:
            pipe.start_warmup()
        except Exception as exc:
            log.exception("Z-Image Turbo preload: starting the warm-up failed")
            self._finish(entry, "failed", f"loaded, but the warm-up did not start: {client_message(exc)}")
            return
        while True:
            cs = pipe.compile_status()
            if cs.get("state") not in ("pending", "compiling"):
                break
            with self._lock:
                entry.state = "warming"
            pipe.wait_warm(timeout=self.poll_s)
            if not self.is_loaded(pipe):
                log.info("Z-Image Turbo preload: %s was released while warming", desc)
                self._finish(entry, "off")
                return
        if cs.get("state") == "failed":
            message = f"loaded, but compiling failed: {cs.get('error') or 'no reason given'}"
            log.error("Z-Image Turbo preload of %s: %s", desc, message)
            self._finish(entry, "failed", message)
            return
        if self.rehearse is not None:
            with self._lock:
                entry.state = "warming"
            try:
                seconds = self.rehearse(pipe)
                with self._lock:
                    entry.rehearsal_s = seconds
            except Exception as exc:  # the pipeline is loaded and compiled: it serves; say what happened
                log.warning("Z-Image Turbo preload: the first (throw-away) image failed: %s", client_message(exc))
                with self._lock:
                    entry.note = f"the throw-away first image failed: {client_message(exc)}"
        self._finish(entry, "ready")
        log.info("Z-Image Turbo preload: ready in %.1f s (%s)", time.monotonic() - entry.started, desc)

    def wait(self, timeout: float | None = None) -> bool:
        """True once nothing is loading or warming (for tests and scripts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                busy = self._reading or self._pending or self._running is not None
            if not busy:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    # -- what the status route shows

    def preloaded(self, pipe) -> bool:
        with self._lock:
            return any(e.pipe() is pipe for e in self.entries)

    def status(self) -> dict:
        now = time.monotonic()
        with self._lock:
            rows = [(e, dict(e.settings), e.state, e.error, e.started, e.finished, e.load_s, e.pipe())
                    for e in self.entries]
            extras = {id(e): (e.rehearsal_s, e.note) for e in self.entries}
            reading, origin, config_error = self._reading, self.origin, self.config_error
        pipelines = []
        for entry, settings, state, error, started, finished, load_s, pipe in rows:
            loaded = pipe is not None and self.is_loaded(pipe)
            if state == "ready" and not loaded:
                state = "off"  # released since (POST /free, Unload models, /zimage_turbo/free)
            row = {
                "settings": settings,
                "state": state,
                "error": error,
                "seconds": None if started is None else round((finished or now) - started, 3),
                "load_s": None if load_s is None else round(load_s, 3),
                "first_image_s": None if extras[id(entry)][0] is None else round(extras[id(entry)][0], 3),
                "note": extras[id(entry)][1],
                "loaded": loaded,
                "compile_status": pipe.compile_status() if loaded else None,
            }
            pipelines.append(row)
        states = {p["state"] for p in pipelines}
        if config_error is not None:
            states.add("failed")
        if reading:
            states.add("loading")
        state = next((s for s in STATE_ORDER if s in states), "off")
        errors = ([config_error] if config_error else []) + [
            f"{p['settings']['model']}: {p['error']}" if len(pipelines) > 1 else p["error"]
            for p in pipelines if p["state"] == "failed" and p["error"]]
        starts = [r[4] for r in rows if r[4] is not None]
        ends = [r[5] or now for r in rows if r[4] is not None]
        return {
            "state": state,
            "error": "; ".join(errors) or None,
            "seconds": round(max(ends) - min(starts), 3) if starts else None,
            "config": origin,
            "pipelines": pipelines,
        }


PRELOADER = Preloader(rehearse=rehearse_first_image)


def request_from_body(raw: bytes) -> tuple[int, dict]:
    """POST /zimage_turbo/preload: (HTTP status, answer). 202 once started; 400 with the reason otherwise.

    The body is the config's JSON (one object or a list); an empty body preloads the configured one again.
    """
    where = "the request body"
    try:
        if raw.strip():
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise PreloadConfigError("the request body is not UTF-8 text.") from None
            settings = parse_config(_json(text, where))
            origin = "POST /zimage_turbo/preload"
        else:
            found = read_config()
            if found is None:
                raise PreloadConfigError(
                    f"nothing to preload: send the loader's settings as JSON (an object or a list), or set {ENV_VAR} "
                    f"or put {USER_FILE} in ComfyUI's user folder.")
            origin, data = found
            settings = parse_config(data)
    except PreloadConfigError as exc:
        return 400, {"error": str(exc), "preload": PRELOADER.status()}
    if not settings:
        return 400, {"error": "the list is empty: nothing to preload.", "preload": PRELOADER.status()}
    PRELOADER.request(settings, origin)
    return 202, {"preload": PRELOADER.status()}


def start_with_server() -> None:
    """Called when ComfyUI imports the pack: preload once the web server starts, if a config asks for it.

    Never raises and never blocks: without a running ComfyUI server (the pack used as a library, the
    tests) or without a config it does nothing.
    """
    try:
        from server import PromptServer

        instance = getattr(PromptServer, "instance", None)
        if instance is None or not config_present():
            return

        async def on_startup(app):  # after every custom node is imported, as the server starts listening
            PRELOADER.start_from_config()

        try:
            instance.app.on_startup.append(on_startup)
        except (AttributeError, RuntimeError):  # no aiohttp app to hook, or it already runs
            PRELOADER.start_from_config()
    except ImportError:
        return
    except Exception:
        log.exception("Z-Image Turbo preload could not be scheduled; the server runs without it")
