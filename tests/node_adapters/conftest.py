"""Node adapters without a server: ComfyUI's modules are stood in for, nothing else is.

The stand-ins record what the nodes ask of ComfyUI (model folders, progress, model manager) so
the tests can check validation, parsing and error wording directly; the real-server tests in
tests/e2e stay the proof that the same code works inside ComfyUI.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PACK = "zimage_pack_under_test"


class FolderPaths(types.ModuleType):
    """folder_paths: model folders are real temp folders, listed like ComfyUI lists them."""

    def __init__(self):
        super().__init__("folder_paths")
        self.roots: dict[str, list[str]] = {}
        self.user_dir = tempfile.mkdtemp(prefix="zimage_user_")
        self.__file__ = str(REPO / "folder_paths.py")  # the tokenizer is looked up beside it

    def get_folder_paths(self, folder):
        return self.roots.get(folder, [])

    def get_user_directory(self):
        return self.user_dir

    def get_filename_list(self, folder):
        out = []
        for root in self.roots.get(folder, []):
            for p in sorted(Path(root).rglob("*")):
                if p.is_file():
                    out.append(p.relative_to(root).as_posix())
        return out


class _Patcher:
    def __init__(self, model, load_device=None, offload_device=None, size=0):
        self.model, self.load_device, self.size = model, load_device, size
        self.callbacks = []

    def add_callback(self, kind, fn):
        self.callbacks.append((kind, fn))


def _install_stand_ins(monkeypatch) -> FolderPaths:
    fp = FolderPaths()
    comfy = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.interrupted = False

    def throw_if_interrupted():
        if mm.interrupted:
            raise InterruptedError("interrupted")

    mm.throw_exception_if_processing_interrupted = throw_if_interrupted
    mm.loaded = []
    mm.load_models_gpu = lambda patchers, force_full_load=False: mm.loaded.extend(patchers)
    patcher_mod = types.ModuleType("comfy.model_patcher")
    patcher_mod.ModelPatcher = _Patcher
    utils = types.ModuleType("comfy.utils")
    utils.progress = []

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            utils.progress.append(value)

    utils.ProgressBar = ProgressBar
    ext = types.ModuleType("comfy.patcher_extension")
    ext.CallbacksMP = types.SimpleNamespace(ON_DETACH="on_detach")
    comfy.model_management, comfy.model_patcher, comfy.utils, comfy.patcher_extension = mm, patcher_mod, utils, ext
    for name, mod in {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm,
                      "comfy.model_patcher": patcher_mod, "comfy.utils": utils, "comfy.patcher_extension": ext}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return fp


@pytest.fixture()
def pack(monkeypatch, tmp_path):
    """The node pack imported as a package (as ComfyUI does), with ComfyUI's modules stood in for."""
    fp = _install_stand_ins(monkeypatch)
    for folder in ("diffusion_models", "text_encoders", "vae", "loras", "diffusers"):
        (tmp_path / "models" / folder).mkdir(parents=True)
        fp.roots[folder] = [str(tmp_path / "models" / folder)]
    for name in [m for m in sys.modules if m == PACK or m.startswith(PACK + ".")]:
        monkeypatch.delitem(sys.modules, name)
    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, PACK, module)
    spec.loader.exec_module(module)
    module.models = tmp_path / "models"
    module.folder_paths = fp
    yield module
    for name in [m for m in sys.modules if m.startswith(PACK + ".")]:
        sys.modules.pop(name, None)
