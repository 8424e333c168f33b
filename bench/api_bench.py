"""What users feel through a real ComfyUI server's HTTP API: ComfyUI's own Z-Image graph against this package's.

Each system gets ComfyUI server processes of its own, started here one after the other (loopback only,
`--front-end-root` an empty folder, this package in custom_nodes, the model files and two LoRAs in the model
folders: one diffusers-format, one kohya-format). Prompts go through POST /prompt and are followed on the
websocket until execution_success (the image file is then on disk).

  native: ComfyUI's Z-Image-Turbo template: UNETLoader -> ModelSamplingAuraFlow(shift 3) -> KSampler(8 steps,
          cfg 1, res_multistep, simple); CLIPLoader(lumina2) -> CLIPTextEncode -> positive, ConditioningZeroOut
          -> negative; EmptySD3LatentImage; VAELoader -> VAEDecode -> SaveImage; styles: LoraLoaderModelOnly
          between UNETLoader and ModelSamplingAuraFlow.
  ours:   workflows/api/zimage_sugar.json (Loader -> LoRA Stack -> Sampler -> Probe -> output node), with the
          file names, prompt, seed, size and LoRA rows substituted.

Servers and what each measures (section names for --only in brackets):
  [native]  one server: first image from launching the process, first styled image, steady, styled steady,
            switching LoRAs every image, images/s at concurrency 1/2/4.
  [cold]    ours with empty compile caches (ZIMAGE_TURBO_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR): first image, first
            styled image; then it waits until the background compile is done and its artifacts are on disk.
  [warm]    ours restarted on the same cache folders: first image, first styled image, then (compiled) steady,
            styled steady, switching, concurrency.
  [preload] ours with ZIMAGE_TURBO_PRELOAD (and the warm caches): waits until GET /zimage_turbo/status says the
            preload is ready, then the first image and the first styled image.
  [pairs]   (not by default) --pairs N rounds of one native server (plain ComfyUI: this package NOT installed) and
            one of ours (empty compile caches), in alternating order, each: first image from launch, first styled
            image, stop. A server's start-up varied
            12.7-19.6 s on one H100 with the same start-up code; interleaved rounds compare like with like.
Ours needs three servers: the cold one spends its life compiling in the background, so its steady figures would
not be steady; the warm restart is the normal life of a server and gets compiled code from the cache quickly. One
native server serves every native section (it has no compile cache to be cold or warm).

    # CPU smoke run on the tiny random-weight model (ComfyUI's native loaders cannot read the tiny files: native
    # is then reported as null with ComfyUI's error):
    .venv/bin/python -m bench.api_bench --tiny
    # GPU machine, after bench/gpu_run.sh's set-up (true-size random weights from bench/build_model.py):
    python3 -m bench.api_bench --root /tmp/zfull --out $OUT --logs $OUT/logs

Writes <out>/<YYYY-MM-DD>-<device>-api.json and .md (default bench/results/api/) after every section, so a run cut
off by a time limit keeps what it measured. --deadline (seconds since the start) stops starting new work; the
default keeps the whole run within about 480 s on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import itertools
import json
import math
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench import load_test, soak
from devtools import graphs
from scripts.comfy_client import COMFY_DIR, ComfyError, ComfyServer

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results" / "api"
OUR_WORKFLOW = REPO / "workflows" / "api" / "zimage_sugar.json"
SECTIONS = ("native", "cold", "warm", "preload")
# Not run by default: --only pairs (or with the others).
EXTRA_SECTIONS = ("pairs",)
SYSTEMS = ("native", "ours")
LOADER, STACK, SAMPLER, PROBE = graphs.LOADER_CLASS, graphs.STACK_CLASS, graphs.SAMPLER_CLASS, graphs.PROBE_CLASS
PRELOAD_KEYS = ("model", "text_encoder", "vae", "dtype", "device", "memory", "compile")
# Keys of the result that hold {"native": ..., "ours": ...}, in the order the report shows them.
HEADLINE = (
    ("first_image_s", ("first image after the server starts (s, from launching the process; ours: cold compile "
                      "cache)")),
    ("first_image_warm_s", "first image after a restart with a warm compile cache (s, from launching)"),
    ("first_lora_image_s", ("first styled image, queued right after the first image (s, POST -> success; ours: "
                           "cold server)")),
    ("first_lora_image_warm_s", "first styled image after a restart with a warm cache (s, POST -> success)"),
    ("preload_ready_s", "preload ready (s, from launching the process)"),
    ("first_image_preloaded_s", "first image once the preload is ready (s, POST -> success)"),
    ("first_lora_image_preloaded_s", "first styled image after that (s, POST -> success)"),
    ("steady_s", "steady image, new prompt and seed each (median s, POST -> success)"),
    ("lora_steady_s", "styled steady image, one LoRA on (median s)"),
    ("switch_s", "switching between the two LoRAs every image (median s)"),
    ("step_ms", "denoising step, no LoRA (median ms, websocket progress)"),
    ("lora_step_ms", "denoising step, one LoRA on (median ms, websocket progress)"),
    ("lora_step_overhead_pct", "per-step cost of a LoRA being on (%, websocket progress)"),
    ("lora_step_overhead_pct_probe", "per-step cost of a LoRA being on (%, our probe's synchronised step times)"),
    ("api_minus_inprocess_s", "POST -> success minus in-process time (median s, see definitions)"),
    ("api_minus_graph_s", "POST -> success minus execution_start -> output node starts (median s, same rule both)"),
    ("images_per_s_c1", "images/s, concurrency 1"),
    ("images_per_s_c2", "images/s, concurrency 2"),
    ("images_per_s_c4", "images/s, concurrency 4"),
)
NOT_AVAILABLE = "not available"


class BenchSetupError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- helpers

def lora_format(path: Path) -> str:
    """"diffusers" (lora_A/lora_B), "kohya" (lora_down/lora_up) or "other", from the safetensors header only."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        keys = [k for k in json.loads(f.read(n)) if k != "__metadata__"]
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    if any(".lora_down." in k or ".lora_up." in k for k in keys):
        return "kohya"
    return "other"


def pick_loras(setup: soak.ModelSetup) -> list[dict]:
    """One diffusers-format and one kohya-format LoRA of the setup: [A (diffusers), B (kohya)]."""
    sources = {name: Path(src) for src, name in setup.files.get("loras", [])}
    found: dict[str, dict] = {}
    for name in setup.loras:
        fmt = lora_format(sources[name])
        found.setdefault(fmt, {"file": name, "format": fmt, "bytes": sources[name].stat().st_size})
    missing = [f for f in ("diffusers", "kohya") if f not in found]
    if missing:
        raise BenchSetupError(f"the model folder needs a diffusers-format and a kohya-format LoRA; no {missing} one "
                              f"among {setup.loras}")
    return [found["diffusers"], found["kohya"]]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def stats(values) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def pct(new, base):
    if new is None or not base:
        return None
    return 100.0 * (new / base - 1.0)


