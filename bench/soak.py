"""Soak test of the Z-Image-Turbo nodes through a real ComfyUI server (POST /prompt, websockets, /interrupt, /free).

Several clients (each its own client id and websocket) queue a few hundred prompts at once: random LoRA stacks
(0-3 LoRAs, random strengths, rows on and off, sometimes two chained stack nodes), random sizes (multiples of
16), seeds and prompt texts; invalid prompts, /interrupt and /free (with and without unloading the models) are
mixed in. It checks that:

  * the server never dies (a death is counted, the server restarted, the run goes on);
  * every valid prompt ends in success, and its image equals the same prompt run alone: afterwards a second,
    fresh server on the same model folders (--cache-none, one client, one prompt at a time, in another order)
    runs every valid prompt again and the decoded pixels must be identical (PNG bytes differ by their metadata);
  * every invalid prompt ends in a clear error (HTTP 400 naming the problem, or an execution error whose message
    names it and whose type is not a raw Python error such as KeyError), never in success;
  * the server's RSS (and, on a GPU, its VRAM) is flat: the mean of the last quarter of the samples is at most
    5 % above the mean of the first quarter (a warm-up is left out);
  * after >= 100 LoRA switches the no-LoRA baseline queued first gives bit-identical pixels again.

    # CPU, the tiny random-weight model built on the spot (the short form runs in `make test`):
    .venv/bin/python -m bench.soak --tiny
    .venv/bin/python -m bench.soak --tiny --short
    # GPU machine, the true-size random weights of bench/build_model.py (bf16, compile on, 256..1024 px):
    python3 -m bench.soak --root /tmp/zfull          # or: bench/gpu_run.sh soak:
    # the client needs websocket-client and Pillow; ComfyUI runs with a blank front end if its package is missing

Writes bench/results/soak/<YYYY-MM-DD>-<device>.json and .md (--out; the short form adds -short to the name).
Exit code: 0 when every check passed, 1 when one failed, 2 when the run could not be set up.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import io
import itertools
import json
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from devtools.graphs import (FRONT_STACK, LOADER, MODEL, MODEL_FILES, PROBE, SAMPLER, SAVE, STACK, TEXT_ENCODER, VAE,
                             api_graph)
from scripts.comfy_client import COMFY_DIR, ComfyClient, ComfyError, ComfyServer, front_end_args

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results" / "soak"
# Exception types that mean "a bug escaped", never a message meant for a user.
RAW_ERROR_TYPES = {"KeyError", "TypeError", "ValueError", "AttributeError", "IndexError", "RuntimeError",
                   "ZeroDivisionError", "AssertionError", "NameError", "UnboundLocalError", "OverflowError",
                   "NotImplementedError", "Exception", "JSONDecodeError", "UnicodeDecodeError", "OSError",
                   "FileNotFoundError", "RecursionError"}
WORDS_EN = ("a red fox", "an old lighthouse", "a bowl of noodles", "a cyclist", "cherry blossoms", "a rainy street",
            "a glass teapot", "mountains at dawn", "a portrait", "neon signs", "a paper boat", "soft window light",
            "film grain", "a cat on a sofa", "a market stall", "a snowy forest", "golden hour", "a violin")
WORDS_ZH = ("雪地里的红狐狸", "上海外滩", "旗袍", "黄昏", "胶片颗粒", "一只猫", "樱花", "雨夜街道", "古老的灯塔", "清透水光肌")


class SoakSetupError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ settings

@dataclass
class SoakConfig:
    prompts: int = 220  # jobs of the mixed phase; the baseline, a dummy and the baseline again come on top
    clients: int = 3  # threads, each with its own client id and websocket
    seed: int = 0  # the whole plan (stacks, sizes, seeds, texts, where the invalid ones go) follows from it
    min_side: int = 32
    max_side: int = 128
    steps: int = 8
    victim_steps: int = 24  # steps of the prompts an /interrupt is aimed at (longer, so it lands)
    dtype: str = "fp32"
    compile: str = "auto"
    memory: str = "resident"
    invalid_fraction: float = 0.15
    interrupts: int = 6  # /interrupt posted while one of the victims makes progress
    unloads: int = 3  # POST /free {"unload_models": true, "free_memory": true}
    cache_frees: int = 3  # POST /free {"unload_models": false, "free_memory": true}
    chain_fraction: float = 0.15  # valid prompts whose rows are split over two chained stack nodes
    min_switches: int = 100  # LoRA switches required between the baseline and its re-run
    rss_warmup: int = 10  # first RSS samples left out of the drift
    max_drift_pct: float = 5.0
    max_attempts: int = 3  # an interrupted prompt is queued again up to this many times in all
    prompt_timeout_s: float = 600.0
    deadline_s: float = 3600.0  # the mixed phase queues nothing new after this (the rest counts as not run)
    reference_deadline_s: float = 3600.0
    reference_order: str = "shuffled"  # "shuffled" (another history than the soak) or "soak" (same order)
    kill_after: int = 0  # self-check of the death handling: SIGKILL the server after this many jobs (0: never)
    server_threads: int = 0  # OMP/MKL threads of the server processes (0: torch's default)
    form: str = "full"  # "short": the `make test` form (its result files are named ...-short)

    @classmethod
    def short(cls, **overrides) -> "SoakConfig":
        """The form `make test` runs on the tiny model on 2 CPU cores (well under 3 minutes)."""
        settings = {"prompts": 80, "clients": 3, "min_side": 32, "max_side": 96, "victim_steps": 24,
                    "interrupts": 3, "unloads": 2, "cache_frees": 2, "min_switches": 40, "rss_warmup": 6,
                    "prompt_timeout_s": 60, "deadline_s": 100, "reference_deadline_s": 50, "form": "short"}
        settings.update(overrides)
        return cls(**settings)


@dataclass
class ModelSetup:
    """The model files a server gets, and what the graphs call them."""
    model: str
    text_encoder: str
    vae: str
    loras: list[str]
    files: dict  # models sub-folder -> [source paths]
    link: bool  # symlink (large true-size files) or copy (tiny files)
    note: str
    tiny: bool

    def place(self, models_dir: Path) -> None:
        for sub, paths in self.files.items():
            folder = Path(models_dir) / sub
            folder.mkdir(parents=True, exist_ok=True)
            for src, name in paths:
                dest = folder / name
                if dest.exists() or dest.is_symlink():
                    continue
                if self.link:
                    dest.symlink_to(Path(src).resolve())
                else:
                    shutil.copy(src, dest)


def tiny_setup(workdir: Path, built=None, lora_paths=None) -> ModelSetup:
    """The tiny model (real classes, random weights) under the real file names, plus one LoRA per key format.

    `built` / `lora_paths`: reuse what tests/conftest.py's `tiny` fixture built instead of building again."""
    from devtools import install_tiny_models

    if built is None or lora_paths is None:
        new_built, new_loras = install_tiny_models.build(Path(workdir) / "tiny")
        built = new_built if built is None else built
        lora_paths = list(new_loras.values()) if lora_paths is None else lora_paths
    lora_paths = [Path(p) for p in lora_paths]
    return ModelSetup(
        MODEL, TEXT_ENCODER, VAE, [p.name for p in lora_paths],
        {"diffusion_models": [(built.transformer_file, MODEL)], "text_encoders": [(built.text_encoder_file, TEXT_ENCODER)],
         "vae": [(built.vae_file, VAE)], "loras": [(p, p.name) for p in lora_paths]},
        link=False, note="TINY random-weight model (real Z-Image classes, small sizes, random weights): images are "
                         "noise", tiny=True)


