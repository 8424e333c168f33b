"""Helpers of the Ray Serve tests: prompts, HTTP, images, and finding the replicas' ComfyUI processes.

Everything runs on this machine: Ray clusters on 127.0.0.1, ComfyUI on the CPU, the tiny random-weight model.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
COMFY_DIR = REPO / ".build" / "ComfyUI"
# The real model's file names: the replicas' ComfyUI holds the tiny model under them, as the saved workflows expect.
MODEL, TEXT_ENCODER, VAE = "z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors"
PRELOAD = json.dumps({"model": MODEL, "text_encoder": TEXT_ENCODER, "vae": VAE, "dtype": "fp32", "device": "auto"})


def style_loras() -> list[str]:
    """The LoRA files the saved style workflows (workflows/api) name."""
    names = set()
    for wf in sorted((REPO / "workflows" / "api").glob("*.json")):
        for node in json.loads(wf.read_text()).values():
            if node.get("class_type") == "ZImageTurboLoraStack":
                names |= {row["lora"] for row in json.loads(node["inputs"]["loras"])}
    return sorted(names)


def place_tiny_model(models: Path, tiny: dict) -> None:
    """The tests' tiny model (tests/conftest.py) into a ComfyUI models folder, under the real names; its LoRAs under
    their own names and under the style workflows' names."""
    built = tiny["built"]
    for sub, src, name in (("diffusion_models", built.transformer_file, MODEL),
                           ("text_encoders", built.text_encoder_file, TEXT_ENCODER), ("vae", built.vae_file, VAE)):
        (models / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, models / sub / name)
    (models / "loras").mkdir(parents=True, exist_ok=True)
    lora_files = [path for path, _ in tiny["loras"].values()]
    for path in lora_files:
        shutil.copyfile(path, models / "loras" / path.name)
    for path, name in zip(lora_files, style_loras()):
        shutil.copyfile(path, models / "loras" / name)


def graph(seed: int, negative: str = "", loras=None, size: int = 64, prefix: str = "serve") -> dict:
    """Loader -> LoRA Stack -> Sampler -> Probe -> Save on the tiny model (fp32, as the replicas preload it).

    `negative` changes nothing in the image at cfg 0, but it is a new input, so ComfyUI runs the sampler again
    instead of answering from its cache."""
    return {
        "1": {"class_type": "ZImageTurboLoader", "inputs": {"model": MODEL, "text_encoder": TEXT_ENCODER, "vae": VAE,
                                                           "dtype": "fp32", "device": "auto", "memory": "resident"}},
        "2": {"class_type": "ZImageTurboLoraStack", "inputs": {"loras": json.dumps(list(loras or []))}},
        "3": {"class_type": "ZImageTurboSampler", "inputs": {
            "pipe": ["1", 0], "lora_stack": ["2", 0], "prompt": "a lighthouse on a cliff, 悬崖上的灯塔",
            "negative_prompt": negative, "width": size, "height": size, "steps": 8, "cfg": 0.0, "shift": 3.0,
            "seed": seed, "batch_size": 1}},
        "4": {"class_type": "ZImageTurboProbe", "inputs": {"images": ["3", 0], "report": ["3", 2]}},
        "5": {"class_type": "ZImageTurboSave", "inputs": {"images": ["4", 0], "filename_prefix": prefix, "format": "png",
                                                         "quality": 90}},
    }


def http(method: str, url: str, body=None, timeout: float = 300) -> tuple[int, object]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in ctype and raw else raw


def run(url: str, g: dict, **extra) -> tuple[int, dict]:
    """POST /zimage_serve/run: the whole result in one answer."""
    return http("POST", f"{url}/zimage_serve/run", {"prompt": g, **extra})


def run_many(url: str, graphs: list[dict]) -> list[tuple[int, dict]]:
    with ThreadPoolExecutor(len(graphs)) as pool:
        return list(pool.map(lambda g: run(url, g), graphs))


def pixels(answer: dict) -> np.ndarray:
    import base64

    (image,) = answer["images"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image["data_base64"]))).convert("RGB"))


def comfy_processes(marker: str) -> dict[int, int]:
    """{pid: port} of the ComfyUI servers whose command line holds `marker` (the test's work folder)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in args]
        if any(a.endswith("main.py") for a in args) and any(marker in a for a in args) and "--port" in args:
            if (entry / "stat").read_text().split()[2] != "Z":  # not a zombie
                found[int(entry.name)] = int(args[args.index("--port") + 1])
    return found


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def running_prompt(port: int) -> bool:
    """True while this ComfyUI executes a prompt (asked directly, not through the front door)."""
    try:
        status, body = http("GET", f"http://127.0.0.1:{port}/queue", timeout=2)
    except OSError:
        return False
    return status == 200 and bool(body.get("queue_running"))


def no_comfy_left(marker: str, timeout: float = 30) -> None:
    wait_for(lambda: not comfy_processes(marker), timeout, "every ComfyUI of the replicas to stop", every=0.5)


def ray_env_clean():
    """Ray reads RAY_ADDRESS; a value left by a developer's shell would send the tests to their cluster."""
    os.environ.pop("RAY_ADDRESS", None)
