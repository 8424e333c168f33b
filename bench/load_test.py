"""Load test for a ComfyUI server running the Z-Image-Turbo nodes, through ComfyUI's own API.

For each concurrency level it keeps exactly `level` prompts in flight (POST /prompt), follows them on one
websocket per level (one client id), and reports images/s, end-to-end latency (queue -> execution_success),
time to the first `progress` message, the error rate, and peak memory, device and dtype from the
ZImageTurboProbe node. ComfyUI executes one prompt at a time, so higher levels measure queueing: throughput
should stay flat while latency grows with the level.

    # against a running server (the main mode), real weights on a GPU:
    .venv/bin/python -m bench.load_test --port 8188 --levels 1,2,4 --requests 8 --model-note "real weights"
    # an exported API-format workflow instead of the built-in graph:
    .venv/bin/python -m bench.load_test --workflow my_workflow_api.json --levels 1,2,4
    # a throw-away local server with the tiny random-weight model (tests / smoke runs only):
    .venv/bin/python -m bench.load_test --start-tiny-server --width 64 --height 64

Writes <stem>.md, <stem>.json (every raw per-request timing) and <stem>.png to bench/results/load/ (--out).
The client needs websocket-client and matplotlib only; nothing in it is specific to CPU or GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import itertools
import json
import math
import os
import queue
import random
import re
import socket
import statistics
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from devtools import graphs
from scripts.comfy_client import ComfyClient, ComfyError, ComfyServer, PromptResult, follow

REPO = Path(__file__).resolve().parent.parent

LOADER, SAMPLER, PROBE = graphs.LOADER_CLASS, graphs.SAMPLER_CLASS, graphs.PROBE_CLASS
RESULTS_DIR = REPO / "bench" / "results" / "load"
TINY_MODEL_NOTE = ("TINY random-weight model (real Z-Image classes, small sizes, random weights): images are noise "
                   "and timings are not Z-Image-Turbo performance")
GIB, MIB = 1024**3, 1024**2


class LoadTestError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------- workflow

def default_graph(model: str = graphs.MODEL, text_encoder: str = graphs.TEXT_ENCODER, vae: str = graphs.VAE,
                  width: int = 1024, height: int = 1024, steps: int = 8, dtype: str = "auto", device: str = "auto",
                  memory: str = "resident", prompt: str = graphs.DEFAULT_PROMPT, batch_size: int = 1,
                  loader_inputs: dict | None = None) -> dict:
    """The pack's graph (devtools.graphs.api_graph) with no LoRA on; seed and prompt are set per request.

    loader_inputs: further loader inputs (e.g. {"compile": "off"}); inputs left out get the server's defaults."""
    return graphs.api_graph(model=model, text_encoder=text_encoder, vae=vae, width=width, height=height, steps=steps,
                            dtype=dtype, device=device, memory=memory, compile=None, loader_inputs=loader_inputs,
                            prompt=prompt, batch_size=batch_size, prefix="load_test")


@dataclass
class Workflow:
    graph: dict
    source: str  # "built-in" or the file it came from
    sampler_ids: list[str]
    probe_id: str | None

    @classmethod
    def from_graph(cls, graph: dict, source: str = "built-in") -> Workflow:
        samplers = sorted(nid for nid, node in graph.items() if node.get("class_type") == SAMPLER)
        probes = sorted(nid for nid, node in graph.items() if node.get("class_type") == PROBE)
        if not samplers:
            raise LoadTestError(f"{source}: no {SAMPLER} node; the load test varies its seed and prompt.")
        for nid in samplers:
            for name in ("seed", "prompt"):
                if isinstance(graph[nid]["inputs"].get(name), list):
                    raise LoadTestError(f"{source}: the {name} of sampler node {nid} is linked from another node; "
                                        "give it a literal value so each request can get its own.")
        return cls(graph, source, samplers, probes[0] if probes else None)

    @property
    def base_prompt(self) -> str:
        return self.graph[self.sampler_ids[0]]["inputs"].get("prompt", "")

    @property
    def images_per_prompt(self) -> int:
        sizes = (self.graph[nid]["inputs"].get("batch_size", 1) for nid in self.sampler_ids)
        return sum(size if isinstance(size, int) else 1 for size in sizes)  # a linked batch size: assume 1

    def model_files(self) -> list[dict]:
        """Each loader node's literal inputs: the files ComfyUI is asked to load (names only: they cannot tell
        real weights from test weights) and the dtype / device / memory settings."""
        return [{"node": nid, **{k: v for k, v in node["inputs"].items() if not isinstance(v, list)}}
                for nid, node in sorted(self.graph.items()) if node.get("class_type") == LOADER]

    def sampler_settings(self) -> dict:
        inputs = self.graph[self.sampler_ids[0]]["inputs"]
        return {k: inputs.get(k) for k in ("width", "height", "steps", "cfg", "batch_size")}

    def variant(self, seed: int, prompt: str) -> dict:
        graph = copy.deepcopy(self.graph)
        for nid in self.sampler_ids:
            graph[nid]["inputs"]["seed"] = seed
            graph[nid]["inputs"]["prompt"] = prompt
        return graph