def root_setup(root: Path, workdir: Path, min_loras: int = 3) -> ModelSetup:
    """The files bench/build_model.py wrote under `root` (symlinked into the servers' model folders).

    build_model.py writes two LoRAs; stacks of three distinct LoRAs need a third, so the missing ones are built
    here (same sizes and rank, other seeds) in `workdir`."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise SoakSetupError(f"{manifest_path} not found: build the model first (python3 -m bench.build_model "
                             f"--root {root}).")
    manifest = json.loads(manifest_path.read_text())
    files = {}
    for sub, name in MODEL_FILES.items():
        if not (root / sub / name).is_file():
            raise SoakSetupError(f"{root / sub / name} is missing (see bench/build_model.py for the layout).")
        files[sub] = [(root / sub / name, name)]
    loras = sorted((root / "loras").glob("*.safetensors"))
    if len(loras) < min_loras:
        import torch

        from devtools import model_builder

        sizes = model_builder.TINY if manifest.get("tiny") else model_builder.FULL
        info = next(iter(manifest.get("loras", {}).values()), {"rank": 32})
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32 if manifest.get("tiny") else torch.bfloat16
        for i in range(min_loras - len(loras)):
            path = Path(workdir) / "extra_loras" / f"soak_extra_{i}_r{info.get('rank', 32)}.safetensors"
            model_builder.build_random_lora(path, sizes.transformer, "diffusers", rank=info.get("rank", 32),
                                            seed=100 + i, refiners=True, scale=0.5 if manifest.get("tiny") else 0.02,
                                            dtype=dtype, device=device)
            loras.append(path)
    files["loras"] = [(p, p.name) for p in loras]
    tiny = bool(manifest.get("tiny"))
    note = ("TINY random-weight model from bench/build_model.py --tiny" if tiny else
            "true-size Z-Image-Turbo with RANDOM weights (bench/build_model.py): images are noise, memory is real")
    return ModelSetup(MODEL, TEXT_ENCODER, VAE, [p.name for p in loras], files, link=True, note=note, tiny=tiny)


# ------------------------------------------------------------------------------------------------- graphs

def build_graph(setup: ModelSetup, cfg: SoakConfig, *, rows: list, seed: int, width: int, height: int, prompt: str,
                steps: int | None = None, shift: float = 3.0, split: int | None = None, prefix: str = "soak") -> dict:
    """The pack's graph (devtools.graphs.api_graph); with `split`, the rows before it go to a second stack chained
    in front."""
    front, back = (rows[:split], rows[split:]) if split is not None else (None, rows)
    return api_graph(model=setup.model, text_encoder=setup.text_encoder, vae=setup.vae, dtype=cfg.dtype,
                     memory=cfg.memory, compile=cfg.compile, loras=back, front_loras=front, prompt=prompt, seed=seed,
                     width=width, height=height, steps=cfg.steps if steps is None else steps, shift=shift,
                     prefix=prefix)


def set_rows(graph: dict, rows_json: str) -> dict:
    """Put `rows_json` (already JSON text) in the one stack node (a chained front stack is dropped)."""
    graph.pop(FRONT_STACK, None)
    graph[STACK]["inputs"].pop("lora_stack", None)
    graph[STACK]["inputs"]["loras"] = rows_json
    return graph


# Invalid prompts: (name, how the graph is spoiled, words of which one must be in the error). Each one must end in
# an HTTP 400 or an execution error that says what is wrong, never in success.
def _spoil(case: str, graph: dict, setup: ModelSetup, rng: random.Random) -> tuple[dict, tuple[str, ...]]:
    lora = rng.choice(setup.loras)
    sampler = graph[SAMPLER]["inputs"]
    if case == "missing_lora":
        name = f"soak_missing_{rng.randrange(10**6)}.safetensors"
        set_rows(graph, json.dumps([{"lora": name, "strength": 0.8, "on": True}]))
        return graph, (name,)
    if case == "loras_not_a_list":
        set_rows(graph, json.dumps({"lora": lora, "strength": 0.8, "on": True}))
        return graph, ("list",)
    if case == "on_is_a_string":
        set_rows(graph, json.dumps([{"lora": lora, "strength": 0.7, "on": "false"}]))
        return graph, ('"on"', "true or false", "boolean")
    if case == "strength_nan":
        set_rows(graph, json.dumps([{"lora": lora, "strength": float("nan"), "on": True}]))  # json writes NaN
        return graph, ("strength",)
    if case == "strength_infinite":
        set_rows(graph, json.dumps([{"lora": lora, "strength": rng.choice((1, -1)) * float("inf"), "on": True}]))
        return graph, ("strength",)
    if case == "strength_1e30":
        set_rows(graph, json.dumps([{"lora": lora, "strength": 1e30, "on": True}]))
        return graph, ("strength",)
    if case == "duplicate_lora":
        set_rows(graph, json.dumps([{"lora": lora, "strength": 0.5, "on": True},
                                    {"lora": lora, "strength": 0.7, "on": True}]))
        return graph, (lora,)
    if case == "width_not_multiple_of_16":
        sampler["width"] = rng.choice((100, 72 + 4, 50, 130))
        return graph, ("multiple of 16",)
    if case == "shift_nan":
        sampler["shift"] = float("nan")
        return graph, ("shift",)
    if case == "steps_zero":
        sampler["steps"] = 0
        return graph, ("steps",)
    if case == "unknown_node":
        graph[PROBE]["class_type"] = "ZImageTurboProbeThatDoesNotExist"
        return graph, ("ZImageTurboProbeThatDoesNotExist",)
    if case == "missing_required_input":
        del sampler["seed"]
        return graph, ("seed",)
    if case == "missing_model_file":
        name = f"soak_no_such_model_{rng.randrange(10**6)}.safetensors"
        graph[LOADER]["inputs"]["model"] = name
        return graph, (name,)
    raise ValueError(case)


INVALID_CASES = ("missing_lora", "loras_not_a_list", "on_is_a_string", "strength_nan", "strength_infinite",
                 "strength_1e30", "duplicate_lora", "width_not_multiple_of_16", "shift_nan", "steps_zero",
                 "unknown_node", "missing_required_input", "missing_model_file")


# -------------------------------------------------------------------------------------------------- plan

@dataclass
class Job:
    index: int
    kind: str  # valid | invalid | baseline | baseline_rerun | dummy | free_unload | free_cache
    graph: dict | None = None
    case: str = ""  # which invalid case
    keywords: tuple = ()
    interrupt: bool = False  # post /interrupt once this prompt makes progress
    summary: dict = field(default_factory=dict)
    # outcome
    client: str = ""
    attempts: list = field(default_factory=list)
    outcome: str = "not_run"
    message: str = ""
    image_hash: str | None = None
    image_shape: list | None = None
    image_file: str | None = None
    probe: dict = field(default_factory=dict)
    exec_start_ms: int | None = None
    reference: dict = field(default_factory=dict)

    @property
    def is_prompt(self) -> bool:
        return self.kind not in ("free_unload", "free_cache")

    @property
    def expects_image(self) -> bool:
        return self.kind in ("valid", "baseline", "baseline_rerun", "dummy")


def _side(rng: random.Random, cfg: SoakConfig) -> int:
    lo, hi = -(-cfg.min_side // 16), cfg.max_side // 16
    return 16 * rng.randint(lo, hi)


def _text(rng: random.Random, index: int) -> str:
    words = rng.sample(WORDS_EN, rng.randint(2, 5)) + rng.sample(WORDS_ZH, rng.randint(0, 3))
    rng.shuffle(words)
    return ", ".join(words) + f", no.{index}"


def _valid_job(index: int, rng: random.Random, cfg: SoakConfig, setup: ModelSetup, seeds: set, kind: str = "valid",
               rows: list | None = None, steps: int | None = None) -> Job:
    seed = rng.randrange(2**32)
    while seed in seeds:
        seed = rng.randrange(2**32)
    seeds.add(seed)
    if rows is None:
        files = rng.sample(setup.loras, min(len(setup.loras), rng.randint(0, 3)))
        rows = []
        for name in files:
            strength = round(rng.uniform(-1.0, 1.6), 2) if rng.random() > 0.05 else 0.0
            rows.append({"lora": name, "strength": strength, "on": rng.random() < 0.7})
    split = rng.randint(1, len(rows) - 1) if len(rows) >= 2 and rng.random() < cfg.chain_fraction else None
    width, height = _side(rng, cfg), _side(rng, cfg)
    graph = build_graph(setup, cfg, rows=rows, seed=seed, width=width, height=height, prompt=_text(rng, index),
                        steps=steps, split=split, prefix=f"soak/{kind}_{index:04d}")
    summary = {"seed": seed, "width": width, "height": height, "steps": graph[SAMPLER]["inputs"]["steps"],
               "rows": rows, "chained_at": split}
    return Job(index, kind, graph, summary=summary)


def make_plan(cfg: SoakConfig, setup: ModelSetup) -> tuple[Job, list[Job], Job, Job]:
    """(baseline, the mixed jobs in queue order, dummy, baseline re-run), all from cfg.seed."""
    rng = random.Random(cfg.seed)
    seeds: set = set()
    baseline = _valid_job(0, rng, cfg, setup, seeds, kind="baseline", rows=[])
    n = cfg.prompts
    # Every invalid case at least once where the run is long enough (never more than a third of the prompts).
    n_invalid = max(round(n * cfg.invalid_fraction), min(len(INVALID_CASES), n // 3))
    kinds = ["invalid"] * n_invalid + ["valid"] * (n - n_invalid)
    rng.shuffle(kinds)
    cases = []
    while len(cases) < n_invalid:  # every case once before any twice
        batch = list(INVALID_CASES)
        rng.shuffle(batch)
        cases += batch
    jobs: list[Job] = []
    for i, kind in enumerate(kinds, 1):
        job = _valid_job(i, rng, cfg, setup, seeds)
        if kind == "invalid":
            job.kind, job.case = "invalid", cases.pop(0)
            job.graph, job.keywords = _spoil(job.case, job.graph, setup, rng)
            job.graph[SAVE]["inputs"]["filename_prefix"] = f"soak/invalid_{i:04d}"
            job.summary["case"] = job.case
        jobs.append(job)
    # Interrupt victims: valid prompts in the middle 80 %, with more steps so that the /interrupt lands.
    valid_mid = [j for j in jobs[n // 10: n - n // 10] if j.kind == "valid"]
    for job in rng.sample(valid_mid, min(cfg.interrupts, len(valid_mid))):
        job.interrupt = True
        job.graph[SAMPLER]["inputs"]["steps"] = job.summary["steps"] = max(cfg.victim_steps, cfg.steps)
        job.graph[SAMPLER]["inputs"]["width"] = job.summary["width"] = 16 * (cfg.max_side // 16)
        job.graph[SAMPLER]["inputs"]["height"] = job.summary["height"] = 16 * (cfg.max_side // 16)
    # /free actions: unloads spread over 30..70 % of the run (the first and last quarters, whose RSS is compared,
    # then both hold a loaded pipeline), cache resets over 20..80 %.
    actions = []
    for count, kind, lo, hi in ((cfg.unloads, "free_unload", 0.3, 0.7), (cfg.cache_frees, "free_cache", 0.2, 0.8)):
        for k in range(count):
            actions.append((int(n * (lo + (hi - lo) * (k + 0.5) / count)), kind))
    for pos, kind in sorted(actions, reverse=True):
        jobs.insert(pos, Job(-1, kind))
    for i, job in enumerate(jobs):
        if not job.is_prompt:
            job.index = 10000 + i
    dummy = _valid_job(n + 1, rng, cfg, setup, seeds, kind="dummy")
    rerun = Job(n + 2, "baseline_rerun", json.loads(json.dumps(baseline.graph)), summary=dict(baseline.summary))
    rerun.graph[SAVE]["inputs"]["filename_prefix"] = f"soak/baseline_rerun_{n + 2:04d}"
    return baseline, jobs, dummy, rerun


# ------------------------------------------------------------------------------------------- the server

class ServerHolder:
    """The soak server; counts its deaths and starts a new one (same model folders, new port) after each."""

    def __init__(self, base_dir: Path, setup: ModelSetup, cpu: bool, extra_args=(), python: str = sys.executable,
                 log=print, tag: str = "soak", output_dir: Path | None = None, threads: int = 0):
        self.base_dir = Path(base_dir)
        self.env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
        self.tag = tag
        self.output_dir = Path(output_dir) if output_dir else self.base_dir / "output"
        self.setup = setup
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.python = python
        self.log = log
        self.lock = threading.Lock()
        self.generation = 0
        self.deaths: list[dict] = []
        self.server: ComfyServer | None = None
        self.start_seconds: list[float] = []

    def start(self) -> ComfyServer:
        t0 = time.perf_counter()
        args = front_end_args(self.base_dir / "front_end", self.python) + self.extra_args
        args += ["--output-directory", str(self.output_dir)]
        server = ComfyServer(self.base_dir, cpu=self.cpu, extra_args=args, python=self.python, env=self.env,
                             log_path=self.base_dir / f"comfyui.{self.tag}.{self.generation}.log")
        server.prepare()
        self.setup.place(self.base_dir / "models")
        server.start(timeout=600)
        self.start_seconds.append(time.perf_counter() - t0)
        self.server = server
        return server

    @property
    def client(self) -> ComfyClient:
        return self.server.client

    def check(self, generation: int, why: str = "") -> bool:
        """True when the server of `generation` is gone (and a new one has been started); False when it is fine."""
        with self.lock:
            if generation != self.generation:
                return True  # another client already found it dead
            server = self.server
            alive = False
            for _ in range(20):  # up to ~10 s for a busy server to answer
                if not server.running():
                    break
                if server.client.alive():
                    alive = True
                    break
                time.sleep(0.5)
            if alive:
                return False
            code = server.proc.poll() if server.proc else None
            self.deaths.append({"generation": generation, "exit_code": code, "why": why,
                                "at": dt.datetime.now().isoformat(timespec="seconds"),
                                "log_tail": server.log_text()[-3000:]})
            self.log(f"[soak] SERVER DIED (exit code {code}; {why}); starting a new one")
            server.stop()
            self.generation += 1
            self.start()
            return True

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


# --------------------------------------------------------------------------------------------- outcomes

def _png_pixels(raw: bytes):
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        return np.asarray(img)


def pixel_hash(pixels) -> str:
    h = hashlib.sha256(f"{pixels.shape}|{pixels.dtype}|".encode())
    h.update(pixels.tobytes())
    return h.hexdigest()


def error_texts(status: str, error: dict | None) -> list[str]:
    """The human-readable parts of a refusal (HTTP 400) or an execution error."""
    error = error or {}
    if status == "rejected":
        body = error.get("body")
        if not isinstance(body, dict):
            return [str(body)] if body else []
        texts = []
        for nid, node in (body.get("node_errors") or {}).items():  # the specific messages first
            for e in node.get("errors", []):
                texts.append(f"node {nid} ({node.get('class_type')}): {e.get('message', '')}: {e.get('details', '')}")
        err = body.get("error") or {}
        if isinstance(err, dict):
            texts.append(" ".join(t for t in (err.get("message", ""), err.get("details", "")) if t))
        else:
            texts.append(str(err))
        return [t for t in texts if t]
    return [t for t in (error.get("exception_message", ""),) if t]


def judge_error(status: str, error: dict | None, keywords) -> tuple[bool, str]:
    """(clear, the message): a clear error names the problem and is not a raw Python exception."""
    texts = error_texts(status, error)
    message = " | ".join(t.strip() for t in texts)[:600]
    if not message:
        return False, "(no message)"
    if status == "error":
        etype = str((error or {}).get("exception_type", "")).rsplit(".", 1)[-1]
        if etype in RAW_ERROR_TYPES:
            return False, f"{etype}: {message}"
        if message.lstrip().startswith("Traceback"):
            return False, message
    low = message.lower()
    if keywords and not any(k.lower() in low for k in keywords):
        return False, f"(names none of {list(keywords)}) {message}"
    return True, message


def _probe_summary(outputs: dict) -> dict:
    found = (outputs.get(PROBE) or {}).get("zimage_probe") or []
    if not found:
        return {}
    p = found[0]
    nvml = next((n for n in (p.get("nvml_after"), p.get("nvml_during")) if (n or {}).get("available")), {})
    tm = p.get("torch_memory") or {}
    return {
        "device_name": p.get("device_name"), "dtype": p.get("dtype"), "total_s": p.get("total_s"),
        "lora": [(x.get("file"), x.get("strength")) for x in p.get("lora") or []],
        "base_reloaded": p.get("base_reloaded"), "compiled": p.get("compiled"),
        "process_rss_bytes": p.get("process_rss_bytes"),
        "torch_allocated_bytes": tm.get("allocated_bytes"), "torch_reserved_bytes": tm.get("reserved_bytes"),
        "nvml_used_bytes": nvml.get("used_bytes"), "gpu_name": nvml.get("name"),
    }


def _exec_start_ms(history: dict | None) -> int | None:
    for event, data in ((history or {}).get("status") or {}).get("messages", []):
        if event == "execution_start":
            return data.get("timestamp")
    return None


def fetch_image(client: ComfyClient, output_dir: Path, outputs: dict) -> tuple[str, list, str] | None:
    """(pixel hash, shape, file on disk) of the SaveImage output, read back through GET /view."""
    images = (outputs.get(SAVE) or {}).get("images") or []
    if not images:
        return None
    info = images[0]
    raw = client.view(info["filename"], info.get("subfolder", ""), info.get("type", "output"))
    if not isinstance(raw, bytes) or not raw.startswith(b"\x89PNG"):
        return None
    pixels = _png_pixels(raw)
    path = Path(output_dir) / info.get("subfolder", "") / info["filename"]
    return pixel_hash(pixels), list(pixels.shape), str(path)


def drift(values: list[float], warmup: int) -> dict:
    """Mean of the last quarter against the first quarter, after `warmup` samples are left out."""
    kept = [v for v in values[warmup:] if v is not None]
    if len(kept) < 8:
        return {"drift_pct": None, "samples": len(kept), "warmup_excluded": warmup,
                "note": "fewer than 8 samples after the warm-up"}
    q = len(kept) // 4
    first, last = sum(kept[:q]) / q, sum(kept[-q:]) / q
    return {"drift_pct": round((last - first) / first * 100, 3) if first else None, "samples": len(kept),
            "warmup_excluded": warmup, "quarter": q, "first_quarter_mean": first, "last_quarter_mean": last,
            "min": min(kept), "max": max(kept)}


# ---------------------------------------------------------------------------------------------- the run

class SoakRun:
    def __init__(self, cfg: SoakConfig, setup: ModelSetup, workdir: Path, cpu: bool, python: str = sys.executable,
                 log=print):
        self.cfg = cfg
        self.setup = setup
        self.workdir = Path(workdir)
        self.cpu = cpu
        self.python = python
        self.log = log
        self.lock = threading.Lock()
        self.rss: list[dict] = []  # one sample after each finished job
        self.done = 0
        self.interrupts_sent = 0
        self.frees: list[dict] = []
        self.stop_at = 0.0
        self.t0 = 0.0

    # -- one prompt, queued again while it ends interrupted
    def run_job(self, job: Job, holder: ServerHolder, sessions: dict, name: str) -> None:
        job.client = name
        for attempt in range(self.cfg.max_attempts):
            session, gen = self._session(holder, sessions, name)
            if session is None:
                job.attempts.append({"status": "disconnected", "error": "no websocket connection"})
                job.outcome = "lost" if job.expects_image else "invalid_lost"
                job.message = "could not connect to the server"
                return
            fired = []

            def on_message(result, msg, fired=fired, first=attempt == 0):
                if job.interrupt and first and not fired and msg.get("type") == "progress":
                    fired.append(True)
                    holder.client.post("/interrupt", {})  # global, as the Cancel button: may hit another client
                    with self.lock:
                        self.interrupts_sent += 1

            res = session.run(job.graph, timeout=self.cfg.prompt_timeout_s, on_message=on_message)
            record = {"status": res.status, "prompt_id": res.prompt_id, "seconds": round(res.seconds, 3),
                      "generation": gen, "cached": res.cached_nodes(), "interrupt_sent": bool(fired)}
            if res.status in ("error", "rejected"):
                record["error"] = judge_error(res.status, res.error, ())[1]
                if res.status == "error":
                    record["exception_type"] = str(res.error.get("exception_type", ""))
            if res.status in ("disconnected", "timeout"):
                record["error"] = json.dumps(res.error)[:300] if res.error else res.status
            job.attempts.append(record)
            if res.status == "interrupted":
                continue  # neither lost nor an error: queue it again
            if res.status in ("disconnected", "timeout"):
                if res.status == "timeout" and res.prompt_id:
                    try:  # take it out of the server so that it does not run into the next prompts
                        holder.client.post("/queue", {"delete": [res.prompt_id]})
                        holder.client.post("/interrupt", {"prompt_id": res.prompt_id})
                    except OSError:
                        pass
                holder.check(gen, f"{job.kind} job {job.index}: {res.status}")
            self.judge(job, res, holder)
            return
        job.outcome = "interrupted_every_time"
        job.message = f"interrupted {self.cfg.max_attempts} times"

    @staticmethod
    def _session(holder: ServerHolder, sessions: dict, name: str):
        """This client's websocket session on the current server (a new one after a restart)."""
        for _ in range(3):
            gen = holder.generation
            session = sessions.get("session")
            if session is not None and not session.closed and sessions.get("generation") == gen:
                return session, gen
            if session is not None:
                session.close()
            try:
                session = holder.client.session(f"{name}-{gen}")
            except Exception as exc:  # the server went away between two prompts
                holder.check(gen, f"websocket connect failed: {exc!r}")
                continue
            sessions.update(session=session, generation=gen)
            return session, gen
        return None, holder.generation

    def judge(self, job: Job, res, holder: ServerHolder) -> None:
        if job.expects_image:
            if res.status != "success":
                job.outcome = "lost"
                job.message = job.attempts[-1].get("error", res.status)
                return
            job.exec_start_ms = _exec_start_ms(res.history)
            job.probe = _probe_summary(res.outputs())
            job.summary["sampler_cached"] = SAMPLER in res.cached_nodes()
            try:
                got = fetch_image(holder.client, holder.output_dir, res.outputs())
            except OSError as exc:
                got, job.message = None, f"GET /view failed: {exc!r}"
            if got is None:
                job.outcome = "lost"
                job.message = job.message or "success without an image"
                return
            job.image_hash, job.image_shape, job.image_file = got
            job.outcome = "success"
            return
        # invalid
        if res.status == "success":
            job.outcome = "invalid_succeeded"
            job.exec_start_ms = _exec_start_ms(res.history)
            job.probe = _probe_summary(res.outputs())
            job.message = "ended in success"
            return
        if res.status in ("rejected", "error"):
            clear, message = judge_error(res.status, res.error, job.keywords)
            job.outcome = ("clear_" if clear else "unclear_") + ("rejection" if res.status == "rejected" else "error")
            job.message = message
            return
        job.outcome = "invalid_lost"
        job.message = job.attempts[-1].get("error", res.status)

    def sample(self, holder: ServerHolder, job: Job) -> None:
        rss = holder.server.rss_bytes()
        with self.lock:
            self.done += 1
            self.rss.append({"n": self.done, "t": round(time.perf_counter() - self.t0, 2), "rss_bytes": rss,
                             "job": job.index, "generation": holder.generation})
            if self.cfg.kill_after and self.done == self.cfg.kill_after and holder.server.running():
                self.log(f"[soak] --kill-after {self.cfg.kill_after}: killing the server (self-check)")
                holder.server.proc.send_signal(signal.SIGKILL)

    def free(self, job: Job, holder: ServerHolder) -> None:
        unload = job.kind == "free_unload"
        try:
            status, _ = holder.client.post("/free", {"unload_models": unload, "free_memory": True})
        except OSError as exc:
            status = repr(exc)
        job.client = threading.current_thread().name
        job.outcome = "posted" if status == 200 else f"failed: {status}"
        with self.lock:
            self.frees.append({"kind": job.kind, "status": status, "after_jobs": self.done})

    def worker(self, name: str, todo: deque, holder: ServerHolder) -> None:
        sessions: dict = {}
        try:
            while True:
                with self.lock:
                    if not todo or time.perf_counter() > self.stop_at:
                        return
                    job = todo.popleft()
                if not job.is_prompt:
                    self.free(job, holder)
                    continue
                self.run_job(job, holder, sessions, name)
                self.sample(holder, job)
                if holder.server.proc.poll() is not None:
                    holder.check(holder.generation, "process exited")
        finally:
            if sessions.get("session") is not None:
                sessions["session"].close()

    # -- the whole soak
    def run(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        self.started_at = dt.datetime.now().isoformat(timespec="seconds")
        baseline, jobs, dummy, rerun = make_plan(cfg, self.setup)
        holder = ServerHolder(self.workdir / "server", self.setup, self.cpu, python=self.python, log=self.log,
                              threads=self.cfg.server_threads)
        self.log(f"[soak] starting the soak server ({'CPU' if self.cpu else 'GPU'}) in {holder.base_dir}")
        holder.start()
        self.t0 = time.perf_counter()
        self.stop_at = self.t0 + cfg.deadline_s
        try:
            first = {}
            self.run_job(baseline, holder, first, "client-0")
            self.sample(holder, baseline)
            self.log(f"[soak] baseline (no LoRA): {baseline.outcome}; mixing {len(jobs)} jobs over {cfg.clients} "
                     f"clients")
            todo = deque(jobs)
            threads = [threading.Thread(target=self.worker, args=(f"client-{k}", todo, holder), name=f"client-{k}",
                                        daemon=True) for k in range(cfg.clients)]
            for t in threads:
                t.start()
            last_report = time.perf_counter()
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=1.0)
                if time.perf_counter() - last_report > 15:
                    last_report = time.perf_counter()
                    self.log(f"[soak] {self.done} jobs done, {len(todo)} to go, "
                             f"{time.perf_counter() - self.t0:.0f} s")
            # Last: reset ComfyUI's output cache (applied after the next prompt it runs, hence the dummy), then the
            # baseline again, after all the LoRA switches.
            try:
                holder.client.post("/free", {"unload_models": False, "free_memory": True})
            except OSError:
                holder.check(holder.generation, "POST /free before the baseline re-run failed")
            final = {}
            for job in (dummy, rerun):
                self.run_job(job, holder, final, "client-final")
                self.sample(holder, job)
            if final.get("session") is not None:
                final["session"].close()
            if first.get("session") is not None:
                first["session"].close()
            soak_s = time.perf_counter() - self.t0
            if not holder.server.running():
                holder.check(holder.generation, "found dead at the end")
        finally:
            holder.stop()
        everything = [baseline] + jobs + [dummy, rerun]
        prompts = [j for j in everything if j.is_prompt]
        self.log(f"[soak] mixed phase done in {soak_s:.0f} s; running every valid prompt alone on a fresh server")
        ref_s, ref_start_s = self.reference([j for j in prompts if j.outcome == "success"])
        return self.summarise(baseline, jobs, dummy, rerun, holder, soak_s, ref_s, ref_start_s,
                              time.perf_counter() - t_start)

    def reference(self, jobs: list[Job]) -> tuple[float, float]:
        """Every valid prompt that got an image, alone on a fresh server: one client, one at a time, no cache."""
        order = list(jobs)
        if self.cfg.reference_order == "shuffled":
            random.Random(self.cfg.seed + 1).shuffle(order)
        # The same model folders (the same base directory, so the same file paths and modification times) with
        # outputs of its own: a fresh process, nothing loaded, nothing cached.
        holder = ServerHolder(self.workdir / "server", self.setup, self.cpu, extra_args=["--cache-none"],
                              python=self.python, log=self.log, tag="reference",
                              output_dir=self.workdir / "reference_output", threads=self.cfg.server_threads)
        holder.start()
        t0 = time.perf_counter()
        stop_at = t0 + self.cfg.reference_deadline_s
        try:
            with holder.client.session("reference") as session:
                for job in order:
                    if time.perf_counter() > stop_at:
                        job.reference = {"status": "not_run (deadline)"}
                        continue
                    res = session.run(job.graph, timeout=self.cfg.prompt_timeout_s)
                    ref = {"status": res.status, "prompt_id": res.prompt_id, "seconds": round(res.seconds, 3)}
                    if res.status == "success":
                        got = fetch_image(holder.client, holder.output_dir, res.outputs())
                        if got is None:
                            ref["status"] = "no image"
                        else:
                            ref["hash"], ref["shape"], ref["file"] = got
                            ref["equal"] = ref["hash"] == job.image_hash
                            if not ref["equal"]:
                                ref.update(compare_files(job.image_file, ref["file"]))
                    else:
                        ref["error"] = judge_error(res.status, res.error, ())[1]
                    job.reference = ref
        finally:
            holder.stop()
        return time.perf_counter() - t0, holder.start_seconds[0] if holder.start_seconds else 0.0

    # -- the result
    def summarise(self, baseline, jobs, dummy, rerun, holder, soak_s, ref_s, ref_start_s, total_s) -> dict:
        cfg = self.cfg
        everything = [baseline] + jobs + [dummy, rerun]
        prompts = [j for j in everything if j.is_prompt]
        valid = [j for j in prompts if j.expects_image]
        invalid = [j for j in prompts if j.kind == "invalid"]
        ran = [j for j in prompts if j.attempts]
        not_run = [j for j in prompts if not j.attempts]
        lost = [j for j in valid if j.attempts and j.outcome != "success"]
        compared = [j for j in valid if j.reference.get("equal") is not None]
        mismatched = [j for j in compared if not j.reference["equal"]]
        ref_failed = [j for j in valid if j.outcome == "success" and j.reference.get("equal") is None]
        invalid_succeeded = [j for j in invalid if j.outcome == "invalid_succeeded"]
        unclear = [j for j in invalid if j.outcome.startswith("unclear_")]
        invalid_lost = [j for j in invalid if j.outcome in ("invalid_lost", "interrupted_every_time")]
        interrupted_runs = sum(1 for j in prompts for a in j.attempts if a["status"] == "interrupted")

        # LoRA switches: the active LoRAs (file, strength) of each generation, in the order the server ran them.
        executed = sorted((j for j in prompts if j.exec_start_ms is not None and j.probe
                           and not j.summary.get("sampler_cached")), key=lambda j: (j.exec_start_ms, j.index))
        configs = [tuple(tuple(x) for x in j.probe.get("lora", [])) for j in executed]
        switches = sum(1 for a, b in itertools.pairwise(configs) if a != b)
        base_identical = (baseline.image_hash is not None and rerun.image_hash is not None
                          and baseline.image_hash == rerun.image_hash and not rerun.summary.get("sampler_cached"))

        # RSS of the last server process only (after a death the new process starts from scratch).
        rss = drift([s["rss_bytes"] for s in self.rss if s["generation"] == holder.generation], cfg.rss_warmup)
        gpu = any(j.probe.get("torch_reserved_bytes") for j in executed)
        vram = None
        if gpu:
            key = "nvml_used_bytes" if any(j.probe.get("nvml_used_bytes") for j in executed) else "torch_reserved_bytes"
            vram = drift([j.probe.get(key) for j in executed], cfg.rss_warmup)
            vram["measure"] = key
            vram["torch_allocated"] = drift([j.probe.get("torch_allocated_bytes") for j in executed], cfg.rss_warmup)
        device_name = next((j.probe.get("gpu_name") or j.probe.get("device_name") for j in executed if j.probe), "?")
        device_label = device_slug(device_name, self.setup.tiny)

        failures = []
        if holder.deaths:
            failures.append(f"the server died {len(holder.deaths)} time(s)")
        if lost:
            failures.append(f"{len(lost)} valid prompt(s) ended without an image")
        if mismatched:
            failures.append(f"{len(mismatched)} image(s) differ from the same prompt run alone")
        if ref_failed:
            failures.append(f"{len(ref_failed)} valid prompt(s) could not be run again alone")
        if invalid_succeeded:
            failures.append("invalid prompt(s) ended in success: "
                            + ", ".join(sorted({j.case for j in invalid_succeeded})))
        if unclear:
            failures.append("invalid prompt(s) ended in an unclear error: " + ", ".join(sorted({j.case for j in unclear})))
        if invalid_lost:
            failures.append(f"{len(invalid_lost)} invalid prompt(s) got no answer")
        if not_run:
            failures.append(f"{len(not_run)} prompt(s) not run before the deadline")
        if rss["drift_pct"] is None or rss["drift_pct"] > cfg.max_drift_pct:
            failures.append(f"server RSS drift {rss['drift_pct']} % (limit {cfg.max_drift_pct} %)")
        if vram is not None and (vram["drift_pct"] is None or vram["drift_pct"] > cfg.max_drift_pct):
            failures.append(f"VRAM drift {vram['drift_pct']} % (limit {cfg.max_drift_pct} %)")
        if switches < cfg.min_switches:
            failures.append(f"only {switches} LoRA switches (at least {cfg.min_switches} wanted)")
        if not base_identical:
            failures.append("the no-LoRA baseline was not bit-identical after the LoRA switches"
                            + (" (its sampler came from ComfyUI's cache)" if rerun.summary.get("sampler_cached") else ""))
        if self.interrupts_sent == 0 and cfg.interrupts:
            failures.append("no /interrupt was posted (no victim made progress)")

        cases = {}
        for j in invalid:
            c = cases.setdefault(j.case, {"count": 0, "outcomes": {}, "message": ""})
            c["count"] += 1
            c["outcomes"][j.outcome] = c["outcomes"].get(j.outcome, 0) + 1
            if not c["message"] or j.outcome in ("invalid_succeeded",) or j.outcome.startswith("unclear_"):
                c["message"] = j.message
        return {
            "date": self.started_at[:10],
            "started_at": self.started_at,
            "form": cfg.form,
            "code": git_state(),
            "device": device_label,
            "device_name": device_name,
            "model_note": self.setup.note,
            "config": dataclasses.asdict(cfg),
            "passed": not failures,
            "failures": failures,
            # the keys asked for
            "prompts": len(prompts),
            "valid": len(valid),
            "invalid": len(invalid),
            "server_deaths": len(holder.deaths),
            "lost": len(lost),
            "mismatched_images": len(mismatched),
            "rss_drift_pct": rss["drift_pct"],
            "vram_drift_pct": vram["drift_pct"] if vram else None,
            "lora_switches": switches,
            "base_bit_identical_after_switches": base_identical,
            # more
            "images_compared": len(compared),
            "reference_failed": len(ref_failed),
            "invalid_succeeded": len(invalid_succeeded),
            "invalid_succeeded_cases": sorted({j.case for j in invalid_succeeded}),
            "unclear_errors": len(unclear),
            "invalid_lost": len(invalid_lost),
            "not_run": len(not_run),
            "interrupts_sent": self.interrupts_sent,
            "interrupted": interrupted_runs,
            "requeued": sum(max(0, len(j.attempts) - 1) for j in prompts),
            "frees": self.frees,
            "clients": cfg.clients,
            "queued_posts": sum(len(j.attempts) for j in ran),
            "invalid_cases": cases,
            "rss": {**rss, "series_bytes": [s["rss_bytes"] for s in self.rss]},
            "vram": vram,
            "deaths": holder.deaths,
            "timings_s": {"total": round(total_s, 1), "soak": round(soak_s, 1), "reference": round(ref_s, 1),
                          "soak_server_start": [round(s, 1) for s in holder.start_seconds],
                          "reference_server_start": round(ref_start_s, 1)},
            "jobs": [job_record(j) for j in everything],
        }


