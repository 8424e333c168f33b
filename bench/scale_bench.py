"""Scale-out benchmark: images/s and latency through the Ray Serve front door with 1 replica vs 2 (one per GPU),
next to one plain ComfyUI server, with the saved style workflows (workflows/api/*.json).

Every request goes through ComfyUI's own API (POST /prompt, the websocket until execution_success, GET /history),
so the plain server and the front door are measured the same way. Each request takes the next style workflow in
turn with its own seed and prompt text (no cache hits). Sections, in order (--sections picks some):

  plain    one plain ComfyUI server (this pack, the model preloaded and warm), concurrency 1: the p50 that the
           front door with one replica should stay within 50 ms of
  1, 2 ... Serve with that many replicas (one GPU each), least-loaded routing, concurrency 1/2/4/8 (--levels)
  routing  with the most replicas: least-loaded vs LoRA-affinity routing on a random mix of the styles, same
           sequence for both (is sending a LoRA set to the replica that ran it last worth it?)

    # GPU machine (bench/gpu_run.sh scale:ARGS does the set-up; true-size random weights from bench/build_model.py):
    python3 -m bench.scale_bench --root /tmp/zfull --out $OUT
    # CPU smoke run on the tiny model (numbers are a hint only: a 2-core CPU, noise images):
    .venv/bin/python -m bench.scale_bench --tiny

Writes <out>/<date>-<device>-scale.json and .md after every section (a run cut off keeps what it measured); the
JSON has, per run, `replicas`, `images_per_s`, `p50_s`, `p95_s` per concurrency and `lost`, and at the top
`speedup_vs_one` per concurrency. --merge adds the sections of an earlier JSON (a run split over two calls).
bench/capacity_sim.py reads that JSON.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

from scripts.comfy_client import ComfyClient, free_port

REPO = Path(__file__).resolve().parent.parent
COMFY_DIR = REPO / ".build" / "ComfyUI"
RESULTS_DIR = REPO / "bench" / "results"
WORKFLOWS = REPO / "workflows" / "api"
MODEL_FILES = {"diffusion_models": "z_image_turbo_bf16.safetensors", "text_encoders": "qwen_3_4b.safetensors",
               "vae": "ae.safetensors"}
SAMPLER, STACK, LOADER, PROBE = "ZImageTurboSampler", "ZImageTurboLoraStack", "ZImageTurboLoader", "ZImageTurboProbe"
TARGET_SPEEDUP, TARGET_P50_MS = 1.9, 50.0


class ScaleBenchError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ workflows and model

def style_workflows(size: int | None = None) -> list[tuple[str, dict]]:
    """(name, API graph) of each saved style workflow; `size` overrides width and height (the tiny model's runs)."""
    out = []
    for path in sorted(WORKFLOWS.glob("*.json")):
        graph = json.loads(path.read_text())
        samplers = [n for n in graph.values() if n.get("class_type") == SAMPLER]
        if not samplers:
            continue
        for node in samplers:
            if size:
                node["inputs"]["width"] = node["inputs"]["height"] = size
        out.append((path.stem, graph))
    if not out:
        raise ScaleBenchError(f"no style workflow with a {SAMPLER} in {WORKFLOWS}")
    return out


def lora_names(styles) -> list[str]:
    names = set()
    for _, graph in styles:
        for node in graph.values():
            if node.get("class_type") == STACK:
                names |= {row["lora"] for row in json.loads(node["inputs"]["loras"])}
    return sorted(names)


def preload_of(styles) -> dict:
    """The loader settings the style workflows use: what each server preloads, so no prompt loads anything."""
    loaders = [{k: v for k, v in n["inputs"].items() if not isinstance(v, list)}
               for _, g in styles for n in g.values() if n.get("class_type") == LOADER]
    keys = ("model", "text_encoder", "vae", "dtype", "device", "memory", "compile")
    first = {k: loaders[0][k] for k in keys if k in loaders[0]}
    if any({k: l.get(k) for k in first} != first for l in loaders):
        raise ScaleBenchError("the style workflows use different loader settings; one preload cannot serve them all")
    return first


def prepare_base(base: Path, styles, root: Path | None, tiny: bool) -> str:
    """A ComfyUI --base-directory: the model files under the real names (links to --root, or the tiny model), a
    distinct LoRA file under each name the workflows use, this pack in custom_nodes. Returns a note on the model."""
    models = base / "models"
    for sub in ("custom_nodes", "user", "input", *(f"models/{d}" for d in (*MODEL_FILES, "loras"))):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "comfyui-zimage-turbo"
    if not link.is_symlink():
        link.symlink_to(REPO, target_is_directory=True)
    import torch

    from devtools import model_builder

    if tiny:
        built = model_builder.build_random_model(base / "tiny", "zit_tiny", model_builder.TINY, seed=0)
        sources = {"diffusion_models": built.transformer_file, "text_encoders": built.text_encoder_file,
                   "vae": built.vae_file}
        sizes, dtype, device, scale, rank = model_builder.TINY, torch.float32, "cpu", 0.5, 4
        note = "TINY random-weight model (real Z-Image classes, small sizes): images are noise, timings a hint only"
    else:
        if root is None or not (root / "manifest.json").is_file():
            raise ScaleBenchError(f"{root}/manifest.json not found: build the model first (python3 -m "
                                  "bench.build_model --root DIR), or give --tiny")
        sources = {sub: root / sub / name for sub, name in MODEL_FILES.items()}
        sizes, dtype, scale, rank = model_builder.FULL, torch.bfloat16, 0.02, 32
        device = "cuda" if torch.cuda.is_available() else "cpu"
        note = "true-size Z-Image-Turbo with RANDOM weights (bench/build_model.py): latency and memory are real"
    for sub, name in MODEL_FILES.items():
        dest = models / sub / name
        if not dest.exists():
            dest.symlink_to(Path(sources[sub]).resolve())
    # One distinct file per style LoRA name: the same file under two names would make a "switch" free.
    for i, name in enumerate(lora_names(styles)):
        dest = models / "loras" / name
        if not dest.exists():
            model_builder.build_random_lora(dest, sizes.transformer, "diffusers", rank=rank, seed=300 + i,
                                            refiners=True, scale=scale, dtype=dtype, device=device)
    return note


def variant(graph: dict, seed: int, tag: str) -> dict:
    """The workflow with its own seed and prompt text: ComfyUI's cache and the embedding cache never answer."""
    g = copy.deepcopy(graph)
    for node in g.values():
        if node.get("class_type") == SAMPLER:
            node["inputs"]["seed"] = seed
            node["inputs"]["prompt"] = f"{node['inputs']['prompt']} [{tag}]"
    return g


# ------------------------------------------------------------------------------------------------- measuring

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run_requests(client: ComfyClient, requests: list[tuple[str, dict]], concurrency: int,
                 timeout_s: float = 900) -> dict:
    """Closed loop: `concurrency` clients (one websocket each), each sends its next request when its last one ended.
    Returns the level's summary with every request's record."""
    todo = list(enumerate(requests))
    lock = threading.Lock()
    records: list[dict] = []

    def worker():
        session = client.session(connect_timeout=60)
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    i, (style, graph) = todo.pop(0)
                if session.closed:  # the last request broke the connection: a new one
                    session = client.session(connect_timeout=60)
                t = time.perf_counter()
                res = session.run(graph, timeout=timeout_s)
                rec = {"index": i, "style": style, "status": res.status, "latency_s": res.seconds,
                       "started_s": res.started_s, "first_progress_s": res.first_progress_s,
                       "t_start": t, "t_end": t + res.seconds, "error": _error_text(res)}
                hist = res.history or {}
                serve_info = hist.get("zimage_serve") or {}
                rec["replica"], rec["attempts"] = serve_info.get("replica"), serve_info.get("attempts")
                probe = next((o["zimage_probe"][0] for o in (hist.get("outputs") or {}).values()
                              if isinstance(o, dict) and o.get("zimage_probe")), {})
                rec.update({k: probe.get(k) for k in ("total_s", "lora_s", "lora_changed", "denoise_s", "device_name",
                                                      "compile_path", "lora_path")})
                with lock:
                    records.append(rec)
        finally:
            session.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    records.sort(key=lambda r: r["index"])
    ok = [r for r in records if r["status"] == "success"]
    wall = (max(r["t_end"] for r in records) - t0) if records else 0.0
    lat = [r["latency_s"] for r in ok]
    for r in records:
        r["t_start"], r["t_end"] = round(r["t_start"] - t0, 4), round(r["t_end"] - t0, 4)
    return {"concurrency": concurrency, "requests": len(records), "succeeded": len(ok), "lost": len(records) - len(ok),
            "wall_s": wall, "images_per_s": len(ok) / wall if wall > 0 else 0.0,
            "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "max_s": max(lat) if lat else None,
            "mean_s": statistics.fmean(lat) if lat else None,
            "server_total_p50_s": percentile([r["total_s"] for r in ok if r.get("total_s")], 50),
            "replicas_used": len({r["replica"] for r in ok if r.get("replica")}),
            "retried": sum(1 for r in ok if (r.get("attempts") or 1) > 1),
            "lora_switches": lora_switches(records), "records": records}


def _error_text(res) -> str | None:
    if res.status == "success":
        return None
    err = res.error or {}
    return str(err.get("exception_message") or err.get("body") or err.get("reason") or err)[:500]


def lora_switches(records: list[dict]) -> dict:
    """How often a replica ran another style than its previous prompt (what LoRA-affinity routing tries to avoid),
    and the LoRA-apply seconds the probe reported for those prompts."""
    by_replica = defaultdict(list)
    for r in sorted(records, key=lambda r: r["t_start"]):
        if r["status"] == "success":
            by_replica[r.get("replica") or "plain"].append(r)
    switches, apply_s = 0, []
    for runs in by_replica.values():
        for prev, cur in zip(runs, runs[1:]):
            if cur["style"] != prev["style"]:
                switches += 1
                if cur.get("lora_s") is not None:
                    apply_s.append(cur["lora_s"])
    return {"switches": switches, "prompts": sum(len(v) for v in by_replica.values()),
            "lora_apply_p50_s_on_switch": percentile(apply_s, 50)}


def requests_for(styles, count: int, seed0: int, tag: str, order: str = "rotate", rng_seed: int = 0):
    rng = random.Random(rng_seed)
    out = []
    for i in range(count):
        name, graph = styles[i % len(styles)] if order == "rotate" else rng.choice(styles)
        out.append((name, variant(graph, seed0 + i, f"{tag} #{i}")))
    return out


# ------------------------------------------------------------------------------------------------- the runs

class Bench:
    def __init__(self, args, styles, base: Path, work: Path, note: str):
        self.args, self.styles, self.base, self.work = args, styles, base, work
        self.t0 = time.monotonic()
        self.preload = json.dumps(preload_of(styles))
        self.seed = random.randrange(1 << 30)
        self.tag = uuid.uuid4().hex[:6]
        self.r = {"schema": 1, "tool": "bench/scale_bench.py", "date": dt.datetime.now().astimezone().isoformat(
                  timespec="seconds"), "device": None, "model_note": note,
                  "workflows": [name for name, _ in styles], "preload": json.loads(self.preload),
                  "settings": {"levels": args.levels, "requests": args.requests, "replicas": args.replicas,
                               "max_ongoing": args.max_ongoing, "routing_concurrency": args.routing_concurrency,
                               "cpu": args.tiny, "size_override": args.size},
                  "replicas": [], "plain_comfyui": None, "runs": [], "speedup_vs_one": {}, "routing": None,
                  "lost": 0, "warnings": [], "skipped": {}}
        if args.tiny:
            self.r["warnings"].append(
                "CPU: every replica's ComfyUI, the plain server and Ray's own processes share the same few cores that "
                "torch's threads use, so the speed-ups and the latency differences here say nothing about GPUs; "
                "only that every path works and nothing is lost")
        if args.merge:
            self.merge(json.loads(Path(args.merge).read_text()))

    def merge(self, old: dict) -> None:
        for key in ("plain_comfyui", "routing", "device"):
            if old.get(key) and not self.r.get(key):
                self.r[key] = old[key]
        self.r["runs"] += [run for run in old.get("runs", []) if run["replicas"] not in {x["replicas"] for x in self.r["runs"]}]
        self.r["merged_from"] = old.get("date")

    def left_s(self) -> float:
        return self.args.deadline - (time.monotonic() - self.t0) if self.args.deadline else float("inf")

    def log(self, text: str) -> None:
        print(f"[scale {time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def next_requests(self, count: int, order: str = "rotate", rng_seed: int = 0):
        reqs = requests_for(self.styles, count, self.seed, self.tag, order, rng_seed)
        self.seed += count
        return reqs

    def level_requests(self, level: int) -> int:
        return max(self.args.requests, 2 * level)

    # -- plain ComfyUI

    def run_plain(self) -> None:
        from zimage_turbo.serve.comfy_process import ComfyProcess, ComfySpec

        env = {} if self.args.tiny else {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
        proc = ComfyProcess(ComfySpec(comfy_dir=str(COMFY_DIR), work_dir=str(self.work / "plain"),
                                      base_directory=str(self.base), cpu=self.args.tiny, preload=self.preload,
                                      env=env, start_timeout_s=900))
        t = time.monotonic()
        proc.start()
        self.log(f"plain ComfyUI ready in {time.monotonic() - t:.1f} s (pid {proc.pid})")
        try:
            client = ComfyClient("127.0.0.1", proc.port)
            run_requests(client, self.next_requests(len(self.styles)), 1)  # each style once: not counted
            level = run_requests(client, self.next_requests(self.level_requests(1)), 1)
            self.note_device(level)
            self.r["plain_comfyui"] = {"ready_s": proc.ready_s, **summary(level), "levels": [level]}
            self.log(f"plain c=1: p50 {level['p50_s']:.3f} s, {level['images_per_s']:.3f} images/s")
        finally:
            proc.stop()

    # -- Serve

    def start_serve(self, replicas: int):
        from zimage_turbo.serve import app

        port = free_port()
        settings = app.ServeSettings(
            comfyui=str(COMFY_DIR), replicas=replicas, cpu=self.args.tiny, base_directory=str(self.base),
            work_dir=str(self.work / f"serve{replicas}"), preload=self.preload, port=port,
            max_ongoing_requests=self.args.max_ongoing, start_timeout_s=900)
        t = time.monotonic()
        app.start(settings)
        ready = time.monotonic() - t
        self.log(f"Serve with {replicas} replica(s) ready in {ready:.1f} s")
        return ComfyClient("127.0.0.1", port), ready

    def stop_serve(self) -> None:
        from ray import serve

        serve.shutdown()

    def run_replicas(self, replicas: int, levels: bool, routing: bool) -> None:
        client, ready = self.start_serve(replicas)
        try:
            run_requests(client, self.next_requests(2 * len(self.styles) * replicas), replicas)  # warm-up
            done = []
            for c in self.args.levels if levels else []:
                if self.left_s() < 30:
                    self.r["skipped"][f"{replicas} replicas, concurrency {c}"] = "deadline"
                    break
                level = run_requests(client, self.next_requests(self.level_requests(c)), c)
                self.note_device(level)
                done.append(level)
                self.log(f"{replicas} replica(s), c={c}: {level['images_per_s']:.3f} images/s, p50 "
                         f"{level['p50_s'] or 0:.3f} p95 {level['p95_s'] or 0:.3f} s, lost {level['lost']}, "
                         f"replicas used {level['replicas_used']}")
            if done:
                run = {"replicas": replicas, "route": "least_loaded", "start_s": ready, **summary_of_levels(done),
                       "levels": done}
                self.r["runs"] = sorted([x for x in self.r["runs"] if x["replicas"] != replicas] + [run],
                                        key=lambda x: x["replicas"])
                self.write()
            if routing:
                self.run_routing(client, replicas)
        finally:
            self.stop_serve()

    def run_routing(self, client: ComfyClient, replicas: int) -> None:
        """Least-loaded vs LoRA affinity on the same random mix of styles, at each --routing-concurrency (default:
        one prompt per replica, where affinity may pile prompts on one replica, and two, where every replica is full
        and only the choice among waiting prompts can change)."""
        out = {"replicas": replicas, "max_ongoing": self.args.max_ongoing, "levels": [],
               "workload": "each prompt a style drawn at random, the same sequence for both routes"}
        self.r["routing"] = out
        for c in self.args.routing_concurrency or [replicas, 2 * replicas]:
            n = max(self.args.requests * 2, 4 * c)
            row = {"concurrency": c, "requests": n}
            for route in ("least_loaded", "lora"):
                if self.left_s() < 30:
                    self.r["skipped"][f"routing c={c} {route}"] = "deadline"
                    break
                level = run_requests(RoutedClient(client, route), self.next_requests(n, order="random", rng_seed=c), c)
                row[route] = level
                self.log(f"routing c={c} {route}: {level['images_per_s']:.3f} images/s, p50 {level['p50_s'] or 0:.3f} s,"
                         f" switches {level['lora_switches']['switches']}/{level['lora_switches']['prompts']}")
            if "lora" in row and row["least_loaded"]["images_per_s"]:
                row["lora_vs_least_loaded"] = row["lora"]["images_per_s"] / row["least_loaded"]["images_per_s"]
            out["levels"].append(row)
            self.write()

    def note_device(self, level: dict) -> None:
        names = {r.get("device_name") for r in level["records"] if r.get("device_name")}
        if names and not self.r["device"]:
            self.r["device"] = sorted(names)[0]

    # -- report

    def finish(self) -> None:
        runs = {run["replicas"]: run for run in self.r["runs"]}
        self.r["replicas"] = sorted(runs)
        self.r["lost"] = sum(run["lost"] for run in self.r["runs"]) + ((self.r["plain_comfyui"] or {}).get("lost") or 0)
        if 1 in runs:
            one = runs[1]["images_per_s"]
            for n, run in runs.items():
                run["speedup_vs_one"] = {c: (v / one[c] if one.get(c) else None) for c, v in run["images_per_s"].items()}
            top = max(runs)
            self.r["speedup_vs_one"] = runs[top]["speedup_vs_one"] if top > 1 else {}
        plain = self.r["plain_comfyui"]
        if plain and 1 in runs and runs[1]["p50_s"].get("1") is not None:
            self.r["p50_c1_vs_plain_ms"] = 1000 * (runs[1]["p50_s"]["1"] - plain["p50_s"]["1"])
        targets = {}
        if self.r["speedup_vs_one"]:
            best = max(v for v in self.r["speedup_vs_one"].values() if v is not None)
            targets["speedup_two_gpus"] = {"target": TARGET_SPEEDUP, "best": best, "met": best >= TARGET_SPEEDUP}
        if "p50_c1_vs_plain_ms" in self.r:
            targets["p50_c1_vs_plain_ms"] = {"target": TARGET_P50_MS, "measured": self.r["p50_c1_vs_plain_ms"],
                                             "met": self.r["p50_c1_vs_plain_ms"] <= TARGET_P50_MS}
        self.r["targets"] = targets

    def write(self) -> dict[str, Path]:
        self.finish()
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        device = "cpu-tiny" if self.args.tiny else slug(self.r["device"] or "gpu")
        stem = f"{self.r['date'][:10]}-{device}-scale"
        paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
        paths["json"].write_text(json.dumps(self.r, indent=1))
        paths["md"].write_text(render_markdown(self.r))
        return paths


class RoutedClient(ComfyClient):
    """A ComfyClient whose prompts ask the front door for one route (extra_data.zimage_serve.route)."""

    def __init__(self, client: ComfyClient, route: str):
        host, port = client.base.rsplit("//", 1)[1].rsplit(":", 1)
        super().__init__(host, int(port))
        self.route = route

    def queue(self, prompt: dict, client_id: str):
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id,
                                     "extra_data": {"zimage_serve": {"route": self.route}}})


def summary(level: dict) -> dict:
    c = str(level["concurrency"])
    return {"images_per_s": {c: level["images_per_s"]}, "p50_s": {c: level["p50_s"]}, "p95_s": {c: level["p95_s"]},
            "lost": level["lost"]}


def summary_of_levels(levels: list[dict]) -> dict:
    return {"images_per_s": {str(lv["concurrency"]): lv["images_per_s"] for lv in levels},
            "p50_s": {str(lv["concurrency"]): lv["p50_s"] for lv in levels},
            "p95_s": {str(lv["concurrency"]): lv["p95_s"] for lv in levels},
            "lost": sum(lv["lost"] for lv in levels)}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _f(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(r: dict) -> str:
    lines = [f"# Scale-out benchmark, {r['date'][:10]}, {r['device'] or 'unknown device'}", "",
             f"Model: {r['model_note']}. Workflows: {', '.join(r['workflows'])} (each request the next one, its own "
             f"seed and prompt). Through ComfyUI's API (POST /prompt -> websocket execution_success). "
             f"Tool: `bench/scale_bench.py`.", ""]
    plain = r.get("plain_comfyui")
    if plain:
        lines += [f"One plain ComfyUI server, concurrency 1: p50 **{_f(plain['p50_s'].get('1'))} s**, "
                  f"p95 {_f(plain['p95_s'].get('1'))} s, {_f(plain['images_per_s'].get('1'))} images/s "
                  f"(ready {_f(plain.get('ready_s'), 1)} s after launch).", ""]
    if r["runs"]:
        levels = sorted({c for run in r["runs"] for c in run["images_per_s"]}, key=int)
        lines += ["| replicas | concurrency | images/s | p50 s | p95 s | speed-up vs 1 | lost |", "|---|---|---|---|---|---|---|"]
        for run in r["runs"]:
            for c in levels:
                if c in run["images_per_s"]:
                    lines.append(f"| {run['replicas']} | {c} | {_f(run['images_per_s'][c])} | {_f(run['p50_s'][c])} | "
                                 f"{_f(run['p95_s'][c])} | {_f((run.get('speedup_vs_one') or {}).get(c), 2)} | "
                                 f"{sum(lv['lost'] for lv in run['levels'] if str(lv['concurrency']) == c)} |")
        lines.append("")
    for key, t in (r.get("targets") or {}).items():
        if key == "speedup_two_gpus":
            lines.append(f"- images/s with {max(r['replicas'])} replicas vs 1: best **{t['best']:.2f}x** (target "
                         f"≥ {t['target']}x): {'met' if t['met'] else 'NOT met'}")
        else:
            lines.append(f"- p50 at concurrency 1, front door with 1 replica minus plain ComfyUI: **{t['measured']:+.0f} "
                         f"ms** (target ≤ {t['target']:.0f} ms): {'met' if t['met'] else 'NOT met'}")
    routing = r.get("routing")
    if routing and routing.get("levels"):
        lines += ["", f"Routing, {routing['replicas']} replicas (max_ongoing_requests {routing['max_ongoing']}): "
                      f"{routing['workload']}.", "",
                  "| concurrency | route | images/s | p50 s | p95 s | style switches / prompts | LoRA apply p50 on a switch |",
                  "|---|---|---|---|---|---|---|"]
        for row in routing["levels"]:
            for route in ("least_loaded", "lora"):
                if route in row:
                    x, sw = row[route], row[route]["lora_switches"]
                    lines.append(f"| {row['concurrency']} | {route} | {_f(x['images_per_s'])} | {_f(x['p50_s'])} | "
                                 f"{_f(x['p95_s'])} | {sw['switches']} / {sw['prompts']} | "
                                 f"{_f(sw['lora_apply_p50_s_on_switch'], 4)} s |")
        ratios = [f"c={row['concurrency']}: {row['lora_vs_least_loaded']:.3f}" for row in routing["levels"]
                  if row.get("lora_vs_least_loaded")]
        if ratios:
            lines.append(f"\nLoRA affinity / least loaded, images/s: **{', '.join(ratios)}**")
    lines += ["", f"Lost prompts (not completed): **{r['lost']}**."]
    for note in r.get("notes") or []:  # written by hand when a result joins several calls
        lines.append(f"- note: {note}")
    for w in r["warnings"]:
        lines.append(f"- warning: {w}")
    for what, why in r["skipped"].items():
        lines.append(f"- skipped: {what} ({why})")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- main

def parse_ints(text: str) -> list[int]:
    """1,2,4 or 1+2+4 (bench/gpu_run.sh turns commas into spaces)."""
    try:
        values = [int(x) for x in re.split(r"[,+]", text) if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected numbers of 1 or more")
    return values


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = ap.add_mutually_exclusive_group(required=True)
    model.add_argument("--root", type=Path, help="bench/build_model.py's folder (true-size random weights)")
    model.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (a smoke run)")
    ap.add_argument("--replicas", type=parse_ints, default=None, help="replica counts to run (default 1,2)")
    ap.add_argument("--levels", type=parse_ints, default=None, help="concurrency levels (default 1,2,4,8; tiny 1,2,4)")
    ap.add_argument("--requests", type=int, default=None, help="prompts per level at least (default 16; tiny 4)")
    ap.add_argument("--routing-concurrency", type=parse_ints, default=None,
                    help="concurrency levels of the routing section (default: replicas, 2x replicas)")
    ap.add_argument("--max-ongoing", type=int, default=2, help="prompts a replica holds (Serve's max_ongoing_requests)")
    ap.add_argument("--sections", default="plain,replicas,routing",
                    help="which of plain, replicas, routing to run (comma separated)")
    ap.add_argument("--size", type=int, default=None, help="override the workflows' width and height (tiny: 128)")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="folder for the .json and .md")
    ap.add_argument("--workdir", default=None, help="base and work folders (default: a new temporary folder)")
    ap.add_argument("--merge", help="an earlier result JSON whose sections are kept (a run split over two calls)")
    ap.add_argument("--deadline", type=float, default=540.0,
                    help="seconds after the start past which no new level starts (0: none)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.replicas = args.replicas or [1, 2]
    args.levels = args.levels or ([1, 2, 4] if args.tiny else [1, 2, 4, 8])
    args.requests = args.requests or (4 if args.tiny else 16)
    args.size = args.size or (128 if args.tiny else None)
    args.sections = {s.strip() for s in re.split(r"[,+]", args.sections) if s.strip()}  # + from gpu_run.sh
    unknown = args.sections - {"plain", "replicas", "routing"}
    if unknown:
        print(f"unknown section(s) {', '.join(sorted(unknown))}: use plain, replicas, routing", file=sys.stderr)
        return 2
    if not (COMFY_DIR / "main.py").is_file():
        print(f"ComfyUI is not in {COMFY_DIR}: run scripts/setup.sh (or bench/gpu_run.sh on a GPU machine)",
              file=sys.stderr)
        return 2
    styles = style_workflows(args.size)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="zimage_scale_"))
    base = work / "base"
    note = prepare_base(base, styles, args.root, args.tiny)
    bench = Bench(args, styles, base, work, note)
    import ray  # noqa: F401 - fail here, before any server starts, if ray[serve] is not installed

    from zimage_turbo.serve import app

    try:
        if "plain" in args.sections:
            bench.run_plain()
            bench.log(f"wrote {bench.write()['json']}")
        if "replicas" in args.sections or "routing" in args.sections:
            app.connect(log_to_driver=False, **({"num_cpus": os.cpu_count()} if args.tiny else {}))
            gpus = app.cluster_gpus()
            for n in args.replicas:
                if not args.tiny and n > gpus:
                    bench.r["skipped"][f"{n} replicas"] = f"only {gpus} GPU(s)"
                    continue
                if bench.left_s() < 60:
                    bench.r["skipped"][f"{n} replicas"] = "deadline"
                    continue
                bench.run_replicas(n, levels="replicas" in args.sections,
                                   routing="routing" in args.sections and n == max(args.replicas))
                bench.log(f"wrote {bench.write()['json']}")
    finally:
        paths = bench.write()
        print(render_markdown(bench.r))
        print(f"wrote {paths['json']} and {paths['md']}")
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