def finite(value):
    """`value` with NaN and infinities as None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def folder_files(folder: Path) -> tuple[int, int]:
    """(files, bytes) under `folder` (0, 0 when it does not exist)."""
    count = size = 0
    if folder.is_dir():
        for p in folder.rglob("*"):
            if p.is_file():
                count += 1
                size += p.stat().st_size
    return count, size


@functools.cache
def runtime_info(python: str, cpu: bool) -> dict:
    """torch version and device name, asked of the servers' Python in a child process (this one keeps no CUDA
    context on the GPU)."""
    code = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available() "
            "and torch.cuda.get_device_name(0)}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
        info = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"torch": None, "device": "unknown", "error": repr(exc)}
    return {"torch": info["torch"], "device": "cpu" if cpu or not info["cuda"] else info["cuda"]}


def comfy_version() -> str | None:
    try:
        text = (COMFY_DIR / "comfyui_version.py").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


def prewarm_page_cache(setup: soak.ModelSetup) -> tuple[float, int]:
    """Read every model file once, so the first server started does not alone pay for the disk."""
    t0, total = time.perf_counter(), 0
    for paths in setup.files.values():
        for src, _ in paths:
            with open(Path(src).resolve(), "rb", buffering=0) as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
    return time.perf_counter() - t0, total


# ------------------------------------------------------------------------------------------------ graphs

def sinks(graph: dict) -> list[str]:
    """Node ids whose outputs no other node uses."""
    used = {v[0] for node in graph.values() for v in node.get("inputs", {}).values()
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)}
    return sorted(nid for nid in graph if nid not in used)


class OursGraphs:
    """Our workflow file with file names, prompt, seed, size and LoRA rows substituted."""

    system = "ours"

    def __init__(self, setup: soak.ModelSetup, width: int, height: int, steps: int, path: Path = OUR_WORKFLOW):
        template = json.loads(Path(path).read_text())
        self.source = str(Path(path).relative_to(REPO)) if Path(path).is_relative_to(REPO) else str(path)

        def one(cls: str) -> str:
            ids = [nid for nid, n in template.items() if n.get("class_type") == cls]
            if len(ids) != 1:
                raise BenchSetupError(f"{self.source}: expected one {cls} node, found {len(ids)}")
            return ids[0]

        self.loader_id, self.stack_id, self.sampler_id = one(LOADER), one(STACK), one(SAMPLER)
        probes = [nid for nid, n in template.items() if n.get("class_type") == PROBE]
        self.probe_id = probes[0] if probes else None
        # The output node: a node nothing consumes that is not the probe (SaveImage or a save node of ours).
        outs = [nid for nid in sinks(template) if nid != self.probe_id]
        outs = [nid for nid in outs if "filename_prefix" in template[nid]["inputs"]] or outs
        if not outs:
            raise BenchSetupError(f"{self.source}: no output node found")
        self.save_id = outs[0]
        self.save_class = template[self.save_id]["class_type"]
        loader = template[self.loader_id]["inputs"]
        loader.update(model=setup.model, text_encoder=setup.text_encoder, vae=setup.vae)
        sampler = template[self.sampler_id]["inputs"]
        sampler.update(width=width, height=height, steps=steps)
        self.base_prompt = sampler["prompt"]
        for nid in list(template):
            template[nid].pop("_meta", None)
        self.template = template

    def loader_settings(self) -> dict:
        inputs = self.template[self.loader_id]["inputs"]
        return {k: inputs[k] for k in PRELOAD_KEYS if k in inputs and not isinstance(inputs[k], list)}

    def graph(self, prompt: str, seed: int, lora: str | None, prefix: str) -> dict:
        g = copy.deepcopy(self.template)
        g[self.sampler_id]["inputs"].update(prompt=prompt, seed=seed)
        rows = [{"lora": lora, "strength": 1.0, "on": True}] if lora else []
        g[self.stack_id]["inputs"]["loras"] = json.dumps(rows)
        if "filename_prefix" in g[self.save_id]["inputs"]:
            g[self.save_id]["inputs"]["filename_prefix"] = prefix
        return g

    def workflow(self) -> load_test.Workflow:
        return load_test.Workflow.from_graph(self.graph(self.base_prompt, 0, None, "api_bench/ours_c"), self.source)


class NativeGraphs:
    """ComfyUI's Z-Image-Turbo template graph (devtools.graphs.native_graph; LoraLoaderModelOnly for a style)."""

    system = "native"
    source = "ComfyUI's Z-Image-Turbo template (API format, built here)"
    sampler_id, save_id, probe_id, lora_id = graphs.NATIVE["sample"], graphs.NATIVE["save"], None, graphs.NATIVE["lora"]
    save_class = "SaveImage"

    def __init__(self, setup: soak.ModelSetup, width: int, height: int, steps: int):
        self.files = {"model": setup.model, "text_encoder": setup.text_encoder, "vae": setup.vae}
        self.size = {"width": width, "height": height, "steps": steps}

    def graph(self, prompt: str, seed: int, lora: str | None, prefix: str) -> dict:
        return graphs.native_graph(prompt=prompt, seed=seed, lora=lora, prefix=prefix, **self.files, **self.size)

    def workflow(self) -> load_test.Workflow:
        return NativeWorkflow(self.graph("", 0, None, "api_bench/native_c"), self.source, [self.sampler_id], None)


@dataclass
class NativeWorkflow(load_test.Workflow):
    """load_test's Workflow for the native graph: the seed is the KSampler's, the prompt the CLIPTextEncode's."""

    def variant(self, seed: int, prompt: str) -> dict:
        graph = copy.deepcopy(self.graph)
        graph[graphs.NATIVE["sample"]]["inputs"]["seed"] = seed
        graph[graphs.NATIVE["encode"]]["inputs"]["text"] = prompt
        return graph


# ----------------------------------------------------------------------------------------------- servers