def fill_server_defaults(graph: dict, client: ComfyClient) -> dict:
    """Give every node the required inputs it lacks, with the server's defaults (GET /object_info/<class>).

    Keeps the built-in graph valid when a node gains an input. Returns what was filled, {node: {input: value}},
    so the report can say so; inputs the graph sets are never changed."""
    filled: dict = {}
    specs: dict = {}
    for nid, node in sorted(graph.items()):
        cls = node.get("class_type")
        if cls not in specs:
            specs[cls] = (client.get(f"/object_info/{cls}")[1] or {}).get(cls, {}).get("input", {}).get("required", {})
        for name, spec in specs[cls].items():
            if name in node["inputs"] or len(spec) < 2 or not isinstance(spec[1], dict):
                continue
            if "default" in spec[1]:
                value = spec[1]["default"]
            elif isinstance(spec[0], list) and spec[0]:  # a combo without a default: ComfyUI's first choice
                value = spec[0][0]
            else:
                continue
            node["inputs"][name] = value
            filled.setdefault(nid, {})[name] = value
    return filled


def load_workflow(path: str | Path) -> Workflow:
    """An API-format workflow file (ComfyUI: Workflow -> Export (API))."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # the body of a POST /prompt
    if not isinstance(data, dict) or "nodes" in data and "links" in data:
        raise LoadTestError(f"{path}: this is the UI format; export the workflow with Workflow -> Export (API).")
    return Workflow.from_graph(data, str(path))


# ------------------------------------------------------------------------------------------ measurement

@dataclass
class RequestRecord:
    """One queued prompt. Times are seconds since it was queued, except queued_at_s (since its level began)."""
    level: int  # 0 = warm-up
    index: int
    seed: int
    prompt: str
    status: str = "pending"  # success | error | rejected | interrupted | timeout | disconnected
    error: str | None = None
    prompt_id: str | None = None
    in_flight_when_queued: int = 0  # outstanding prompts of this client, this one included
    queued_at_s: float = 0.0
    accepted_s: float | None = None  # POST /prompt answered
    started_s: float | None = None  # execution_start
    first_progress_s: float | None = None
    latency_s: float | None = None  # execution_success (or the error / interruption)
    cached_nodes: list = field(default_factory=list)
    images: int = 0
    probe: dict = field(default_factory=dict)

    @property
    def execution_s(self) -> float | None:
        if self.latency_s is None or self.started_s is None:
            return None
        return self.latency_s - self.started_s


class _Listener(threading.Thread):
    """Reads one websocket and stamps each message on arrival, so that time spent posting prompts on the
    main thread does not shift the measured latencies."""

    def __init__(self, ws):
        super().__init__(daemon=True)
        self.ws = ws
        self.events: queue.Queue = queue.Queue()
        self.stopping = threading.Event()

    def run(self):
        import websocket

        while not self.stopping.is_set():
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception as exc:  # the server went away: tell the main thread instead of dying silently
                if not self.stopping.is_set():
                    self.events.put((time.perf_counter(), {"type": "_closed", "data": {"reason": repr(exc)}}))
                return
            if isinstance(raw, str):  # binary frames are previews
                self.events.put((time.perf_counter(), json.loads(raw)))


def _end_text(res: PromptResult) -> str | None:
    """The error of an ended prompt as one line; None for a success."""
    data = res.messages[-1].get("data") or {}
    if res.status == "error":
        return (f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_type')}: "
                f"{data.get('exception_message', '').strip()}")
    if res.status == "interrupted":
        return f"interrupted in node {data.get('node_id')}"
    return None


def _rejection_text(status: int, body) -> str:
    if status == 0:  # no HTTP answer at all
        return str(body)
    if isinstance(body, dict):
        err = body.get("error") or {}
        text = f"HTTP {status}: {err.get('message', '')} {err.get('details', '')}".strip()
        for nid, node in (body.get("node_errors") or {}).items():
            for e in node.get("errors", []):
                text += f"; node {nid} ({node.get('class_type')}): {e.get('message')}: {e.get('details')}"
        return text
    return f"HTTP {status}: {body!r}"[:2000]


def _probe_summary(history: dict | None, probe_id: str | None) -> dict:
    """The figures of the probe node's output that the report uses (the full dict stays on the server)."""
    if not history or probe_id is None:
        return {}
    found = (history.get("outputs", {}).get(probe_id) or {}).get("zimage_probe") or []
    if not found:
        return {}
    p = found[0]
    torch_mem = p.get("torch_memory") or {}
    nvml = next((n for n in (p.get("nvml_during"), p.get("nvml_after")) if (n or {}).get("available")), {})
    keep = ("device_name", "dtype", "source", "memory_mode", "width", "height", "steps", "total_s", "denoise_s",
            "mean_step_s", "load_total_s", "text_encode_s", "vae_decode_s", "embedding_cache_hit", "base_reloaded",
            "process_rss_bytes")
    return {**{k: p.get(k) for k in keep},
            "torch_peak_allocated_bytes": torch_mem.get("peak_allocated_bytes"),
            "torch_peak_reserved_bytes": torch_mem.get("peak_reserved_bytes"),
            "nvml_used_bytes": nvml.get("used_bytes"), "nvml_gpu_name": nvml.get("name")}


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def _fetch_history(client: ComfyClient, prompt_id: str) -> dict | None:
    for _ in range(100):  # the history entry is written just after execution_success is sent
        found = client.history(prompt_id)
        if found:
            return found
        time.sleep(0.05)
    return None


