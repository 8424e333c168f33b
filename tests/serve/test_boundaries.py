"""Where Ray may be imported, and what the serving code may import; the command line's answers to bad arguments.

The node pack is what ComfyUI loads: it must never import the serving code (nor Ray, which users of one GPU do not
install). The serving code talks to ComfyUI over HTTP only: it imports neither ComfyUI nor the engine.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "zimage_turbo" / "serve"
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "execution",
                 "nodes", "node_helpers", "latent_preview", "app"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a file; relative ones as '.x' / '..x'."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, "." * node.level + (node.module or "")))
    return out


def test_ray_is_imported_by_the_serving_code_alone():
    shipped = [REPO / "__init__.py", *sorted((REPO / "zimage_turbo").rglob("*.py"))]
    outside = [p for p in shipped if SERVE not in p.parents]
    assert len(outside) > 20
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in outside for line, mod in imports(p)
           if mod.split(".")[0] in ("ray", "fastapi", "starlette") or "serve" in mod.split(".")]
    assert bad == []


def test_the_serving_code_imports_neither_comfyui_nor_the_engine():
    files = sorted(SERVE.glob("*.py"))
    assert len(files) >= 6
    bad = [f"{p.name}:{line} imports {mod}" for p in files for line, mod in imports(p)
           if mod.split(".")[0] in COMFY_MODULES or mod.startswith("..")
           or mod.split(".")[0] in ("torch", "diffusers", "zimage_turbo")]
    assert bad == []


def test_the_helpers_without_ray_load_without_ray():
    code = ("import sys, zimage_turbo.serve, zimage_turbo.serve.prompts, zimage_turbo.serve.comfy_process; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'fastapi')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zimage_turbo.serve", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_the_command_line_refuses_bad_arguments_before_starting_anything(tmp_path):
    out = cli("--comfyui", str(tmp_path))
    assert out.returncode == 2 and f"no ComfyUI at {tmp_path} (main.py not found)" in out.stderr
    (tmp_path / "main.py").write_text("")
    for args, message in ((("--gpus", "0"), "--gpus must be at least 1"),
                          (("--gpus", "two"), "--gpus takes a number or 'all', not 'two'"),
                          (("--autoscale", "4"), "--autoscale takes MIN,MAX (e.g. 1,8), not '4'"),
                          (("--autoscale", "3,1"), "--autoscale needs 0 <= MIN <= MAX and MAX >= 1, not 3,1"),
                          (("--route", "random"), "invalid choice: 'random'"),
                          (("--env", "NOEQUALS"), "--env takes NAME=VALUE, not 'NOEQUALS'"),
                          (("--max-ongoing", "0"), "--max-ongoing must be at least 1")):
        out = cli("--comfyui", str(tmp_path), *args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    shown = cli("--help")
    assert shown.returncode == 0 and "ray start --address" in shown.stdout
