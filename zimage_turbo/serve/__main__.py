"""python -m zimage_turbo.serve --comfyui PATH [--gpus N] ... : serve Z-Image-Turbo from every GPU, on Ray Serve.

One machine with N GPUs (starts a local Ray cluster, one replica per GPU):
    python -m zimage_turbo.serve --comfyui /opt/ComfyUI --gpus 2 --host 0.0.0.0 --port 8188

More machines: start Ray on each (same Python environment, ComfyUI with this pack and the models on every one):
    head$    ray start --head --port 6379 --num-gpus 2
    worker$  ray start --address HEAD_IP:6379 --num-gpus 4      # (with the head's auth token, see the README)
    head$    python -m zimage_turbo.serve --address auto --comfyui /opt/ComfyUI --gpus all --host 0.0.0.0

Then POST workflows to http://HOST:PORT/prompt (ComfyUI's API: GET /history/{id}, GET /view, /ws work unchanged) or
to /zimage_serve/run. Ctrl-C (or SIGTERM) drains the replicas (their queued prompts finish) and stops.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

EXIT_USAGE = 2


def _replicas(text: str) -> str | int:
    if text == "all":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus takes a number or 'all', not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("--gpus must be at least 1")
    return n


def _autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--autoscale takes MIN,MAX (e.g. 1,8), not {text!r}") from None
    return lo, hi


def _pair(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--env takes NAME=VALUE, not {text!r}")
    name, value = text.split("=", 1)
    return name, value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zimage_turbo.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", required=True, help="ComfyUI's folder (holds main.py; this pack in custom_nodes)")
    ap.add_argument("--gpus", type=_replicas, default="all",
                    help="replicas, one per GPU: a number, or 'all' (every GPU of the Ray cluster; default)")
    ap.add_argument("--autoscale", type=_autoscale, metavar="MIN,MAX",
                    help="let Serve add and remove replicas between MIN and MAX by load (instead of --gpus)")
    ap.add_argument("--cpu", action="store_true", help="replicas on the CPU (--gpus then counts replicas): a try-out")
    ap.add_argument("--address", help="an existing Ray cluster ('auto' after `ray start --head`); default: start one")
    ap.add_argument("--host", default="127.0.0.1", help="the front door's address (0.0.0.0 for other machines)")
    ap.add_argument("--port", type=int, default=8188, help="the front door's port (default 8188, ComfyUI's)")
    ap.add_argument("--base-directory", help="ComfyUI's --base-directory (models, custom_nodes, user ...)")
    ap.add_argument("--output-directory", help="where the replicas' ComfyUIs save files (one subfolder each)")
    ap.add_argument("--work-dir", help="per-replica temp folders and ComfyUI logs (default: <tmp>/zimage_serve)")
    ap.add_argument("--preload", default=None,
                    help="the pack's preload config for every replica (JSON or a file; default: "
                         "user/zimage_turbo_preload.json if there, else the standard Z-Image-Turbo files); 'none': "
                         "no preload (the first prompt of each replica loads the model)")
    ap.add_argument("--route", choices=("least_loaded", "lora"), default="least_loaded",
                    help="least_loaded (Serve's default); lora: same LoRA set -> the replica that ran it last, if free")
    ap.add_argument("--max-ongoing", type=int, default=2,
                    help="prompts a replica holds at once (one running + queued in its ComfyUI; default 2)")
    ap.add_argument("--comfy-arg", action="append", default=[], metavar="ARG",
                    help="an extra argument for every ComfyUI (repeat it; e.g. --comfy-arg=--fast)")
    ap.add_argument("--env", type=_pair, action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for every ComfyUI (repeat it)")
    ap.add_argument("--python", help="the Python that runs ComfyUI (default: the replicas' own)")
    return ap


DEFAULT_PRELOAD = {"model": "z_image_turbo_bf16.safetensors", "text_encoder": "qwen_3_4b.safetensors",
                   "vae": "ae.safetensors"}


def preload_value(arg: str | None, comfyui: str, base: str | None) -> tuple[str | None, bool]:
    """(ZIMAGE_TURBO_PRELOAD for the replicas, whether to wait for it)."""
    if arg is not None:
        if arg.strip().lower() == "none":
            return None, False
        return arg, True
    user_file = Path(base or comfyui) / "user" / "zimage_turbo_preload.json"
    if user_file.is_file():
        return None, True  # the pack reads it itself
    return json.dumps(DEFAULT_PRELOAD), True


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not (Path(args.comfyui) / "main.py").is_file():
        print(f"error: no ComfyUI at {args.comfyui} (main.py not found): give --comfyui the folder that holds main.py",
              file=sys.stderr)
        return EXIT_USAGE
    if args.autoscale is not None and not (0 <= args.autoscale[0] <= args.autoscale[1] and args.autoscale[1] >= 1):
        print(f"error: --autoscale needs 0 <= MIN <= MAX and MAX >= 1, not {args.autoscale[0]},{args.autoscale[1]}",
              file=sys.stderr)
        return EXIT_USAGE
    if args.max_ongoing < 1:
        print("error: --max-ongoing must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    from . import app  # imports ray: only here, so that --help and bad arguments answer at once

    app.connect(args.address)
    replicas, autoscale = args.gpus, args.autoscale
    if autoscale is None and replicas == "all":
        replicas = 1 if args.cpu else app.cluster_gpus()
        if replicas < 1:
            print("no GPU in the Ray cluster: give --cpu to try it on the CPU, or start Ray with --num-gpus",
                  file=sys.stderr)
            return EXIT_USAGE
    preload, wait = preload_value(args.preload, args.comfyui, args.base_directory)
    try:
        settings = app.ServeSettings(
            comfyui=str(Path(args.comfyui).resolve()), replicas=None if autoscale else replicas, autoscale=autoscale,
            cpu=args.cpu, base_directory=args.base_directory, output_directory=args.output_directory,
            python=args.python, comfy_args=args.comfy_arg, env=dict(args.env), preload=preload, wait_for_preload=wait,
            route=args.route, max_ongoing_requests=args.max_ongoing, host=args.host, port=args.port,
            **({"work_dir": args.work_dir} if args.work_dir else {}))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"starting {autoscale or replicas} replica(s) on {app.environment_summary()}; each warms its model first")
    app.start(settings)
    print(f"ready: http://{args.host}:{args.port}/prompt (ComfyUI's API) and /zimage_serve/run; Ctrl-C stops")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("draining the replicas (prompts they hold finish) ...")
    app.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