def _wait_until_idle(client: ComfyClient, timeout_s: float = 30) -> bool:
    """True once the server has nothing running or pending (another client's work would skew a level)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = client.get("/queue")
        if status == 200 and not body.get("queue_running") and not body.get("queue_pending"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _cancel(client: ComfyClient, prompt_ids: list[str]) -> None:
    """Remove timed-out prompts from the server so they do not run into the next level."""
    client.post("/queue", {"delete": prompt_ids})
    for pid in prompt_ids:
        client.post("/interrupt", {"prompt_id": pid})


def run_level(client: ComfyClient, workflow: Workflow, level: int, records: list[RequestRecord],
              timeout_s: float = 600) -> float:
    """Queue `records` keeping `level` in flight; fill in their timings. Returns the level's wall time:
    first POST to last completion."""
    import websocket  # websocket-client

    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"{client.ws_url}?clientId={client_id}", timeout=30)
    ws.settimeout(0.5)  # short reads, so the listener notices when it is told to stop
    listener = _Listener(ws)
    listener.start()
    todo, in_flight, queued_at, followed = deque(records), {}, {}, {}
    t_level = time.perf_counter()
    t_last_done = t_level

    def finish(rec: RequestRecord, status: str, t: float, error: str | None = None) -> None:
        nonlocal t_last_done
        res = followed[rec.prompt_id]
        rec.status, rec.error = status, error
        rec.started_s, rec.first_progress_s, rec.cached_nodes = res.started_s, res.first_progress_s, res.cached_nodes()
        rec.latency_s = t - queued_at[rec.prompt_id]
        t_last_done = max(t_last_done, t)
        in_flight.pop(rec.prompt_id, None)

    try:
        while todo or in_flight:
            while todo and len(in_flight) < level:
                rec = todo.popleft()
                rec.in_flight_when_queued = len(in_flight) + 1
                graph = workflow.variant(rec.seed, rec.prompt)
                t_queue = time.perf_counter()
                rec.queued_at_s = t_queue - t_level
                try:
                    status, body = client.queue(graph, client_id)
                except OSError as exc:
                    status, body = 0, f"POST /prompt failed: {exc!r}"
                rec.accepted_s = time.perf_counter() - t_queue
                if status == 200 and isinstance(body, dict) and "prompt_id" in body:
                    rec.prompt_id = body["prompt_id"]
                    queued_at[rec.prompt_id] = t_queue
                    in_flight[rec.prompt_id] = rec
                    followed[rec.prompt_id] = PromptResult(rec.prompt_id, "pending")
                else:
                    rec.status, rec.error = "rejected", _rejection_text(status, body)
                    t_last_done = max(t_last_done, time.perf_counter())
            try:
                t, msg = listener.events.get(timeout=0.5)
            except queue.Empty:
                t, msg = None, {}
            kind, data = msg.get("type"), msg.get("data") or {}
            if kind == "_closed":
                for rec in list(in_flight.values()):
                    finish(rec, "disconnected", t, f"websocket closed: {data['reason']}")
                for rec in todo:
                    rec.status, rec.error = "disconnected", "not queued: the websocket closed earlier"
                break
            pid = data.get("prompt_id")
            if pid in in_flight and follow(followed[pid], msg, queued_at[pid], now=t):
                finish(in_flight[pid], followed[pid].status, t, _end_text(followed[pid]))
            now = time.perf_counter()
            overdue = [r for pid, r in in_flight.items() if now - queued_at[pid] > timeout_s]
            for r in overdue:
                finish(r, "timeout", now, f"no result within {timeout_s:g} s")
            if overdue:
                _cancel(client, [r.prompt_id for r in overdue])
    finally:
        listener.stopping.set()
        listener.join(timeout=5)
        ws.close()
    for rec in records:
        if rec.status == "success":
            rec.probe = _probe_summary(_fetch_history(client, rec.prompt_id), workflow.probe_id)
            rec.images = workflow.images_per_prompt
    return t_last_done - t_level


def percentile(values: list[float], q: int) -> float | None:
    """The q-th percentile, interpolated between closest ranks (numpy's default)."""
    if not values:
        return None
    if len(values) == 1:  # statistics.quantiles needs two points
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def peak_memory(records: list[RequestRecord]) -> tuple[int | None, str]:
    """Max torch peak-allocated memory over the records; process RSS where torch has no device figures (CPU)."""
    torch_peaks = [r.probe["torch_peak_allocated_bytes"] for r in records if r.probe.get("torch_peak_allocated_bytes")]
    if torch_peaks:
        return max(torch_peaks), "torch_peak_allocated"
    rss = [r.probe["process_rss_bytes"] for r in records if r.probe.get("process_rss_bytes")]
    return (max(rss), "process_rss") if rss else (None, "unavailable")


def summarize_level(level: int, records: list[RequestRecord], wall_s: float, sampler_ids: list[str]) -> dict:
    ok = [r for r in records if r.status == "success"]
    latencies = [r.latency_s for r in ok]
    images = sum(r.images for r in ok)
    peak_bytes, peak_kind = peak_memory(ok)
    return {
        "level": level,
        "requests": len(records),
        "succeeded": len(ok),
        "failed": len(records) - len(ok),
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "wall_s": wall_s,
        "images": images,
        "images_per_s": images / wall_s if images and wall_s > 0 else 0.0,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_max_s": max(latencies) if latencies else None,
        "latency_mean_s": sum(latencies) / len(latencies) if latencies else None,
        "first_progress_p50_s": percentile([r.first_progress_s for r in ok if r.first_progress_s is not None], 50),
        "queue_wait_p50_s": percentile([r.started_s for r in ok if r.started_s is not None], 50),
        "execution_p50_s": percentile([r.execution_s for r in ok if r.execution_s is not None], 50),
        "max_in_flight": max((r.in_flight_when_queued for r in records), default=0),
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": peak_kind,
        # A sampler served from ComfyUI's cache or an embedding-cache hit would make a request look cheap.
        "result_cache_hits": sum(1 for r in ok if set(sampler_ids) & set(r.cached_nodes)),
        "embedding_cache_hits": sum(1 for r in ok if r.probe.get("embedding_cache_hit")),
    }


def run_load_test(client: ComfyClient, workflow: Workflow, levels: list[int], requests_per_level: int, *,
                  warmup: int = 1, base_seed: int | None = None, timeout_s: float = 600, model_note: str = "",
                  label: str = "", log=print) -> dict:
    """Warm up, run every level, and return the whole report as a JSON-ready dict."""
    if not client.alive():
        raise LoadTestError(f"no ComfyUI server answers at {client.base}")
    if not levels or min(levels) < 1 or requests_per_level < 1:
        raise LoadTestError("levels must be positive and requests per level at least 1")
    system = client.get("/system_stats")[1]
    workflow = dataclasses.replace(workflow, graph=copy.deepcopy(workflow.graph))  # the caller's graph stays as given
    defaults_filled = fill_server_defaults(workflow.graph, client)
    for nid, values in defaults_filled.items():
        log(f"[load] node {nid} does not set {', '.join(values)}: using the server's defaults {values}")
    run_tag = uuid.uuid4().hex[:8]
    base_seed = random.randrange(2**32) if base_seed is None else base_seed
    counter = itertools.count()
    started = dt.datetime.now().astimezone()
    load_avg_start = _load_average()

    def new_records(level: int, count: int) -> list[RequestRecord]:
        # A fresh seed and prompt text per request: ComfyUI caches node outputs by their inputs and the sampler
        # caches prompt embeddings by text; a cache hit would measure nothing.
        out = []
        for i in range(count):
            n = next(counter)
            out.append(RequestRecord(level, i, base_seed + n, f"{workflow.base_prompt} [load test {run_tag} #{n}]"))
        return out

    warnings: list[str] = []
    warm = new_records(0, warmup)
    if warm:
        log(f"[load] warm-up: {warmup} prompt(s), not counted")
        run_level(client, workflow, 1, warm, timeout_s)
        if not any(r.status == "success" for r in warm):
            raise LoadTestError("the warm-up failed: " + "; ".join(f"{r.status}: {r.error}" for r in warm))
        for r in warm:
            log(f"[load]   warm-up {r.status} in {r.latency_s or 0:.3f} s"
                + (f" (model load {r.probe.get('load_total_s', 0):.2f} s)" if r.probe else ""))

    summaries, all_records = [], list(warm)
    for level in levels:
        if not _wait_until_idle(client):
            warnings.append(f"level {level}: the server queue was still busy when the level started")
        records = new_records(level, requests_per_level)
        wall_s = run_level(client, workflow, level, records, timeout_s)
        summary = summarize_level(level, records, wall_s, workflow.sampler_ids)
        summaries.append(summary)
        all_records += records
        log(f"[load] concurrency {level}: {summary['succeeded']}/{summary['requests']} ok, "
            f"{summary['images_per_s']:.3f} images/s, latency p50 {_fmt_s(summary['latency_p50_s'])} "
            f"p95 {_fmt_s(summary['latency_p95_s'])} max {_fmt_s(summary['latency_max_s'])} s")
        if summary["result_cache_hits"] or summary["embedding_cache_hits"]:
            warnings.append(f"level {level}: {summary['result_cache_hits']} result cache hit(s), "
                            f"{summary['embedding_cache_hits']} embedding cache hit(s): those requests did less work")

    probed = [r.probe for r in all_records if r.probe]
    device_names = sorted({p["device_name"] for p in probed if p.get("device_name")})
    dtypes = sorted({p["dtype"] for p in probed if p.get("dtype")})
    if workflow.probe_id is None:
        warnings.append(f"the workflow has no {PROBE} node: no device, dtype or memory figures")
    device_name = ", ".join(device_names) or "unknown"
    return {
        "schema": 1,
        "tool": "bench/load_test.py",
        "date": started.isoformat(timespec="seconds"),
        "label": label,
        "model_note": model_note,
        "comfyui": {"url": client.base, "version": system.get("system", {}).get("comfyui_version"),
                    "devices": [d.get("name") for d in system.get("devices", [])]},
        "device_name": device_name,
        "dtype": ", ".join(dtypes) or "unknown",
        "is_cpu": bool(device_names) and all(name.startswith("cpu") for name in device_names),
        "model_files": workflow.model_files(),
        "model_sources": sorted({p["source"] for p in probed if p.get("source")}),
        "workflow": {"source": workflow.source, "sampler_nodes": workflow.sampler_ids, "probe_node": workflow.probe_id,
                     "settings": workflow.sampler_settings(), "graph": workflow.graph},
        "settings": {"levels": levels, "requests_per_level": requests_per_level, "warmup": warmup,
                     "base_seed": base_seed, "run_tag": run_tag, "timeout_s": timeout_s},
        "warmup": [asdict(r) for r in warm],
        "levels": summaries,
        "requests": [asdict(r) for r in all_records if r.level > 0],
        "warnings": warnings,
        "defaults_filled": defaults_filled,
        # Other work on this machine slows a server that runs here too (and the client's own timing).
        "client_machine": {"hostname": socket.gethostname(), "cpus": os.cpu_count(),
                           "load_avg_1m_start": load_avg_start, "load_avg_1m_end": _load_average()},
    }


# --------------------------------------------------------------------------------------------- reports

def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.0f} MiB"


