"""Pure helpers of the front door and the replicas: no ray, no ComfyUI, no network.

- the shape of an API-format workflow (ComfyUI validates the rest and answers with its own errors);
- the key of a prompt's LoRA set (what LoRA-affinity routing compares);
- renaming the files a prompt wrote, so that files of different replicas (each numbers its own
  `ZImage_00001_.png`) never collide behind one /view;
- the probe reports among a prompt's outputs;
- removing server paths from what goes back to clients.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re

LORA_STACK = "ZImageTurboLoraStack"
PROBE_KEY = "zimage_probe"
# ComfyUI's own LoRA loaders: the inputs that decide what the weights become.
NATIVE_LORA_INPUTS = {"LoraLoader": ("lora_name", "strength_model", "strength_clip"),
                      "LoraLoaderModelOnly": ("lora_name", "strength_model")}
TERMINAL = frozenset({"execution_success", "execution_error", "execution_interrupted"})


class PromptShapeError(ValueError):
    """A request that is not an API-format workflow at all; `body()` is the HTTP 400 answer, in ComfyUI's form."""

    def __init__(self, message: str, details: str = "", kind: str = "invalid_prompt"):
        super().__init__(message)
        self.message, self.details, self.kind = message, details, kind

    def body(self) -> dict:
        return {"error": {"type": self.kind, "message": self.message, "details": self.details, "extra_info": {}},
                "node_errors": {}}


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def check_graph(graph) -> dict:
    """`graph` if it is shaped like an API-format workflow ({id: {"class_type": str, "inputs": {...}}}), else
    PromptShapeError saying what it is instead. Which classes and inputs are valid is ComfyUI's to say."""
    export_hint = "export it from ComfyUI with Workflow -> Export (API)"
    if not isinstance(graph, dict):
        raise PromptShapeError("the prompt must be an API-format workflow",
                               f"expected a JSON object of nodes {{id: {{class_type, inputs}}}}, got {_kind(graph)}; "
                               f"{export_hint}")
    if "nodes" in graph and "links" in graph:
        raise PromptShapeError("this is a UI-format workflow, not the API format", export_hint)
    if not graph:
        raise PromptShapeError("the prompt has no nodes", export_hint)
    for nid, node in graph.items():
        if not isinstance(node, dict):
            raise PromptShapeError(f"node {nid!r} must be an object with class_type and inputs, not {_kind(node)}",
                                   export_hint)
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise PromptShapeError(f"node {nid!r} has no class_type", export_hint)
        if not isinstance(node.get("inputs", {}), dict):
            raise PromptShapeError(f"node {nid!r}: inputs must be an object, not {_kind(node['inputs'])}", export_hint)
    return graph


def parse_prompt_request(body) -> tuple[dict, dict, str | None]:
    """(graph, extra_data, client_id) of a POST /prompt body, as ComfyUI reads it; PromptShapeError otherwise."""
    if not isinstance(body, dict):
        raise PromptShapeError("the request body must be a JSON object", f"got {_kind(body)}")
    if "prompt" not in body:
        raise PromptShapeError("No prompt provided", "No prompt provided", kind="no_prompt")
    extra = body.get("extra_data", {})
    if not isinstance(extra, dict):
        raise PromptShapeError("extra_data must be an object", f"got {_kind(extra)}")
    client_id = body.get("client_id")
    if client_id is not None and not isinstance(client_id, str):
        raise PromptShapeError("client_id must be a string", f"got {_kind(client_id)}")
    return check_graph(body["prompt"]), dict(extra), client_id


# ------------------------------------------------------------------------------------------------ LoRA sets