@dataclass
class Server:
    """One ComfyUI server process of the benchmark."""

    name: str
    system: str
    comfy: ComfyServer
    launched_at: float = 0.0  # perf_counter just before the process was spawned
    ready_s: float | None = None  # launch -> the HTTP API answered
    session: object = None
    info: dict = field(default_factory=dict)

    @property
    def client(self):
        return self.comfy.client

    def stop(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        self.comfy.stop()


def launch(name: str, system: str, base_dir: Path, setup: soak.ModelSetup, *, cpu: bool, front_end: Path,
           log_path: Path, env: dict, timeout: float = 600, link_pack: bool = True) -> Server:
    """Start a server; `ready_s` is measured from just before the process is spawned, the API polled every 50 ms.

    link_pack=False: this package is not in the server's custom_nodes (plain ComfyUI; give it a base_dir of its own).
    """
    comfy = ComfyServer(base_dir, cpu=cpu, extra_args=["--front-end-root", str(front_end), "--output-directory",
                                                       str(Path(base_dir) / "output")],
                        log_path=log_path, env=env, link_pack=link_pack)
    comfy.prepare()
    setup.place(Path(base_dir) / "models")
    server = Server(name, system, comfy)
    failure: list = []

    def start():
        try:
            comfy.start(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            failure.append(exc)

    server.launched_at = time.perf_counter()
    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    while thread.is_alive():
        if comfy.proc is not None and comfy.client.alive():
            server.ready_s = time.perf_counter() - server.launched_at
            break
        time.sleep(0.05)
    thread.join()
    if failure:
        raise failure[0]
    if server.ready_s is None:
        server.ready_s = time.perf_counter() - server.launched_at
    server.session = comfy.client.session()
    return server


# ---------------------------------------------------------------------------------------------- prompts

def _error_text(res) -> str | None:
    err = res.error or {}
    if res.status == "success":
        return None
    if "exception_message" in err:
        return (f"{err.get('node_type')} (node {err.get('node_id')}): {err.get('exception_type')}: "
                f"{str(err.get('exception_message')).strip()}")[:1500]
    return f"{res.status}: {json.dumps(err, default=str)}"[:1500]


def run_prompt(server: Server, graphs, section: str, prompt: str, seed: int, lora: str | None,
               timeout: float) -> dict:
    """Queue one prompt, follow it to the end; a record with its timings (seconds since the POST)."""
    stamps: list[tuple[float, str, dict]] = []

    def on_message(_result, msg):
        stamps.append((time.perf_counter(), msg.get("type"), msg.get("data") or {}))

    graph = graphs.graph(prompt, seed, lora, f"api_bench/{server.name}_{section}")
    t0 = time.perf_counter()
    res = server.session.run(graph, timeout=timeout, on_message=on_message)
    rec = {"section": section, "lora": lora, "seed": seed, "prompt": prompt, "status": res.status,
           "seconds": res.seconds, "error": _error_text(res)}
    progress = [t - t0 for t, kind, d in stamps if kind == "progress" and str(d.get("node")) == graphs.sampler_id]
    rec["progress_s"] = [round(x, 5) for x in progress]
    rec["step_intervals_s"] = [round(b - a, 5) for a, b in itertools.pairwise(progress)]
    start = next((t - t0 for t, kind, _ in stamps if kind == "execution_start"), None)
    save = next((t - t0 for t, kind, d in stamps if kind == "executing" and str(d.get("node")) == graphs.save_id), None)
    done = next((t - t0 for t, kind, _ in stamps if kind == "execution_success"), None)
    rec.update(execution_start_s=start, output_node_start_s=save, success_s=done)
    # When each node began (seconds after the POST): where a slow first image spends its time.
    rec["node_starts_s"] = {str(d.get("node")): round(t - t0, 4) for t, kind, d in stamps
                            if kind == "executing" and d.get("node") is not None}
    # From the server's launch to the success message (history polling afterwards not counted).
    rec["since_launch_s"] = t0 + (done if done is not None else res.seconds) - server.launched_at
    # Every node up to the output node, as the server ran it (queue, HTTP and the output node excluded).
    rec["graph_s"] = save - start if start is not None and save is not None else None
    rec["output_to_success_s"] = done - save if done is not None and save is not None else None
    # The output node's own run vs what follows it: first images spent 0.4-0.6 s here (H100) against 0.03 s later.
    saved = next((t - t0 for t, kind, d in stamps if kind == "executed" and str(d.get("node")) == graphs.save_id), None)
    rec["output_node_s"] = saved - save if saved is not None and save is not None else None
    rec["after_output_node_s"] = done - saved if done is not None and saved is not None else None
    outputs = (res.history or {}).get("outputs", {})
    rec["images"] = len((outputs.get(graphs.save_id) or {}).get("images") or [])
    if (outputs.get(graphs.save_id) or {}).get("zimage_save"):  # our save node: encode and write time per file
        rec["save_files"] = outputs[graphs.save_id]["zimage_save"]
    if res.status == "success" and not rec["images"]:
        rec["status"], rec["error"] = "no_image", f"success without an image from node {graphs.save_id}"
    if graphs.probe_id is not None:
        found = (outputs.get(graphs.probe_id) or {}).get("zimage_probe") or []
        p = found[0] if found else {}
        keep = ("total_s", "load_total_s", "load_s", "lora_s", "text_encode_s", "denoise_s", "vae_decode_s", "mean_step_s",
                "compiled", "compile_path", "lora_path", "base_reloaded", "embedding_cache_hit", "device_name",
                "dtype")
        rec["probe"] = {k: p.get(k) for k in keep if k in p}
        if p.get("step_s"):
            rec["probe"]["step_s"] = [round(s, 6) for s in p["step_s"]]
    return rec


def ok(rec: dict) -> bool:
    return rec.get("status") == "success" and rec.get("images", 0) > 0


# ------------------------------------------------------------------------------------------------- bench

class Budget:
    def __init__(self, deadline_s: float | None):
        self.t0 = time.perf_counter()
        self.deadline_s = deadline_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return float("inf") if self.deadline_s is None else self.deadline_s - self.elapsed()


@dataclass
class Settings:
    width: int = 1024
    height: int = 1024
    steps: int = 8
    runs: int = 3
    requests: int = 6
    levels: tuple = (1, 2, 4)
    only: tuple = SECTIONS
    deadline_s: float | None = 450.0
    compile_wait_s: float = 240.0
    prompt_timeout_s: float = 300.0
    server_threads: int = 0
    prewarm: bool = True
    pairs: int = 3


class ApiBench:
    def __init__(self, setup: soak.ModelSetup, settings: Settings, workdir: Path, out_dir: Path, logs_dir: Path,
                 cpu: bool, log=print):
        self.setup, self.s, self.cpu, self.log = setup, settings, cpu, log
        self.workdir, self.out_dir, self.logs_dir = Path(workdir), Path(out_dir), Path(logs_dir)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.budget = Budget(settings.deadline_s)
        self.loras = pick_loras(setup)
        self.ours = OursGraphs(setup, settings.width, settings.height, settings.steps)
        self.native = NativeGraphs(setup, settings.width, settings.height, settings.steps)
        self.front_end = self.workdir / "front_end_empty"
        self.front_end.mkdir(parents=True, exist_ok=True)
        (self.front_end / "index.html").write_text("")
        self.cache = {"zimage": self.workdir / "compile_cache" / "zimage_turbo",
                      "inductor": self.workdir / "compile_cache" / "torchinductor"}
        self.run_tag = uuid.uuid4().hex[:6]
        self.counter = 0
        self.servers: list[Server] = []
        self.native_unusable: str | None = None
        info = runtime_info(sys.executable, cpu)
        now = dt.datetime.now().astimezone()
        self.r: dict = {
            "schema": 1, "tool": "bench/api_bench.py", "date": now.date().isoformat(),
            "started_at": now.isoformat(timespec="seconds"), "device": info["device"],
            "device_slug": soak.device_slug(info["device"], setup.tiny), "tiny": setup.tiny,
            "model_note": setup.note,
            "versions": {"torch": info["torch"], "comfyui": comfy_version(), "python": sys.version.split()[0]},
            "git": soak.git_state(),
            "settings": {"width": settings.width, "height": settings.height, "steps": settings.steps,
                         "runs": settings.runs, "switch_images": 1 + max(2, settings.runs),
                         "requests_per_level": settings.requests, "levels": list(settings.levels),
                         "only": list(settings.only), "deadline_s": settings.deadline_s,
                         "compile_wait_s": settings.compile_wait_s, "server_threads": settings.server_threads,
                         "loras": self.loras, "our_workflow": self.ours.source,
                         "our_output_node": self.ours.save_class, "native_graph": self.native.source,
                         "base_prompt": self.ours.base_prompt, "cpu": cpu},
        }
        for key, _ in HEADLINE:
            self.r[key] = {"native": None, "ours": None}
        self.r.update({"stats": {}, "servers": {}, "compile": {}, "preload": {}, "concurrency": {},
                       "runs": {"native": [], "ours": []}, "sections": [], "errors": {}, "skipped": {},
                       "native_unusable": None, "wall_s": None, "finished": False})
        self.stem = f"{self.r['date']}-{self.r['device_slug']}-api"

    # ---------------------------------------------------------------- output

    def write(self) -> dict[str, Path]:
        self.r["wall_s"] = round(self.budget.elapsed(), 2)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": self.out_dir / f"{self.stem}.json", "markdown": self.out_dir / f"{self.stem}.md"}
        for kind, text in (("json", json.dumps(finite(self.r), indent=1, default=str, allow_nan=False) + "\n"),
                           ("markdown", render_markdown(self.r))):
            tmp = paths[kind].with_suffix(paths[kind].suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(paths[kind])
        return paths

    def set(self, key: str, system: str, value) -> None:
        if isinstance(value, float):
            value = round(value, 4)
        self.r[key][system] = value

    def section(self, name: str, fn, *args) -> bool:
        """Run one section; failures are recorded, never fatal. Results are written afterwards."""
        if self.budget.left() <= 0:
            self.r["skipped"][name] = f"deadline: {self.s.deadline_s:g} s reached"
            self.log(f"[api] {name}: skipped (deadline)")
            self.write()
            return False
        t0 = time.perf_counter()
        okay = True
        try:
            summary = fn(*args)
        except Exception as exc:  # noqa: BLE001 - a benchmark section that fails is reported, the rest goes on
            okay = False
            summary = f"FAILED: {type(exc).__name__}: {exc}"[:600]
            self.r["errors"][name] = f"{type(exc).__name__}: {exc}"[:3000]
        seconds = time.perf_counter() - t0
        self.r["sections"].append({"name": name, "seconds": round(seconds, 2), "ok": okay})
        self.write()
        self.log(f"[api] {name}: {summary} ({seconds:.1f} s; {self.budget.elapsed():.0f} s so far)")
        return okay

    # ---------------------------------------------------------------- pieces

    def next_prompt(self) -> tuple[str, int]:
        self.counter += 1
        return f"{self.ours.base_prompt}, 第{self.counter}张, run {self.run_tag}-{self.counter}", 1000 + self.counter

    def image(self, server: Server, graphs, section: str, lora: str | None) -> dict:
        prompt, seed = self.next_prompt()
        rec = run_prompt(server, graphs, section, prompt, seed, lora, self.s.prompt_timeout_s)
        rec["server"] = server.name
        self.r["runs"][graphs.system].append(rec)
        if not ok(rec):
            raise RuntimeError(f"{section} image on {server.name}: {rec['status']}: {rec['error']}")
        return rec

    def images(self, server: Server, graphs, section: str, loras: list) -> list[dict]:
        out = []
        for lora in loras:
            if out and self.budget.left() <= 0:
                self.r["skipped"][f"{server.name}:{section}"] = f"deadline: {len(out)} of {len(loras)} images done"
                break
            out.append(self.image(server, graphs, section, lora))
        return out

    def start(self, name: str, system: str, base: Path, env: dict, link_pack: bool = True) -> Server:
        env = dict(env)
        if self.s.server_threads:
            env.update(OMP_NUM_THREADS=str(self.s.server_threads), MKL_NUM_THREADS=str(self.s.server_threads))
        log_path = self.logs_dir / f"comfyui.{name}.log"
        server = launch(name, system, base, self.setup, cpu=self.cpu, front_end=self.front_end, log_path=log_path,
                        env=env, timeout=min(600.0, max(60.0, self.budget.left())), link_pack=link_pack)
        self.servers.append(server)
        server.info = {"ready_s": round(server.ready_s, 3), "log": str(log_path), "env": {
            k: v for k, v in env.items() if k.startswith(("ZIMAGE", "TORCHINDUCTOR", "TRITON", "OMP", "MKL"))}}
        self.r["servers"][name] = server.info
        if not self.r["versions"].get("comfyui_server"):
            code, body = server.client.get("/system_stats")
            if code == 200:
                self.r["versions"]["comfyui_server"] = body.get("system", {}).get("comfyui_version")
                self.r["versions"]["torch_server"] = body.get("system", {}).get("pytorch_version")
                self.r["server_devices"] = [d.get("name") for d in body.get("devices", [])]
        return server

    def stop(self, server: Server) -> None:
        t0 = time.perf_counter()
        server.stop()
        server.info["stop_s"] = round(time.perf_counter() - t0, 2)
        server.info["exit_code"] = server.comfy.proc.returncode if server.comfy.proc else None
        if server in self.servers:
            self.servers.remove(server)

    def stop_all(self) -> None:
        for server in list(self.servers):
            try:
                self.stop(server)
            except Exception as exc:  # noqa: BLE001 - stopping on the way out: the others still get stopped
                self.log(f"[api] stopping {server.name}: {exc!r}")

    def ours_env(self, preload: Path | None = None) -> dict:
        env = {"ZIMAGE_TURBO_CACHE_DIR": str(self.cache["zimage"]),
               "TORCHINDUCTOR_CACHE_DIR": str(self.cache["inductor"]),
               "TRITON_CACHE_DIR": str(self.cache["inductor"] / "triton")}
        if preload is not None:
            env["ZIMAGE_TURBO_PRELOAD"] = str(preload)
        return env

    def cache_state(self) -> dict:
        z, zb = folder_files(self.cache["zimage"])
        i, ib = folder_files(self.cache["inductor"])
        return {"zimage_turbo_files": z, "zimage_turbo_bytes": zb, "inductor_files": i, "inductor_bytes": ib}

    def status(self, server: Server) -> tuple[int, object]:
        try:
            return server.client.get("/zimage_turbo/status", timeout=10)
        except OSError as exc:
            return 0, repr(exc)

    def wait_compiled(self, server: Server, key: str, reserve_s: float = 0.0) -> str:
        """Wait until no pipeline is compiling (bounded by --compile-wait, and by the deadline less `reserve_s` kept
        for what comes after), then until the compile artifacts on disk stop changing. Recorded under compile[key]."""
        t0 = time.perf_counter()
        limit = min(self.s.compile_wait_s, max(0.0, self.budget.left() - reserve_s))
        states, body = [], None
        while True:
            code, body = self.status(server)
            pipes = body.get("pipelines", []) if code == 200 and isinstance(body, dict) else []
            states = [p["compile_status"] for p in pipes if isinstance(p.get("compile_status"), dict)]
            busy = [c for c in states if c.get("state") in ("pending", "compiling")]
            if not busy or time.perf_counter() - t0 > limit:
                break
            time.sleep(0.5)
        waited = time.perf_counter() - t0
        rec = {"waited_s": round(waited, 2), "since_launch_s": round(time.perf_counter() - server.launched_at, 2),
               "states": states or NOT_AVAILABLE, "timed_out": bool(states) and any(
                   c.get("state") in ("pending", "compiling") for c in states)}
        if any(c.get("state") == "compiled" for c in states):
            # The artifacts are written just after the state turns compiled: wait until the folder is still.
            t1, last, still = time.perf_counter(), None, 0
            while time.perf_counter() - t1 < min(20.0, max(5.0, self.budget.left())):
                now = folder_files(self.cache["zimage"])
                still = still + 1 if now == last and now[0] > 0 else 0
                if still >= 3:
                    break
                last = now
                time.sleep(0.5)
            rec["artifacts_wait_s"] = round(time.perf_counter() - t1, 2)
        rec["cache_after"] = self.cache_state()
        self.r["compile"][key] = rec
        names = ", ".join(f"{c.get('state')} {c.get('seconds')}" for c in states) or "no compile status"
        return f"compile: {names}; waited {waited:.1f} s"

    # ---------------------------------------------------------------- scenarios

    def first_images(self, server: Server, graphs, warm: str = "") -> str:
        """The first image (launch -> success) and the first styled image (POST -> success) of a fresh server."""
        system = graphs.system
        try:
            first = self.image(server, graphs, "first" + warm, None)
        except RuntimeError:
            rec = self.r["runs"][system][-1] if self.r["runs"][system] else {}
            if system == "native" and rec.get("status") in ("error", "rejected"):
                self.native_unusable = " ".join(str(rec.get("error")).split())
                self.r["native_unusable"] = ("ComfyUI's own graph could not make an image from these model files, so "
                                             f"every native figure is null. ComfyUI said: {self.native_unusable}")
            raise
        self.set(f"first_image{warm}_s", system, first["since_launch_s"])
        styled = self.image(server, graphs, "first_lora" + warm, self.loras[0]["file"])
        self.set(f"first_lora_image{warm}_s", system, styled["seconds"])
        return f"first image {first['since_launch_s']:.2f} s from launch, first styled {styled['seconds']:.2f} s"

    def steady_sections(self, server: Server, graphs) -> None:
        system, runs = graphs.system, max(1, self.s.runs)
        a, b = self.loras[0]["file"], self.loras[1]["file"]

        def plain():
            self.images(server, graphs, "steady_warmup", [None])
            recs = self.images(server, graphs, "steady", [None] * runs)
            self.summarise(system)
            return f"steady median {median([r['seconds'] for r in recs]):.3f} s over {len(recs)}"

        def styled():
            self.images(server, graphs, "lora_steady_warmup", [a])
            recs = self.images(server, graphs, "lora_steady", [a] * runs)
            self.summarise(system)
            return f"styled steady median {median([r['seconds'] for r in recs]):.3f} s over {len(recs)}"

        def switch():
            n = 1 + max(2, runs)  # B first (its first use, not counted), then A, B, A ...
            recs = self.images(server, graphs, "switch", [b if i % 2 == 0 else a for i in range(n)])
            if recs:
                recs[0]["section"] = "switch_first_b"
            self.summarise(system)
            counted = [r["seconds"] for r in recs[1:]]
            return f"switch median {median(counted) or float('nan'):.3f} s over {len(counted)}"

        def concurrency():
            self.images(server, graphs, "concurrency_warmup", [None])
            wf = graphs.workflow()
            levels = []
            for level in self.s.levels:
                if levels and self.budget.left() <= 0:
                    self.r["skipped"][f"{server.name}:concurrency_{level}"] = "deadline"
                    break
                records = []
                for i in range(self.s.requests):
                    prompt, seed = self.next_prompt()
                    records.append(load_test.RequestRecord(level, i, seed, prompt))
                wall = load_test.run_level(server.client, wf, level, records, self.s.prompt_timeout_s)
                summary = load_test.summarize_level(level, records, wall, wf.sampler_ids)
                levels.append(summary)
                self.r["concurrency"][system] = levels
                if f"images_per_s_c{level}" in self.r:
                    self.set(f"images_per_s_c{level}", system, summary["images_per_s"])
                self.write()
            return ", ".join(f"c{lv['level']} {lv['images_per_s']:.3f} images/s ({lv['succeeded']}/{lv['requests']})"
                             for lv in levels)

        for name, fn in (("steady", plain), ("lora_steady", styled), ("switch", switch),
                         ("concurrency", concurrency)):
            self.section(f"{server.name}:{name}", fn)

    def summarise(self, system: str) -> None:
        """The headline figures of `system` from its records so far."""
        recs = [r for r in self.r["runs"][system] if ok(r)]
        by = {sec: [r for r in recs if r["section"] == sec] for sec in ("steady", "lora_steady", "switch")}
        st = self.r["stats"]
        for key, sec in (("steady_s", "steady"), ("lora_steady_s", "lora_steady"), ("switch_s", "switch")):
            s = stats([r["seconds"] for r in by[sec]])
            st.setdefault(key, {})[system] = s
            self.set(key, system, s["median"] if s else None)
        switch_by_file = {}
        for lora in {r["lora"] for r in by["switch"]}:
            switch_by_file[lora] = stats([r["seconds"] for r in by["switch"] if r["lora"] == lora])
        st.setdefault("switch_s_by_lora", {})[system] = switch_by_file or None
        steps = median([x for r in by["steady"] for x in r["step_intervals_s"]])
        lsteps = median([x for r in by["lora_steady"] for x in r["step_intervals_s"]])
        self.set("step_ms", system, None if steps is None else 1000 * steps)
        self.set("lora_step_ms", system, None if lsteps is None else 1000 * lsteps)
        self.set("lora_step_overhead_pct", system, pct(lsteps, steps))
        if system == "ours":
            psteps = median([x for r in by["steady"] for x in r.get("probe", {}).get("step_s") or []])
            plsteps = median([x for r in by["lora_steady"] for x in r.get("probe", {}).get("step_s") or []])
            self.set("lora_step_overhead_pct_probe", system, pct(plsteps, psteps))
            st.setdefault("probe_step_ms", {})[system] = {
                "steady": None if psteps is None else 1000 * psteps,
                "lora_steady": None if plsteps is None else 1000 * plsteps}
            inproc = [r["seconds"] - r["probe"]["total_s"] for r in by["steady"] if r.get("probe", {}).get("total_s")]
            self.set("api_minus_inprocess_s", system, median(inproc))
            st.setdefault("api_minus_inprocess_s", {})[system] = stats(inproc)
        graph = [r["seconds"] - r["graph_s"] for r in by["steady"] if r.get("graph_s") is not None]
        self.set("api_minus_graph_s", system, median(graph))
        st.setdefault("api_minus_graph_s", {})[system] = stats(graph)
        st.setdefault("output_to_success_s", {})[system] = stats(
            [r["output_to_success_s"] for r in by["steady"] if r.get("output_to_success_s") is not None])
        if system == "native":
            # Native has no probe: its in-process time is every node up to the output node (see definitions).
            self.set("api_minus_inprocess_s", system, median(graph))
            st.setdefault("api_minus_inprocess_s", {})[system] = stats(graph)
        paths: dict = {}
        for r in self.r["runs"]["ours"] if system == "ours" else []:
            if r.get("probe", {}).get("compile_path") is not None:
                paths.setdefault(r["section"], {}).setdefault(r["probe"]["compile_path"], 0)
                paths[r["section"]][r["probe"]["compile_path"]] += 1
        if paths:
            st["ours_compile_paths"] = paths

    # ---------------------------------------------------------------- servers

    def run_native(self) -> None:
        name = "native"
        holder: dict = {}

        def start_and_first():
            holder["server"] = server = self.start(name, "native", self.workdir / "native", {})
            return f"ready in {server.ready_s:.2f} s; " + self.first_images(server, self.native)

        try:
            if self.section(f"{name}:first", start_and_first):
                self.steady_sections(holder["server"], self.native)
            elif self.native_unusable:
                for key, _ in HEADLINE:
                    self.r[key]["native"] = None
                self.section("native:graphs_accepted", self.native_graphs_accepted, holder["server"])
                if self.setup.tiny:  # expected: ComfyUI builds Z-Image's text encoder and VAE at their real sizes
                    self.r["errors"].pop(f"{name}:first", None)
                self.log(f"[api] native: no image from ComfyUI's own graph, reported as null: "
                         f"{self.native_unusable[:300]}")
        finally:
            if "server" in holder:
                self.count_lora_key_warnings(holder["server"])
                self.stop(holder["server"])
            self.write()

    def native_graphs_accepted(self, server: Server) -> str:
        """When ComfyUI cannot run its graph on these files: queue the styled graphs too, to show that ComfyUI
        accepts every graph (POST /prompt validation) and that only running them fails."""
        seen = {}
        for lora in [None] + [x["file"] for x in self.loras]:
            prompt, seed = self.next_prompt()
            rec = run_prompt(server, self.native, "graph_check", prompt, seed, lora, self.s.prompt_timeout_s)
            seen[lora or "no LoRA"] = {"status": rec["status"], "error": (rec["error"] or "")[:300]}
        self.r["native_graph_check"] = seen
        return ", ".join(f"{k}: {v['status']}" for k, v in seen.items())

    def count_lora_key_warnings(self, server: Server) -> None:
        text = server.comfy.log_text()
        server.info["lora_key_not_loaded_lines"] = text.count("lora key not loaded")

    def empty_caches(self) -> None:
        """Our compile caches (ours and inductor's) emptied: the next server of ours starts cold."""
        for folder in self.cache.values():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)

    def run_cold(self) -> None:
        self.empty_caches()
        holder: dict = {}

        def start_and_first():
            holder["server"] = server = self.start("ours_cold", "ours", self.workdir / "ours", self.ours_env())
            server.info["cache_at_start"] = self.cache_state()
            return f"ready in {server.ready_s:.2f} s; " + self.first_images(server, self.ours)

        try:
            if self.section("ours_cold:first", start_and_first):
                # Keep time for the warm server, which measures most of our figures.
                reserve = 150.0 if "warm" in self.s.only else 0.0
                self.section("ours_cold:compile", self.wait_compiled, holder["server"], "cold", reserve)
        finally:
            if "server" in holder:
                self.stop(holder["server"])
            self.write()

    def run_warm(self) -> None:
        holder: dict = {}
        for folder in self.cache.values():
            folder.mkdir(parents=True, exist_ok=True)

        def start_and_first():
            holder["server"] = server = self.start("ours_warm", "ours", self.workdir / "ours", self.ours_env())
            server.info["cache_at_start"] = self.cache_state()
            return f"ready in {server.ready_s:.2f} s; " + self.first_images(server, self.ours, "_warm")

        try:
            if self.section("ours_warm:first", start_and_first):
                self.section("ours_warm:compile", self.wait_compiled, holder["server"], "warm", 60.0)
                self.steady_sections(holder["server"], self.ours)
        finally:
            if "server" in holder:
                self.stop(holder["server"])
            self.write()

    def run_preload(self) -> None:
        holder: dict = {}
        conf = self.workdir / "preload.json"
        conf.write_text(json.dumps(self.ours.loader_settings()))
        for folder in self.cache.values():
            folder.mkdir(parents=True, exist_ok=True)
        pre = self.r["preload"]
        pre["config"] = self.ours.loader_settings()

        def preload():
            holder["server"] = server = self.start("ours_preload", "ours", self.workdir / "ours",
                                                   self.ours_env(preload=conf))
            server.info["cache_at_start"] = self.cache_state()
            t0 = time.perf_counter()
            limit = min(self.s.compile_wait_s + 120.0, max(5.0, self.budget.left()))
            state, body = None, None
            while time.perf_counter() - t0 < limit:
                code, body = self.status(server)
                block = body.get("preload") if code == 200 and isinstance(body, dict) else None
                if not isinstance(block, dict) or "state" not in block:
                    pre["available"] = False
                    pre["why"] = (f"GET /zimage_turbo/status answered {code} without a preload state"
                                  if code else f"GET /zimage_turbo/status failed: {body}")
                    for key in ("preload_ready_s", "first_image_preloaded_s", "first_lora_image_preloaded_s"):
                        self.set(key, "ours", NOT_AVAILABLE)
                    return pre["why"] + ": reported as not available"
                state = block["state"]
                if state not in ("loading", "warming"):
                    break
                time.sleep(0.1)
            pre.update(available=True, state=state, status=(body or {}).get("preload"),
                       since_launch_s=round(time.perf_counter() - server.launched_at, 3))
            if state != "ready":
                self.set("preload_ready_s", "ours", f"{state} after {time.perf_counter() - t0:.0f} s")
                raise RuntimeError(f"preload {state}: {(body or {}).get('preload')}")
            self.set("preload_ready_s", "ours", pre["since_launch_s"])
            first = self.image(server, self.ours, "first_preloaded", None)
            self.set("first_image_preloaded_s", "ours", first["seconds"])
            pre["first_image_since_launch_s"] = round(first["since_launch_s"], 3)
            styled = self.image(server, self.ours, "first_lora_preloaded", self.loras[0]["file"])
            self.set("first_lora_image_preloaded_s", "ours", styled["seconds"])
            return (f"ready {pre['since_launch_s']:.2f} s from launch; first image {first['seconds']:.2f} s, "
                    f"first styled {styled['seconds']:.2f} s")

        try:
            self.section("ours_preload", preload)
        finally:
            if "server" in holder:
                self.stop(holder["server"])
            self.write()

    def run_pairs(self) -> None:
        """[pairs] Interleaved first images: native and ours (cold compile caches) in turn, `pairs` rounds."""
        rows = self.r.setdefault("first_image_pairs", [])
        for i in range(max(1, self.s.pairs)):
            order = ("native", "ours") if i % 2 == 0 else ("ours", "native")
            row: dict = {"round": i + 1, "order": " then ".join(order)}
            rows.append(row)
            for system in order:
                name = f"pair{i + 1}_{system}"
                graphs = self.native if system == "native" else self.ours
                holder: dict = {}

                def start_and_first(system=system, name=name, graphs=graphs, holder=holder):
                    if system == "ours":
                        self.empty_caches()
                        server = self.start(name, "ours", self.workdir / "ours", self.ours_env())
                    else:  # plain ComfyUI: without this package (and its start-up imports) in custom_nodes
                        server = self.start(name, "native", self.workdir / "native_plain", {}, link_pack=False)
                    holder["server"] = server
                    first = self.image(server, graphs, "pair_first", None)
                    styled = self.image(server, graphs, "pair_first_lora", self.loras[0]["file"])
                    row[system] = {"ready_s": round(server.ready_s, 3), "first_image_s": round(first["since_launch_s"], 3),
                                   "first_post_to_success_s": round(first["seconds"], 3),
                                   "first_lora_image_s": round(styled["seconds"], 3)}
                    return (f"ready {server.ready_s:.2f} s; first image {first['since_launch_s']:.2f} s from launch "
                            f"({first['seconds']:.2f} s after POST); first styled {styled['seconds']:.2f} s")

                try:
                    self.section(name, start_and_first)
                finally:
                    if "server" in holder:
                        self.stop(holder["server"])
                    self.write()
        self.r["first_image_pairs_summary"] = summarise_pairs(rows)
        self.write()

    def run(self) -> dict:
        for key in ("first_image_warm_s", "first_lora_image_warm_s", "preload_ready_s", "first_image_preloaded_s",
                    "first_lora_image_preloaded_s", "lora_step_overhead_pct_probe"):
            self.r[key]["native"] = None  # nothing to warm, preload or probe on the native side
        if self.s.prewarm:
            def prewarm():
                seconds, total = prewarm_page_cache(self.setup)
                self.r["prewarm"] = {"seconds": round(seconds, 2), "bytes": total}
                return f"read {total / 1e9:.2f} GB of model files in {seconds:.1f} s"
            self.section("prewarm_page_cache", prewarm)
        try:
            for name, fn in (("native", self.run_native), ("cold", self.run_cold), ("warm", self.run_warm),
                             ("preload", self.run_preload), ("pairs", self.run_pairs)):
                if name not in self.s.only:
                    self.r["skipped"][name] = "not selected (--only)"
                    continue
                if self.budget.left() <= 0:
                    self.r["skipped"][name] = f"deadline: {self.s.deadline_s:g} s reached"
                    self.log(f"[api] {name}: skipped (deadline)")
                    continue
                fn()
        finally:
            self.stop_all()
            self.r["finished"] = True
            self.write()
        return self.r


# ----------------------------------------------------------------------------------------------- report

def summarise_pairs(rows: list[dict]) -> dict:
    """Medians per system over the rounds where both servers made their first image, and ours minus native."""
    both = [r for r in rows if isinstance(r.get("native"), dict) and isinstance(r.get("ours"), dict)]
    out: dict = {"rounds": len(both)}
    for key in ("ready_s", "first_image_s", "first_post_to_success_s", "first_lora_image_s"):
        out[key] = {system: median([r[system][key] for r in both]) for system in SYSTEMS}
    diffs = [r["ours"]["first_image_s"] - r["native"]["first_image_s"] for r in both]
    out["ours_minus_native_first_image_s"] = {"median": median(diffs), "min": min(diffs) if diffs else None,
                                              "max": max(diffs) if diffs else None}
    out["rounds_ours_first"] = sum(1 for d in diffs if d < 0)
    return out


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.0f}{unit}"
    if abs(value) >= 10:
        return f"{value:.1f}{unit}"
    return f"{value:.3f}{unit}" if abs(value) < 1 else f"{value:.2f}{unit}"


def _stats_text(s: dict | None) -> str:
    if not s:
        return "–"
    return f"{_fmt(s['median'])} ({_fmt(s['min'])}–{_fmt(s['max'])}, n={s['n']})"


DEFINITIONS = [
    ("**first image**: from just before the server process is spawned to the first image's execution_success on "
    "the websocket (the client polls the API every 50 ms and queues at once). Ours `first_image_s` runs with empty "
    "compile caches (ZIMAGE_TURBO_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR fresh folders); "
    "`first_image_warm_s` is a restart on the same folders. ComfyUI's graph has no compile cache: its figure "
    "is the same cold or warm. The model files were read once before the first server (page cache warm for all)."),
    ("**first styled image**: POST -> success of the first image with LoRA A (diffusers format) on, queued right "
    "after the first image."),
    ("**steady / styled steady**: POST -> success, a new prompt text and seed every image, after one untimed image "
    "of the same kind; ours after its background compile finished. **switching**: LoRA B (kohya), A, B, ... every "
    "image; the first B (its file's first use) is not counted."),
    ("**per-step cost**: the websocket `progress` messages of the sampler node (one per step) are stamped on "
    "arrival; the intervals between consecutive ones (7 per 8-step image) are pooled, and the median with one LoRA "
    "on is compared with the median without. `_probe`: the same from our probe's synchronised step times."),
    ("**api_minus_inprocess_s**: ours: POST -> success minus the probe's in-process total (load + LoRA + text "
    "encode + denoise + VAE decode of the sampler). Native (no probe): POST -> success minus the time from the "
    "`execution_start` message to the `executing` message of SaveImage, i.e. every node through VAE decode as "
    "the server ran them; what is left is HTTP, queueing, the PNG save and the messages. `api_minus_graph_s` "
    "applies the native rule to both systems."),
    ("**images/s**: load_test's levels: `level` prompts kept in flight, each with its own prompt and seed; images "
    "divided by first POST -> last success."),
]


def render_markdown(r: dict) -> str:
    s = r["settings"]
    git = r.get("git") or {}
    modified = git.get("modified_files")
    lines = [f"# API benchmark {r['date']}: {r['device']}", ""]
    lines.append(f"> **Model:** {r['model_note']}.")
    if r["device"] == "cpu":
        lines.append("> **CPU run:** a smoke run of the benchmark itself; these figures say nothing about GPU "
                     "performance.")
    if r.get("native_unusable"):
        lines.append(f"> **Native is null:** {r['native_unusable'][:400]}...")
    if not r.get("finished"):
        lines.append("> **Partial:** the run had not finished when this was written.")
    lines += [
        "",
        f"- versions: torch {r['versions'].get('torch')}, ComfyUI {r['versions'].get('comfyui')}, Python "
        f"{r['versions'].get('python')}; this package at {git.get('commit') or 'unknown'}"
        + (f" with {len(modified)} modified file(s)" if modified else ""),
        (f"- {s['width']}x{s['height']}, {s['steps']} steps, batch 1; runs: steady {s['runs']}, styled {s['runs']}, "
        f"switching {s['switch_images']} (first not counted); {s['requests_per_level']} requests per concurrency "
        f"level {s['levels']}"),
        (f"- LoRAs: A = {s['loras'][0]['file']} ({s['loras'][0]['format']}), B = {s['loras'][1]['file']} "
        f"({s['loras'][1]['format']})"),
        f"- ours: {s['our_workflow']} (output node {s['our_output_node']}); native: {s['native_graph']}",
        f"- wall time {r['wall_s']} s" + (f" (deadline {s['deadline_s']:g} s)" if s.get("deadline_s") else ""),
        "",
        "| what | ComfyUI native | this package |",
        "|---|---:|---:|",
    ]
    for key, text in HEADLINE:
        v = r.get(key) or {}
        lines.append(f"| {text} `{key}` | {_fmt(v.get('native'))} | {_fmt(v.get('ours'))} |")
    st = r.get("stats", {})
    lines += ["", "## Spread", "", "| figure | native: median (min–max, n) | ours |", "|---|---|---|"]
    for key in ("steady_s", "lora_steady_s", "switch_s", "api_minus_inprocess_s", "api_minus_graph_s",
                "output_to_success_s"):
        v = st.get(key) or {}
        lines.append(f"| `{key}` | {_stats_text(v.get('native'))} | {_stats_text(v.get('ours'))} |")
    by_lora = st.get("switch_s_by_lora") or {}
    for lora in sorted({f for system in SYSTEMS for f in (by_lora.get(system) or {})}):
        lines.append(f"| switching: the images with {lora} | {_stats_text((by_lora.get('native') or {}).get(lora))} "
                     f"| {_stats_text((by_lora.get('ours') or {}).get(lora))} |")
    if st.get("probe_step_ms", {}).get("ours"):
        p = st["probe_step_ms"]["ours"]
        lines.append(f"| ours, probe step ms (no LoRA / LoRA) | | {_fmt(p.get('steady'))} / "
                     f"{_fmt(p.get('lora_steady'))} |")
    conc = r.get("concurrency") or {}
    if conc:
        lines += ["", "## Concurrency", "", "| system | level | ok | images/s | latency p50 (s) | max (s) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for system in SYSTEMS:
            for lv in conc.get(system) or []:
                lines.append(f"| {system} | {lv['level']} | {lv['succeeded']}/{lv['requests']} | "
                             f"{lv['images_per_s']:.3f} | {_fmt(lv['latency_p50_s'])} | {_fmt(lv['latency_max_s'])} |")
    pairs = r.get("first_image_pairs") or []
    if pairs:
        lines += ["", "## First image after a start: interleaved pairs", "",
                  "_Native: plain ComfyUI (this package not installed); ours: empty compile caches. Each server is "
                  "started, makes its first image and first styled image, and is stopped; the order alternates._", "",
                  "| round | order | native: ready / first image from launch / after POST / first styled (s) | "
                  "ours (empty compile caches): the same (s) |", "|---:|---|---|---|"]

        def cell(x):
            if not isinstance(x, dict):
                return "–"
            return (f"{_fmt(x['ready_s'])} / **{_fmt(x['first_image_s'])}** / {_fmt(x['first_post_to_success_s'])} / "
                    f"{_fmt(x['first_lora_image_s'])}")
        for row in pairs:
            lines.append(f"| {row['round']} | {row['order']} | {cell(row.get('native'))} | {cell(row.get('ours'))} |")
        sm = r.get("first_image_pairs_summary") or {}
        if sm.get("rounds"):
            d = sm["ours_minus_native_first_image_s"]
            lines += ["", f"- medians over {sm['rounds']} rounds: first image from launch native "
                      f"{_fmt(sm['first_image_s']['native'])} s, ours {_fmt(sm['first_image_s']['ours'])} s; ours "
                      f"minus native median {_fmt(d['median'])} s (min {_fmt(d['min'])}, max {_fmt(d['max'])}); ours "
                      f"first in {sm['rounds_ours_first']} of {sm['rounds']} rounds; server ready native "
                      f"{_fmt(sm['ready_s']['native'])} s, ours {_fmt(sm['ready_s']['ours'])} s; first styled image "
                      f"native {_fmt(sm['first_lora_image_s']['native'])} s, ours "
                      f"{_fmt(sm['first_lora_image_s']['ours'])} s"]
    lines += ["", "## Servers", "", "| server | ready (s) | compile cache at start | notes |", "|---|---:|---|---|"]
    for name, info in (r.get("servers") or {}).items():
        cache = info.get("cache_at_start")
        cache_text = (f"{cache['zimage_turbo_files']} ours / {cache['inductor_files']} inductor files"
                      if cache else "–")
        notes = []
        if info.get("lora_key_not_loaded_lines"):
            notes.append(f"{info['lora_key_not_loaded_lines']} 'lora key not loaded' log lines")
        if info.get("exit_code") not in (None, 0, -15):
            notes.append(f"exit code {info['exit_code']}")
        lines.append(f"| {name} | {_fmt(info.get('ready_s'))} | {cache_text} | {'; '.join(notes)} |")
    if r.get("compile") or r.get("preload"):
        lines.append("")
    for key, c in (r.get("compile") or {}).items():
        states = c.get("states")
        text = (", ".join(f"{x.get('state')} ({_fmt(x.get('seconds'))} s, variants {x.get('variants')})"
                          for x in states) if isinstance(states, list) else str(states))
        lines.append(f"- compile on the {key} server: {text}; waited {c.get('waited_s')} s "
                     f"({c.get('since_launch_s')} s after launch){'; TIMED OUT' if c.get('timed_out') else ''}; "
                     f"cache afterwards: {c.get('cache_after')}")
    pre = r.get("preload") or {}
    if pre:
        lines.append(f"- preload: {pre.get('state') if pre.get('available') else pre.get('why', 'not run')}; "
                     f"config {json.dumps(pre.get('config'))}")
    ours_runs = r["runs"].get("ours") or []
    if ours_runs:
        lines += ["", "## Our images", "",
                  "| server | section | LoRA | s | compile path | LoRA path | probe total (s) | save node (s) | "
                  "encode + write (s) | after the save node (s) |",
                  "|---|---|---|---:|---|---|---:|---:|---:|---:|"]
        for x in ours_runs:
            p = x.get("probe") or {}
            files = x.get("save_files") or []
            written = sum((f.get("encode_s") or 0) + (f.get("write_s") or 0) for f in files) if files else None
            lines.append(f"| {x.get('server')} | {x['section']} | {x['lora'] or '–'} | {_fmt(x['seconds'])} | "
                         f"{p.get('compile_path', '–') or '–'} | {p.get('lora_path') or '–'} | "
                         f"{_fmt(p.get('total_s'))} | {_fmt(x.get('output_node_s'))} | {_fmt(written)} | "
                         f"{_fmt(x.get('after_output_node_s'))} |")
    native_runs = r["runs"].get("native") or []
    if native_runs:
        lines += ["", "## Native images", "", "| section | LoRA | s | status |", "|---|---|---:|---|"]
        for x in native_runs:
            lines.append(f"| {x['section']} | {x['lora'] or '–'} | {_fmt(x['seconds'])} | {x['status']} |")
    lines += ["", "## Definitions", ""] + [f"- {d}" for d in DEFINITIONS]
    if r.get("errors") or r.get("skipped"):
        lines += ["", "## Errors and skipped sections", ""]
        lines += [f"- **{k}**: {v[:800]}" for k, v in r.get("errors", {}).items()]
        lines += [f"- {k}: skipped, {v}" for k, v in r.get("skipped", {}).items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- CLI

def tiny_bench_setup(workdir: Path) -> soak.ModelSetup:
    """The tiny model and two tiny LoRAs: one diffusers-format, one kohya-format (as bench/build_model.py)."""
    from devtools import model_builder

    loras = []
    for name, fmt, seed in (("style_a_r4", "diffusers", 1), ("style_b_r4", "kohya_split", 2)):
        path = Path(workdir) / "tiny" / "loras" / f"{name}.safetensors"
        model_builder.build_random_lora(path, model_builder.TINY.transformer, fmt, rank=4, alpha=2.0, seed=seed)
        loras.append(path)
    return soak.tiny_setup(workdir, lora_paths=loras)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny", action="store_true", help="build the tiny model and two LoRAs; CPU servers")
    src.add_argument("--root", type=Path, help="the folder bench/build_model.py wrote (true-size random weights)")
    ap.add_argument("--cpu", action="store_true", help="with --root: run the servers on the CPU anyway")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"result folder (default {RESULTS_DIR})")
    ap.add_argument("--logs", type=Path, help="server logs go here (default: the work folder's logs/)")
    ap.add_argument("--workdir", type=Path, help="servers' folders and compile caches (default: a temporary folder)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated servers to run, of {','.join(SECTIONS)} (default all)")
    ap.add_argument("--runs", type=int, help="timed images per steady / styled section (default 3; tiny 2); "
                                             "switching makes 1 + max(2, runs)")
    ap.add_argument("--requests", type=int, help="requests per concurrency level (default 6; tiny 4)")
    ap.add_argument("--levels", default="1,2,4", help="concurrency levels (default 1,2,4)")
    ap.add_argument("--width", type=int, help="default 1024 (tiny 64)")
    ap.add_argument("--height", type=int, help="default 1024 (tiny 64)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--deadline", type=float, default=450.0,
                    help="seconds after the start when no new image, section or server is begun (default 450; "
                         "0: none)")
    ap.add_argument("--compile-wait", type=float, default=240.0,
                    help="most seconds to wait for our background compile before going on (default 240)")
    ap.add_argument("--prompt-timeout", type=float, default=300.0)
    ap.add_argument("--server-threads", type=int,
                    help="OMP/MKL threads of the servers (default 1 on the CPU, torch's default on a GPU)")
    ap.add_argument("--pairs", type=int, default=3, help="rounds of the pairs section (default 3)")
    ap.add_argument("--no-prewarm", action="store_true", help="do not read the model files once before the first "
                                                              "server")
    return ap


def settings_from_args(args, gpu: bool) -> Settings:
    only = tuple(x.strip() for x in re.split(r"[,+]", args.only) if x.strip())  # + from gpu_run.sh (commas become spaces)
    unknown = set(only) - set(SECTIONS) - set(EXTRA_SECTIONS)
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; choose from {','.join(SECTIONS + EXTRA_SECTIONS)}")
    side = 1024 if not args.tiny else 64
    return Settings(
        width=args.width or side, height=args.height or side, steps=args.steps,
        runs=args.runs or (3 if not args.tiny else 2), requests=args.requests or (6 if not args.tiny else 4),
        levels=tuple(int(x) for x in args.levels.split(",") if x.strip()), only=only,
        deadline_s=args.deadline or None, compile_wait_s=args.compile_wait, prompt_timeout_s=args.prompt_timeout,
        server_threads=args.server_threads if args.server_threads is not None else (0 if gpu else 1),
        prewarm=not args.no_prewarm, pairs=args.pairs)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not (COMFY_DIR / "main.py").is_file():
        print(f"[api] ComfyUI is not set up in {COMFY_DIR} (scripts/setup.sh, or bench/gpu_run.sh there)",
              file=sys.stderr)
        return 2
    gpu = False
    if args.root and not args.cpu:
        gpu = runtime_info(sys.executable, False)["device"] not in ("cpu", "unknown")
        if not gpu:
            print("[api] no CUDA GPU here: running the --root model on the CPU", file=sys.stderr)
    settings = settings_from_args(args, gpu)
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="zimage_api_bench_")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    bench = None

    def on_term(signum, _frame):  # a time limit: stop the servers, keep what was measured
        if bench is not None:
            bench.r["errors"]["signal"] = f"stopped by signal {signum}"
            bench.stop_all()
            bench.write()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        t0 = time.perf_counter()
        setup = tiny_bench_setup(workdir) if args.tiny else soak.root_setup(args.root, workdir, min_loras=2)
        print(f"[api] model ready in {time.perf_counter() - t0:.1f} s: {setup.note}; LoRAs: {', '.join(setup.loras)}")
        bench = ApiBench(setup, settings, workdir, args.out, args.logs or workdir / "logs", cpu=not gpu)
        print(f"[api] {bench.r['device']}; results: {args.out / bench.stem}.json/.md; server logs: "
              f"{bench.logs_dir}")
        result = bench.run()
    except (soak.SoakSetupError, BenchSetupError, ComfyError, OSError) as exc:
        print(f"[api] could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"[api] wrote {args.out / bench.stem}.json and .md in {result['wall_s']} s")
    for key, _ in HEADLINE:
        print(f"    {key}: native {_fmt(result[key]['native'])}, ours {_fmt(result[key]['ours'])}")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