def compare_files(a: str | None, b: str | None) -> dict:
    """How two saved images differ (for the report of a mismatch)."""
    import numpy as np

    try:
        pa, pb = _png_pixels(Path(a).read_bytes()), _png_pixels(Path(b).read_bytes())
    except (OSError, TypeError) as exc:
        return {"diff": f"could not read: {exc!r}"}
    if pa.shape != pb.shape:
        return {"diff": f"shapes {pa.shape} and {pb.shape}"}
    d = np.abs(pa.astype(int) - pb.astype(int))
    return {"max_abs_diff": int(d.max()), "differing_values": int((d > 0).sum()), "values": int(d.size)}


def job_record(j: Job) -> dict:
    rec = {"index": j.index, "kind": j.kind, "client": j.client, "outcome": j.outcome}
    if not j.is_prompt:
        return rec
    rec.update({"case": j.case or None, "interrupt": j.interrupt, "summary": j.summary, "attempts": j.attempts,
                "message": j.message or None, "image_hash": j.image_hash, "exec_start_ms": j.exec_start_ms,
                "lora_active": j.probe.get("lora"), "reference": {k: v for k, v in j.reference.items() if k != "file"}})
    steps = j.probe.get("step_s") or []
    if steps:  # the generation's own denoise step times (probe), to compare runs at equal sizes
        rec["step_ms_median"] = round(1000 * statistics.median_high(steps), 2)
    return rec