MEMORY_KIND_TEXT = {
    "torch_peak_allocated": "peak VRAM (torch max allocated)",
    "process_rss": "server process RSS (no CUDA memory figures: CPU run)",
    "unavailable": "memory (no probe figures)",
}


def caveats(report: dict) -> list[str]:
    """What a reader must know before comparing these numbers with anything."""
    out = []
    if report["model_note"]:
        out.append(f"**Model:** {report['model_note']}.")
    else:
        out.append("**Model:** only the file names below are known (no --model-note given); the client cannot tell "
                   "real weights from test weights by name.")
    if report["is_cpu"]:
        out.append("**CPU run:** the server computed on the CPU; these figures say nothing about GPU performance.")
    machine = report["client_machine"]
    local = urllib.parse.urlsplit(report["comfyui"]["url"]).hostname in ("127.0.0.1", "localhost", "::1")
    load, cpus = machine["load_avg_1m_start"], machine["cpus"]
    if local and load and cpus and load > 0.75 * cpus:
        out.append(f"**Busy machine:** load average {load} on {cpus} CPUs before the run began; the local server "
                   "shared them with other work, so timings include that contention.")
    return out


def render_markdown(report: dict) -> str:
    wf = report["workflow"]["settings"]
    kinds = {lvl["peak_memory_kind"] for lvl in report["levels"]}
    memory_header = MEMORY_KIND_TEXT[kinds.pop()] if len(kinds) == 1 else "peak memory (see JSON)"
    lines = [f"# Z-Image-Turbo load test{' - ' + report['label'] if report['label'] else ''}", ""]
    lines += [f"> {c}" for c in caveats(report)] + [""]
    files = "; ".join(", ".join(f"{k}={f[k]}" for k in ("model", "text_encoder", "vae") if f.get(k))
                      for f in report["model_files"]) or "(no ZImageTurboLoader node)"
    loaders = "; ".join(", ".join(f"{k}={v}" for k, v in f.items() if k not in ("node", "model", "text_encoder", "vae"))
                        for f in report["model_files"]) or "-"
    lines += [
        f"- date: {report['date']}",
        f"- ComfyUI {report['comfyui']['version']} at {report['comfyui']['url']}",
        f"- device: {report['device_name']}, dtype {report['dtype']}",
        f"- model files: {files}",
        f"- loader settings: {loaders}",
        (f"- workflow: {report['workflow']['source']}; {wf['width']}x{wf['height']}, {wf['steps']} steps, "
         f"cfg {wf['cfg']}, batch {wf['batch_size']}"),
        (f"- {report['settings']['requests_per_level']} requests per concurrency level, each with its own seed and "
         "prompt text (no cache hits)"),
    ]
    machine = report["client_machine"]
    lines.append(f"- client machine {machine['hostname']}: 1-minute load average {machine['load_avg_1m_start']} at the "
                 f"start, {machine['load_avg_1m_end']} at the end (a server on the same machine shares its CPUs)")
    for r in report["warmup"]:
        load = f", model load {r['probe']['load_total_s']:.2f} s" if r["probe"].get("load_total_s") is not None else ""
        lines.append(f"- warm-up (not counted): {r['status']}, {_fmt_s(r['latency_s'])} s end to end{load}")
    lines += [
        "",
        ("| concurrency | requests | ok | errors | images/s | latency p50 (s) | p95 (s) | max (s) "
         f"| first progress p50 (s) | execution p50 (s) | {memory_header} |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lvl in report["levels"]:
        lines.append(
            f"| {lvl['level']} | {lvl['requests']} | {lvl['succeeded']} | {lvl['failed']} "
            f"({lvl['error_rate']:.0%}) | {lvl['images_per_s']:.3f} | {_fmt_s(lvl['latency_p50_s'])} "
            f"| {_fmt_s(lvl['latency_p95_s'])} | {_fmt_s(lvl['latency_max_s'])} "
            f"| {_fmt_s(lvl['first_progress_p50_s'])} | {_fmt_s(lvl['execution_p50_s'])} "
            f"| {_fmt_bytes(lvl['peak_memory_bytes'])} |")
    lines += [
        "",
        ("Latency is end to end: POST /prompt until execution_success on the websocket. Concurrency is the number "
         "of prompts kept in flight; ComfyUI runs one prompt at a time, so above 1 the extra latency is queueing. "
         "Execution is execution_start to execution_success; first progress counts from the POST. "
         f"p95 interpolates between the closest of {report['settings']['requests_per_level']} samples."),
    ]
    errors = [r for r in report["requests"] if r["status"] != "success"]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- concurrency {r['level']} #{r['index']}: {r['status']}: {r['error']}" for r in errors]
    if report["defaults_filled"]:
        lines += ["", "Inputs the workflow did not set, filled with the server's defaults: "
                  + "; ".join(f"node {nid}: {values}" for nid, values in report["defaults_filled"].items())]
    if report["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def render_plot(report: dict, path: Path) -> Path:
    """Throughput and p50/p95 latency against concurrency, as a 1200x580 PNG."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

    levels = [lvl["level"] for lvl in report["levels"]]
    wf = report["workflow"]["settings"]

    def series(key):
        return [math.nan if lvl[key] is None else lvl[key] for lvl in report["levels"]]

    fig = Figure(figsize=(12, 5.8), dpi=100)
    fig.text(0.015, 0.96, f"Z-Image-Turbo load test: {report['device_name']}, {report['dtype']}, "
                          f"{wf['width']}x{wf['height']}, {wf['steps']} steps  ({report['date']})", fontsize=13)
    caveat = " ".join(c.replace("**", "") for c in caveats(report))
    fig.text(0.015, 0.925, "\n".join(textwrap.wrap(caveat, 170)[:3]), fontsize=8, va="top",
             color="#c83c00" if report["is_cpu"] or report["model_note"] else "#5a5a5a")
    panels = fig.subplots(1, 2)
    x = range(len(levels))  # evenly spaced: levels are few and often 1, 2, 4
    panels[0].plot(x, series("images_per_s"), "o-", color="#2171b5", label="images/s")
    panels[1].plot(x, series("latency_p50_s"), "o-", color="#31a354", label="p50")
    panels[1].plot(x, series("latency_p95_s"), "o-", color="#e6550d", label="p95")
    for ax, title in zip(panels, ("Throughput (images / s)", "End-to-end latency (s)"), strict=True):
        ax.set_title(title, loc="left")
        ax.set_xticks(x, [str(level) for level in levels])
        ax.set_xlabel("concurrency (prompts in flight)")
        ax.margins(y=0.15)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", color="#e1e1e1")
        ax.legend(loc="best")
    fig.subplots_adjust(left=0.06, right=0.98, top=0.78, bottom=0.12, wspace=0.18)
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def default_stem(report: dict) -> str:
    when = dt.datetime.fromisoformat(report["date"]).strftime("%Y%m%d-%H%M%S")
    device = report["device_name"]
    inside = re.search(r"\((.*)\)", device)  # "cuda:0 (NVIDIA H100 80GB HBM3)" -> the card's name
    parts = [when, inside.group(1) if inside else device] + ([report["label"]] if report["label"] else [])
    return "load_" + "_".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)


def write_outputs(report: dict, out_dir: str | Path = RESULTS_DIR, stem: str | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or default_stem(report)
    paths = {"markdown": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png"}
    paths["markdown"].write_text(render_markdown(report))
    paths["json"].write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str))
    render_plot(report, paths["png"])
    return paths


# ------------------------------------------------------------------------------------------------- CLI

@contextlib.contextmanager
def tiny_server():
    """A throw-away local ComfyUI holding the tiny random-weight model under the real file names; yields its client."""
    import torch

    from devtools import install_tiny_models

    with tempfile.TemporaryDirectory(prefix="zimage_load_") as tmp:
        server = ComfyServer(Path(tmp) / "comfy", cpu=not torch.cuda.is_available())
        server.prepare()
        install_tiny_models.install(server.base_dir / "models")
        with server:
            yield server.client


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be integers separated by commas, not {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels must be 1 or more")
    return levels


def parse_pairs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise LoadTestError(f"--loader-input wants NAME=VALUE, not {pair!r}")
        out[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8188)
    ap.add_argument("--levels", type=parse_levels, default=[1, 2, 4], help="concurrency levels, e.g. 1,2,4")
    ap.add_argument("--requests", type=int, default=8, help="prompts per concurrency level")
    ap.add_argument("--warmup", type=int, default=1, help="prompts run first and not counted (model load)")
    ap.add_argument("--workflow", help="API-format workflow JSON (default: built-in Loader->LoRA Stack (empty)->"
                                       "Sampler->Probe->Save)")
    graph = ap.add_argument_group("built-in workflow")
    graph.add_argument("--model", default=graphs.MODEL)
    graph.add_argument("--text-encoder", default=graphs.TEXT_ENCODER)
    graph.add_argument("--vae", default=graphs.VAE)
    graph.add_argument("--dtype", default="auto")
    graph.add_argument("--device", default="auto")
    graph.add_argument("--memory", default="resident")
    graph.add_argument("--width", type=int, default=1024)
    graph.add_argument("--height", type=int, default=1024)
    graph.add_argument("--steps", type=int, default=8)
    graph.add_argument("--batch-size", type=int, default=1)
    graph.add_argument("--loader-input", action="append", default=[], metavar="NAME=VALUE",
                       help="another loader input, e.g. compile=off (repeatable); unset inputs get the server's "
                            "defaults")
    graph.add_argument("--prompt", default=graphs.DEFAULT_PROMPT, help="base prompt; each request appends its own tag")
    ap.add_argument("--seed", type=int, help="base seed (default: random); request n uses seed+n")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before a prompt counts as timed out")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="output folder")
    ap.add_argument("--label", default="", help="short label for the file names and the title, e.g. h100-real")
    ap.add_argument("--model-note", default="", help="what the weights are, stated in every output "
                                                      "(e.g. 'real Z-Image-Turbo bf16 weights')")
    ap.add_argument("--start-tiny-server", action="store_true",
                    help="start a throw-away local server with the tiny random-weight model (smoke tests only)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.ExitStack() as stack:
        model_note = args.model_note
        if args.start_tiny_server:
            print("[load] starting a local ComfyUI with the TINY random-weight model")
            client = stack.enter_context(tiny_server())
            model_note = model_note or TINY_MODEL_NOTE
        else:
            client = ComfyClient(args.host, args.port)
        try:
            workflow = load_workflow(args.workflow) if args.workflow else Workflow.from_graph(default_graph(
                args.model, args.text_encoder, args.vae, args.width, args.height, args.steps, args.dtype,
                args.device, args.memory, args.prompt, args.batch_size, parse_pairs(args.loader_input)))
            for files in workflow.model_files():
                print(f"[load] model files (loader node {files['node']}): model={files.get('model')}, "
                      f"text_encoder={files.get('text_encoder')}, vae={files.get('vae')}, dtype={files.get('dtype')}")
            print(f"[load] model note: {model_note or '(none given: pass --model-note to say what the weights are)'}")
            report = run_load_test(client, workflow, args.levels, args.requests, warmup=args.warmup,
                                   base_seed=args.seed, timeout_s=args.timeout, model_note=model_note,
                                   label=args.label or ("tiny" if args.start_tiny_server else ""))
        except (LoadTestError, ComfyError, OSError) as exc:
            print(f"[load] FAILED: {exc}", file=sys.stderr)
            return 2
    print(f"[load] model source reported by the probe: {', '.join(report['model_sources']) or 'unknown'}")
    print()
    print(render_markdown(report))
    paths = write_outputs(report, args.out)
    for kind, path in paths.items():
        print(f"[load] {kind}: {path}")
    failed = sum(lvl["failed"] for lvl in report["levels"])
    if failed:
        print(f"[load] {failed} request(s) failed: see the Errors section", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
