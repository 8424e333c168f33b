"""Compiled code kept on disk, so a restarted server does not compile again.

torch's "mega-cache" (torch.compiler.save_cache_artifacts / load_cache_artifacts) bundles
what inductor compiled in this process (graphs, kernels, autotuning picks) into one blob.
We write it after a warm-up and load it before the next one: a restart then only traces,
and, because every process after the first runs kernels from the same blob, the autotuning
picks (and so the bits of the images) are the same in every server process.

The folder is set by the host (the nodes use ComfyUI's user directory) or by the
ZIMAGE_TURBO_CACHE_DIR environment variable; without either nothing is written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

ENV_VAR = "ZIMAGE_TURBO_CACHE_DIR"
log = logging.getLogger("zimage_turbo")

_folder: Path | None = None
_loaded: set[str] = set()
_lock = threading.Lock()


def configure(folder: str | os.PathLike | None) -> None:
    """Where artifacts live when ZIMAGE_TURBO_CACHE_DIR is not set (None: nowhere)."""
    global _folder
    _folder = Path(folder) if folder else None


def folder() -> Path | None:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return _folder


def tag(device: torch.device, dtype: torch.dtype, model_signature: str) -> str:
    """One blob per torch build, GPU model, dtype and model shape: artifacts of another never apply."""
    if device.type == "cuda":
        dev = f"{torch.cuda.get_device_name(device)}|{torch.cuda.get_device_capability(device)}"
    else:
        dev = device.type
    key = f"{torch.__version__}|{torch.version.cuda}|{dev}|{dtype}|{model_signature}"
    return "zimage_turbo_" + hashlib.sha1(key.encode()).hexdigest()[:16]


def _path(name: str) -> Path | None:
    base = folder()
    return base / f"{name}.bin" if base else None


def load(name: str) -> bool:
    """Hand the saved blob to torch once per process; True when one was loaded."""
    path = _path(name)
    with _lock:
        if path is None or name in _loaded or not path.is_file():
            return False
        _loaded.add(name)
        try:
            info = torch.compiler.load_cache_artifacts(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - a blob from another build or a damaged file: compile afresh
            info, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = "torch could not read it"  # torch logs its own reason and returns None
        if info is None:
            log.warning("zimage_turbo: compile cache %s not used (%s); compiling afresh", path.name, why)
            return False
        return True


def save(name: str) -> int:
    """Write what this process compiled (atomically: a reader never sees half a blob); bytes written."""
    path = _path(name)
    if path is None:
        return 0
    with _lock:
        try:
            result = torch.compiler.save_cache_artifacts()
            if not result:
                return 0
            blob = result[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
            _loaded.add(name)
            return len(blob)
        except OSError as exc:
            log.warning("zimage_turbo: could not save the compile cache (%s)", exc)
            return 0