def device_slug(name: str, tiny: bool) -> str:
    inside = re.search(r"\((.*)\)", name or "")
    base = inside.group(1) if inside else (name or "unknown")
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-") or "unknown"
    if slug.startswith("cpu"):
        slug = "cpu"
    return slug + ("-tiny" if tiny else "")


# ----------------------------------------------------------------------------------------------- output

def render_markdown(r: dict) -> str:
    cfg = r["config"]
    ok = "PASSED" if r["passed"] else "FAILED"
    gib = 1024**3
    rss = r["rss"]
    lines = [
        f"# Soak test {r['date']}: {r['device']} ({ok})",
        "",
        f"> **Model:** {r['model_note']}.",
        "",
        f"- ComfyUI 0.3.75 through its HTTP API: {r['prompts']} prompts ({r['valid']} valid, {r['invalid']} invalid) "
        f"from {cfg['clients']} clients at once (own client id and websocket each), {r['queued_posts']} POST /prompt "
        f"in all; device {r['device_name']}, dtype {cfg['dtype']}, compile {cfg['compile']}, sizes "
        f"{cfg['min_side']}..{cfg['max_side']} px (multiples of 16), {cfg['steps']} steps, seed {cfg['seed']} for "
        f"the plan, {cfg['form']} form; server threads: {cfg['server_threads'] or 'torch default'}; code "
        f"{(r.get('code') or {}).get('commit') or '?'}"
        + (f" with local changes to {', '.join(r['code']['modified_files'])}" if (r.get('code') or {}).get(
            'modified_files') else "") + ".",
        f"- /interrupt posted {r['interrupts_sent']} times ({r['interrupted']} runs ended interrupted and were queued "
        f"again); /free with unload_models {sum(f['kind'] == 'free_unload' for f in r['frees'])} times, cache-only "
        f"/free {sum(f['kind'] == 'free_cache' for f in r['frees'])} times.",
        f"- Time: {r['timings_s']['total']} s in all; mixed phase {r['timings_s']['soak']} s, reference run "
        f"{r['timings_s']['reference']} s.",
        "",
        "| check | result |",
        "|---|---|",
        f"| server deaths | {r['server_deaths']} |",
        f"| valid prompts without an image (lost) | {r['lost']} |",
        f"| images different from the same prompt run alone | {r['mismatched_images']} of {r['images_compared']} "
        f"compared (decoded pixels) |",
        f"| invalid prompts that succeeded | {r['invalid_succeeded']}"
        + (f" ({', '.join(r['invalid_succeeded_cases'])})" if r['invalid_succeeded_cases'] else "") + " |",
        f"| invalid prompts with an unclear error | {r['unclear_errors']} |",
        f"| server RSS drift, last vs first quarter | {r['rss_drift_pct']} % ({rss.get('samples')} samples after "
        f"{rss.get('warmup_excluded')} warm-up" + (f"; {rss['first_quarter_mean'] / gib:.3f} -> "
                                                   f"{rss['last_quarter_mean'] / gib:.3f} GiB" if rss.get(
            'first_quarter_mean') else "") + ") |",
        f"| VRAM drift | {r['vram_drift_pct'] if r['vram_drift_pct'] is not None else 'n/a (CPU)'}"
        + (f" % ({r['vram']['measure']})" if r.get('vram') else "") + " |",
        f"| LoRA switches between the baseline and its re-run | {r['lora_switches']} |",
        f"| no-LoRA baseline bit-identical after the switches | {r['base_bit_identical_after_switches']} |",
        "",
    ]
    if r["failures"]:
        lines += ["## Failures", ""] + [f"- {f}" for f in r["failures"]] + [""]
    lines += ["## Invalid prompts", "", "| case | count | outcomes | message (one) |", "|---|---:|---|---|"]
    for case, c in sorted(r["invalid_cases"].items()):
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(c["outcomes"].items()))
        msg = (c["message"] or "").replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {case} | {c['count']} | {outcomes} | {msg} |")
    mism = [j for j in r["jobs"] if j.get("reference", {}).get("equal") is False]
    if mism:
        lines += ["", "## Mismatched images", ""]
        for j in mism[:20]:
            ref = j["reference"]
            lines.append(f"- job {j['index']} {j['summary'].get('width')}x{j['summary'].get('height')} LoRAs "
                         f"{j['lora_active']}: max |diff| {ref.get('max_abs_diff')}, {ref.get('differing_values')} of "
                         f"{ref.get('values')} values differ {ref.get('diff', '')}")
    lines += [
        "",
        "## How it is measured (decisions)",
        "",
        "- Each client is a thread with its own client id and one websocket, one prompt in flight at a time; the "
        "plan (stacks, sizes, seeds, texts, which prompts are invalid, where /interrupt and /free go) follows from "
        "the seed. Every valid prompt has its own seed, so no result can come from ComfyUI's cache.",
        "- Valid stacks: 0-3 distinct LoRA files, strengths -1.0..1.6 (5 % exactly 0), each row on with p 0.7; "
        f"{int(cfg['chain_fraction'] * 100)} % of the stacks with two rows or more are split over two chained stack "
        "nodes. A LoRA switch is a change of the active (file, strength) set between two generations in the order "
        "the server ran them (from the probe's report and execution_start time).",
        "- Same prompt run alone: after the mixed phase a second, fresh server process (`--cache-none`, outputs "
        "of its own) on the same model folders runs every valid prompt that got an image once more, one at a time, "
        f"from one client, in {cfg['reference_order']} order, so its history differs from the soak. The PNGs are "
        "decoded and the pixel arrays compared exactly (the PNG bytes differ by their metadata: prompt id, "
        "workflow). Same folders because the engine sums the LoRAs of a stack in the order of their adapter names, "
        "a hash of each file's path, size and modification time: a LoRA copied elsewhere or touched can change that "
        "order and with it a few values by 1/255 (seen with two stacked LoRAs on the tiny model).",
        "- /interrupt is posted (globally, as the Cancel button does) when a victim prompt sends its first progress; "
        "it may land on another client's prompt. An interrupted prompt is queued again (at most "
        f"{cfg['max_attempts']} runs in all); it is only lost if it never gets an image.",
        "- /free: with unload_models at 30-70 % of the run (the pipeline is released and loaded again), cache-only at "
        "20-80 %. ComfyUI applies /free flags after the next prompt it runs; before the baseline re-run a cache-only "
        "/free and a dummy prompt make sure the sampler really runs again (checked: it is not in execution_cached).",
        "- Invalid prompts end well when the answer is an HTTP 400 whose node errors, or an execution error whose "
        "message, names the problem (a keyword per case), and the exception type is not a raw Python one "
        "(KeyError, TypeError, ValueError, RuntimeError, ...). NaN / Infinity are sent as JSON tokens.",
        f"- RSS: VmRSS of the server process after each finished prompt; the first {cfg['rss_warmup']} samples are "
        f"warm-up; drift = (mean of the last quarter - mean of the first quarter) / first; fails above "
        f"{cfg['max_drift_pct']} % (growth; a drop is no leak). VRAM likewise from the probe node (NVML used of the "
        "pipeline's GPU, else torch reserved).",
        "- A dead server is counted, started again (same model folders, new port) and the run goes on; its prompts "
        "in flight count as lost.",
        "",
    ]
    return "\n".join(lines)