def _number(value):
    """A strength as a comparable value: numbers rounded (0.8 and 0.80000001 merge the same), anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return round(float(value), 6) if math.isfinite(value) else str(value)


def lora_set(graph: dict) -> list[tuple]:
    """The active LoRAs of a graph with their strengths, sorted: our LoRA Stack rows that are on, and ComfyUI's
    LoraLoader / LoraLoaderModelOnly nodes. Rows that are not well formed are skipped (ComfyUI refuses the prompt)."""
    rows = set()
    for node in graph.values():
        if not isinstance(node, dict):
            continue
        cls, inputs = node.get("class_type"), node.get("inputs") or {}
        if cls == LORA_STACK:
            raw = inputs.get("loras")
            try:
                data = json.loads(raw) if isinstance(raw, str) else raw
            except ValueError:
                continue
            for row in data if isinstance(data, list) else []:
                if isinstance(row, dict) and isinstance(row.get("lora"), str) and row.get("on", True) is True:
                    rows.add((row["lora"], _number(row.get("strength", 1.0))))
        elif cls in NATIVE_LORA_INPUTS:
            name, *strengths = (inputs.get(k) for k in NATIVE_LORA_INPUTS[cls])
            if isinstance(name, str):
                rows.add((name, *(_number(s) for s in strengths)))
    return sorted(rows, key=repr)


def lora_key(graph: dict) -> str:
    """A short stable name of the graph's LoRA set ('' when no LoRA is on): equal keys, equal merged weights."""
    rows = lora_set(graph)
    if not rows:
        return ""
    return "loras-" + hashlib.sha1(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ outputs

def _is_file(item) -> bool:
    return (isinstance(item, dict) and isinstance(item.get("filename"), str) and isinstance(item.get("type"), str)
            and isinstance(item.get("subfolder", ""), str))


def node_files(node_output: dict) -> list[dict]:
    """The file entries ({filename, subfolder, type}) of one node's output (images, gifs, audio ...)."""
    out = []
    for value in (node_output or {}).values():
        if isinstance(value, list):
            out += [item for item in value if _is_file(item)]
    return out


def output_files(outputs: dict) -> list[dict]:
    """Every file entry of a prompt's outputs, node by node."""
    return [f for node_output in (outputs or {}).values() for f in node_files(node_output)]


def renamed_subfolder(prefix: str, subfolder: str) -> str:
    return f"{prefix}/{subfolder}" if subfolder else prefix


def rename_node_output(node_output: dict, prefix: str) -> dict:
    """A copy of one node's output with each file's subfolder put under `prefix` (the front door's prompt id)."""
    new = copy.deepcopy(node_output)
    for item in node_files(new):
        item["subfolder"] = renamed_subfolder(prefix, item.get("subfolder", ""))
    return new


def rename_outputs(outputs: dict, prefix: str) -> dict:
    return {nid: rename_node_output(out, prefix) if isinstance(out, dict) else out for nid, out in (outputs or {}).items()}


def probe_reports(outputs: dict) -> dict:
    """{node id: report} of every VRAM/Latency Probe among a prompt's outputs."""
    found = {}
    for nid, out in (outputs or {}).items():
        reports = (out or {}).get(PROBE_KEY) if isinstance(out, dict) else None
        if isinstance(reports, list) and reports:
            found[nid] = reports[0]
    return found


# ------------------------------------------------------------------------------------------------ messages

def is_terminal(msg: dict) -> bool:
    """True for the message that ends a prompt (ComfyUI also sends `executing` with node null after success)."""
    kind, data = msg.get("type"), msg.get("data") or {}
    return kind in TERMINAL or (kind == "executing" and data.get("node") is None)


def rewrite_message(msg: dict, prompt_id: str) -> dict:
    """A replica's websocket message as the front door's client sees it: its prompt id, renamed files."""
    new = dict(msg)
    data = dict(msg.get("data") or {})
    if "prompt_id" in data:
        data["prompt_id"] = prompt_id
    if msg.get("type") == "executed" and isinstance(data.get("output"), dict):
        data["output"] = rename_node_output(data["output"], prompt_id)
    new["data"] = data
    return new


# ------------------------------------------------------------------------------------------------ redaction

_TRACEBACK_FILE = re.compile(r'File "(/[^"]*/)?([^"/]+)"')


def redact(value, replacements: list[tuple[str, str]]):
    """`value` (any JSON) with each server path prefix replaced by its label, longest first, and the folders of
    traceback lines (`File "/abs/x.py"`) dropped: API clients never see where the server keeps its files."""
    pairs = sorted(((p.rstrip("/"), label) for p, label in replacements if p and len(p.rstrip("/")) > 1),
                   key=lambda pair: -len(pair[0]))

    def one(text: str) -> str:
        for prefix, label in pairs:
            text = text.replace(prefix, label)
        return _TRACEBACK_FILE.sub(lambda m: f'File "{m.group(2)}"', text)

    def walk(v):
        if isinstance(v, str):
            return one(v)
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, tuple):
            return tuple(walk(x) for x in v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return walk(value)
