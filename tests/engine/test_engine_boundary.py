"""The engine knows nothing of ComfyUI: no module of it imports ComfyUI's, or the node layer above it."""

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "zimage_turbo" / "engine"
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "execution",
                 "nodes", "node_helpers", "latent_preview", "app"}


def imported_roots(path: Path, depth: int = 0) -> list[tuple[int, str]]:
    """(line, module) of every import; `depth` is how deep in the engine's packages the file sits
    (0 for engine/x.py, 1 for engine/files/x.py), so a relative import reaching above the engine shows
    as "..name"."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level >= depth + 2:  # e.g. `from ..nodes import x` in engine/x.py: out of the engine
                out.append((node.lineno, ".." + (node.module or "")))
            elif node.level == 0 and node.module:
                out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_no_engine_module_imports_comfyui_or_the_node_layer():
    files = sorted(ENGINE.rglob("*.py"))
    assert len(files) > 10
    bad = [f"{f.relative_to(ENGINE)}:{line} imports {mod}" for f in files
           for line, mod in imported_roots(f, len(f.relative_to(ENGINE).parts) - 1)
           if mod in COMFY_MODULES or mod.startswith("..")]
    assert bad == []


def test_the_check_catches_an_upward_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom ..nodes import loader_node\nimport folder_paths\nfrom comfy.utils import x\n")
    assert [m for _, m in imported_roots(sample)] == ["os", "..nodes", "folder_paths", "comfy"]
    # One package deeper, `..` is still inside the engine and `...` leaves it.
    sample.write_text("from ..errors import X\nfrom ...nodes import loader_node\n")
    assert [m for _, m in imported_roots(sample, depth=1)] == ["..nodes"]


NODES = ENGINE.parent / "nodes"


def engine_imports(path: Path) -> list[tuple[int, str]]:
    """(line, engine module) for every `from ..engine[.x] import ...` of a node-layer file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 2 and (node.module or "").startswith("engine"):
            if node.module == "engine":
                out += [(node.lineno, f"engine.{alias.name}") for alias in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def test_the_node_layer_uses_the_engine_api_alone():
    """Nodes and routes go through engine/api.py, never into the engine's internals."""
    files = sorted(NODES.glob("*.py"))
    used = [(f.name, line, mod) for f in files for line, mod in engine_imports(f)]
    assert used, "the node layer should use the engine"
    assert [u for u in used if u[2] != "engine.api"] == []


def test_the_api_names_what_it_exports():
    import zimage_turbo.engine.api as api

    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert missing == []