def default_stem(result: dict) -> str:
    """<YYYY-MM-DD>-<device>, with -short for the short form."""
    return f"{result['date']}-{result['device']}" + ("-short" if result.get("form") == "short" else "")


def dump_json(result: dict) -> str:
    """One line per key (and per job), so that the file stays short and diffs stay readable."""
    def one(value) -> str:
        return json.dumps(value, ensure_ascii=False, default=str)

    lines = []
    for key, value in result.items():
        if key == "jobs":
            body = ",\n".join("  " + one(j) for j in value)
            lines.append(f' "jobs": [\n{body}\n ]')
        else:
            lines.append(f" {one(key)}: {one(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def git_state() -> dict:
    """The commit the node pack was at, and whether its files differed from it (None outside a git checkout).

    A clean export (`git archive`, as the GPU runs use: bench/NOTES.md) has no .git of its own, and git would
    answer for whatever checkout holds the folder; its .commit file, written when it was made, names it.
    """
    import subprocess

    stamp = REPO / ".commit"
    if stamp.is_file() and not (REPO / ".git").exists():
        return {"commit": stamp.read_text().strip(), "modified_files": [], "source": "git archive of that commit"}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified_files": None}
    return {"commit": head, "modified_files": [line[3:] for line in dirty.splitlines() if line.strip()]}


def write_outputs(result: dict, out_dir: Path = RESULTS_DIR, stem: str | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or default_stem(result)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    paths["json"].write_text(dump_json(result))
    paths["markdown"].write_text(render_markdown(result))
    return paths


def run_soak(cfg: SoakConfig, setup: ModelSetup, workdir: Path, cpu: bool, python: str = sys.executable,
             log=print) -> dict:
    if not (COMFY_DIR / "main.py").is_file():
        raise SoakSetupError(f"ComfyUI is not set up in {COMFY_DIR} (scripts/setup.sh, or bench/gpu_run.sh there).")
    return SoakRun(cfg, setup, workdir, cpu, python, log).run()


# --------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny", action="store_true", help="build the tiny model and LoRAs; CPU server")
    src.add_argument("--root", type=Path, help="the folder bench/build_model.py wrote (true-size random weights)")
    ap.add_argument("--short", action="store_true",
                    help="the short form of `make test` (80 prompts, under a minute on an idle 2-core CPU)")
    ap.add_argument("--cpu", action="store_true", help="with --root: run the server on the CPU anyway")
    d = SoakConfig()
    ap.add_argument("--prompts", type=int, help=f"jobs of the mixed phase (default {d.prompts} on the CPU, 200 on a GPU; short 80)")
    ap.add_argument("--clients", type=int, help=f"clients at once (default {d.clients})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the plan")
    ap.add_argument("--min-side", type=int, help="smallest image side (CPU default 32, GPU 256)")
    ap.add_argument("--max-side", type=int, help="largest image side (CPU default 128, GPU 1024)")
    ap.add_argument("--steps", type=int, help="sampler steps (default 8)")
    ap.add_argument("--dtype", help="loader dtype (CPU default fp32, GPU bf16)")
    ap.add_argument("--compile", help="loader compile setting (default auto: on for CUDA)")
    ap.add_argument("--interrupts", type=int)
    ap.add_argument("--unloads", type=int)
    ap.add_argument("--min-switches", type=int)
    ap.add_argument("--deadline", type=float, help="seconds for the mixed phase")
    ap.add_argument("--reference-order", choices=("shuffled", "soak"))
    ap.add_argument("--server-threads", type=int,
                    help="OMP/MKL threads of the server processes (default: 1 on the CPU, where the tiny model gains "
                         "nothing from more and a busy machine makes OpenMP threads spin; torch's default on a GPU)")
    ap.add_argument("--kill-after", type=int, default=0,
                    help="self-check of the death handling: SIGKILL the server after N jobs (the run then fails)")
    ap.add_argument("--workdir", type=Path, help="keep the servers' folders here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    return ap


def config_from_args(args, gpu: bool) -> SoakConfig:
    base = SoakConfig.short() if args.short else SoakConfig()
    if gpu:
        # True size: sides 256..1024, bf16, compile "on" (every image from the compiled code: with "auto" the
        # images made while it compiles come from the eager code, a few levels apart, and the soak compares bytes;
        # both servers share ComfyUI's user folder, so the reference server runs the same saved kernels);
        # 200 prompts; /free with unload_models makes the next prompt load and compile again, so 2 of those.
        # Victims need no extra steps (a step is ~0.1 s).
        base = dataclasses.replace(base, min_side=256, max_side=1024, dtype="bf16", victim_steps=8, compile="on",
                                   prompt_timeout_s=900, unloads=min(base.unloads, 2),
                                   prompts=base.prompts if args.short else 200)
    overrides = {"prompts": args.prompts, "clients": args.clients, "min_side": args.min_side,
                 "max_side": args.max_side, "steps": args.steps, "dtype": args.dtype, "compile": args.compile,
                 "interrupts": args.interrupts, "unloads": args.unloads, "min_switches": args.min_switches,
                 "deadline_s": args.deadline, "reference_order": args.reference_order,
                 "server_threads": args.server_threads if args.server_threads is not None else (0 if gpu else 1)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, seed=args.seed, kill_after=args.kill_after, **overrides)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    gpu = bool(args.root) and not args.cpu and torch.cuda.is_available()
    if args.root and not args.cpu and not gpu:
        print("[soak] no CUDA GPU here: running the --root model on the CPU", file=sys.stderr)
    cfg = config_from_args(args, gpu)
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="zimage_soak_")
        workdir = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        setup = tiny_setup(workdir) if args.tiny else root_setup(args.root, workdir)
        print(f"[soak] model ready in {time.perf_counter() - t0:.1f} s: {setup.note}; LoRAs: {', '.join(setup.loras)}")
        result = run_soak(cfg, setup, workdir, cpu=not gpu)
    except (SoakSetupError, ComfyError, OSError) as exc:
        print(f"[soak] could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    paths = write_outputs(result, args.out)
    print(render_markdown(result).split("## Invalid prompts")[0])
    for kind, path in paths.items():
        print(f"[soak] {kind}: {path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
