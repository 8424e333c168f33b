"""What the head start's import of the model classes costs once ComfyUI has started, on this machine.

The first image after a server start waits 2-4 s for this import on the GPU machine (bench/NOTES.md, seventh
session), while on a 2-core CPU the same import after ComfyUI's own takes 1.3-1.5 s. This starts ComfyUI the way
main.py does (its modules, then every node and custom node, this pack with its head start off) without serving,
then times the three import statements the head start runs (engine/head_start.py), under cProfile or alone, so that
the report says where the seconds go on the machine that runs it.

    python -m bench.import_profile --comfyui .build/ComfyUI --out OUT [--cprofile] [--tag NAME]

Run it with `python -X importtime` to get the module-by-module list as well (stderr after the line
"== zimage head-start import =="). Writes OUT/import-profile-<tag>.json and .txt.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cprofile", action="store_true", help="profile the import (slower; gives the functions)")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--cpu", action="store_true", help="ComfyUI's --cpu (machines without a GPU)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    comfy = Path(args.comfyui).resolve()

    os.environ["ZIMAGE_TURBO_HEAD_START"] = "0"  # this script runs the import itself, in the foreground
    front = tempfile.mkdtemp()
    link = comfy / "custom_nodes" / "comfyui-zimage-turbo"  # this pack installed, as users have it
    if not link.exists():
        link.symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    os.chdir(comfy)
    sys.path.insert(0, str(comfy))
    sys.argv = ["main.py", "--front-end-root", front, "--listen", "127.0.0.1", "--port", "0"] + (["--cpu"] if args.cpu else [])
    site = [p for p in sys.path if p.endswith("site") or "site-packages" in p]
    pyc_before = any((Path(p) / "diffusers" / "__pycache__").is_dir() for p in site)

    t0 = time.perf_counter()
    import main as comfy_main  # noqa: E402 - ComfyUI's modules, as its main.py imports them

    comfy_main.start_comfyui()  # every node and custom node; no server is started
    t1 = time.perf_counter()
    modules_before = len(sys.modules)
    preloaded = {m: m in sys.modules for m in ("torch._dynamo", "torch._inductor", "transformers", "diffusers",
                                                "scipy.stats", "torchvision.ops", "accelerate", "peft")}

    print("== zimage head-start import ==", file=sys.stderr, flush=True)
    prof = None
    if args.cprofile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    marks = {}
    t = time.perf_counter()
    import diffusers.loaders.single_file_utils  # noqa: F401

    marks["diffusers.loaders.single_file_utils"] = time.perf_counter() - t
    t = time.perf_counter()
    from diffusers import AutoencoderKL, ZImageTransformer2DModel  # noqa: F401

    marks["diffusers model classes"] = time.perf_counter() - t
    t = time.perf_counter()
    from transformers import Qwen3Config, Qwen3Model  # noqa: F401

    marks["transformers Qwen3"] = time.perf_counter() - t
    if prof is not None:
        prof.disable()
    print("== done ==", file=sys.stderr, flush=True)

    report = {
        "tag": args.tag,
        "comfyui_start_s": round(t1 - t0, 3),
        "import_s": {k: round(v, 3) for k, v in marks.items()},
        "import_total_s": round(sum(marks.values()), 3),
        "modules_before": modules_before,
        "modules_added": len(sys.modules) - modules_before,
        "already_imported_by_comfyui": preloaded,
        "diffusers_pycache_before": pyc_before,
        "cprofile": bool(prof),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    (out / f"import-profile-{args.tag}.json").write_text(json.dumps(report, indent=2))
    text = json.dumps(report, indent=2) + "\n"
    if prof is not None:
        import pstats

        for key in ("cumulative", "tottime"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(45)
            text += f"\n==== by {key} ====\n" + buf.getvalue()
    (out / f"import-profile-{args.tag}.txt").write_text(text)
    print(json.dumps(report))
    os._exit(0)  # ComfyUI's threads (prompt worker) would keep the process alive


if __name__ == "__main__":
    main()
