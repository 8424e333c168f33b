"""ComfyUI's own executor, in this process: for timing graphs without HTTP, websocket or PNG encoding.

Runs exactly what the server's prompt worker runs (execution.PromptExecutor.execute) on
a graph in API format, with the model folders of `base_dir` and this package loaded
from its custom_nodes. Used by the benchmark to time ComfyUI's native Z-Image graph and
this package's nodes in the same ComfyUI, on the same GPU, in the same process.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

import torch


PACK_NAME = "comfyui-zimage-turbo"


class _NoServer:
    """What PromptExecutor needs of the server: somewhere to send messages, which nobody reads."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None


def put_comfyui_on_path(comfy_dir: Path) -> None:
    """Let this process import ComfyUI's modules (comfy, nodes, execution, ...).

    The one sys.path edit of the repository, and it cannot go: ComfyUI is an application whose modules import each
    other as top-level names from its own folder (main.py relies on being run from there), not a package."""
    folder = str(Path(comfy_dir).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)


class InProcessComfy:
    def __init__(self, comfy_dir: Path, base_dir: Path, extra_args: list[str] | None = None):
        comfy_dir, base_dir = Path(comfy_dir).resolve(), Path(base_dir).resolve()
        for sub in ("models", "custom_nodes", "input", "output", "temp", "user"):
            (base_dir / sub).mkdir(parents=True, exist_ok=True)
        sys.argv = ["main.py", "--base-directory", str(base_dir), "--disable-auto-launch", *(extra_args or [])]
        put_comfyui_on_path(comfy_dir)
        import comfy.options

        comfy.options.enable_args_parsing()
        # As main.py does: import ComfyUI's `utils` package before nodes.py puts comfy/ (with its
        # utils.py) first on sys.path.
        import utils.extra_config  # noqa: F401
        import execution  # noqa: F401  (imports nodes, comfy.model_management: picks the device)
        import nodes

        self.execution = execution
        self.nodes = nodes
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.executors: dict[str, object] = {}

    def executor(self, name: str = "default"):
        """One executor per workflow: ComfyUI's classic cache keeps only the last prompt's nodes, so two
        workflows sharing one executor would evict each other's loaded models on every switch."""
        if name not in self.executors:
            self.executors[name] = self.execution.PromptExecutor(
                _NoServer(), cache_type=self.execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
        return self.executors[name]

    def validate(self, prompt: dict, image_node: str) -> tuple[bool, object]:
        """ComfyUI's own queue-time validation: (ok, errors). It wants an output node: a preview of `image_node`."""
        prompt = dict(prompt, __preview={"class_type": "PreviewImage", "inputs": {"images": [image_node, 0]}})
        result = asyncio.run(self.execution.validate_prompt(uuid.uuid4().hex, prompt, None))
        return result[0], (result[1], result[3])

    def run(self, prompt: dict, outputs: list[str], executor: str = "default") -> float:
        """Execute `prompt` up to `outputs` (node ids); return seconds, with the GPU synchronised."""
        ex = self.executor(executor)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ex.execute(prompt, uuid.uuid4().hex, {}, outputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if not ex.success:
            errors = [m for m in ex.status_messages if m[0] == "execution_error"]
            detail = errors[0][1].get("exception_message") if errors else ex.status_messages[-3:]
            raise RuntimeError(f"ComfyUI execution failed: {detail}")
        return seconds

    def package_module(self, name: str):
        """A module of this package as ComfyUI loaded it (its own copy, apart from a plain `import engine`)."""
        suffix = f"{PACK_NAME}.{name}"  # ComfyUI names the package by its path (0.3.75) or folder name
        for key, module in sys.modules.items():
            if key == suffix or key.endswith("/" + suffix) or key.endswith("\\" + suffix):
                return module
        raise KeyError(f"{suffix} is not loaded: is the package in ComfyUI's custom_nodes?")

    def loaded_modules(self) -> list[torch.nn.Module]:
        """The modules ComfyUI's model manager holds (to account for their memory)."""
        import comfy.model_management as mm

        out = []
        for lm in mm.current_loaded_models:
            patcher = lm.model
            if patcher is not None and isinstance(getattr(patcher, "model", None), torch.nn.Module):
                out.append(patcher.model)
        return out


def link_models(base_dir: Path, root: Path) -> None:
    """Make ComfyUI's model folders under base_dir point at the files of a built model root."""
    for sub in ("diffusion_models", "text_encoders", "vae", "loras", "diffusers"):
        target = Path(base_dir) / "models" / sub
        target.mkdir(parents=True, exist_ok=True)
        src = Path(root) / sub
        if not src.is_dir():
            continue
        for f in src.iterdir():
            link = target / f.name
            if not link.exists():
                os.symlink(f.resolve(), link)


def link_package(base_dir: Path, repo: Path, name: str = PACK_NAME) -> None:
    link = Path(base_dir) / "custom_nodes" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        os.symlink(Path(repo).resolve(), link, target_is_directory=True)
