"""Reading LoRA files: every Z-Image key format mapped onto the transformer's modules.

Formats accepted (prefix, module naming and pair naming are recognised independently):
  * diffusers/peft   transformer.layers.0.attention.to_q.lora_A.weight / lora_B
  * kohya/ComfyUI    diffusion_model.layers.0.attention.qkv.lora_down.weight / lora_up / alpha
                     (fused qkv is split into q, k, v; split to_q/to_k/to_v also work),
                     lora_unet_layers_0_attention_qkv.lora_down.weight (underscores)
  * DiffSynth        bare keys: layers.0.attention.to_q.lora_A.default.weight
  * lycoris prefixes (lycoris_...) for plain LoRA weights
Every key must land on a module of the model with matching shapes; otherwise the
whole file is refused with the offending keys named (never a silent partial apply).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraKeyError
from ..files import key_maps
from ..files.model_files import FileId
from ..files.safetensors_io import list_tensors, load_entries

_PREFIXES = (
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "lora_unet_",
    "lora_transformer_",
    "lycoris_",
    "unet.",
)
# (suffix, role) — role: down (A, [r, in]), up (B, [out, r]), alpha (scalar)
_SUFFIXES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
)
_UNSUPPORTED = {
    "lokr_w1": "LoKr", "lokr_w2": "LoKr", "hada_w1_a": "LoHa", "hada_w2_a": "LoHa",
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "oft_blocks": "OFT",
}


def _norm(name: str) -> str:
    return name.replace(".", "_")


@dataclass
class LoraTarget:
    """One model module a LoRA changes: W' = W + strength * scale * up @ down."""

    module: str
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class ParsedLora:
    path: Path
    file_id: FileId
    format: str
    targets: dict[str, LoraTarget]
    bytes: int
    read_seconds: float

    @property
    def adapter_name(self) -> str:
        digest = hashlib.sha1(repr(self.file_id).encode()).hexdigest()[:12]
        return f"lora_{digest}"

    @property
    def ranks(self) -> list[int]:
        return sorted({t.rank for t in self.targets.values()})



def linear_modules(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every LoRA-able Linear of the transformer (unwrapping PEFT layers): name -> (in, out)."""
    out = {}
    for name, mod in model.named_modules():
        if ".lora_" in name or name.endswith(".base_layer"):
            continue
        base = getattr(mod, "base_layer", mod)
        if isinstance(base, nn.Linear):
            out[name] = (base.in_features, base.out_features)
    return out


def _module_lookup(modules: dict[str, tuple[int, int]]) -> dict[str, list[tuple[str, int | None]]]:
    """normalised module name (any naming) -> [(diffusers module, third of a fused qkv or None)]."""
    lookup: dict[str, list[tuple[str, int | None]]] = {}
    for name in modules:
        lookup[_norm(name)] = [(name, None)]
    for name in modules:
        if name.endswith(".attention.to_q"):
            base = name[: -len(".attention.to_q")]
            fused = [(t, i) for i, t in enumerate(key_maps.transformer_module_to_diffusers(base + ".attention.qkv"))]
            if all(t in modules for t, _ in fused):
                lookup[_norm(base + ".attention.qkv")] = fused
    # original (ComfyUI) single names: attention.out, final_layer.*, x_embedder, q_norm...
    for orig_like in list(modules):
        for original in _original_aliases(orig_like):
            lookup.setdefault(_norm(original), [(orig_like, None)])
    return lookup


def _original_aliases(diffusers_name: str) -> list[str]:
    pairs = (
        ("all_final_layer.2-1.", "final_layer."),
        ("all_x_embedder.2-1", "x_embedder"),
        (".attention.to_out.0", ".attention.out"),
    )
    out = []
    for new, old in pairs:
        if new in diffusers_name:
            out.append(diffusers_name.replace(new, old))
    return out


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            for p in _PREFIXES:
                if module.startswith(p):
                    module = module[len(p):]
                    break
            return module, role
    return None


def _detect_format(keys: list[str]) -> str:
    k = " ".join(keys[:50])
    if "lora_unet_" in k or "lycoris_" in k:
        return "kohya (underscore names)"
    if ".qkv." in k or ".qkv_" in k:
        return "kohya/ComfyUI (fused qkv)"
    if "lora_down" in k or ".lora.down" in k:
        return "kohya/ComfyUI (split q/k/v)"
    if k.startswith("transformer.") or " transformer." in k:
        return "diffusers/peft"
    if "diffusion_model." in k:
        return "ComfyUI peft-style"
    return "DiffSynth (bare keys)"


def parse_lora(path: Path, modules: dict[str, tuple[int, int]]) -> ParsedLora:
    """Read a LoRA file and map every key onto `modules`; raise LoraKeyError if anything does not fit."""
    path = Path(path)
    t0 = time.perf_counter()
    entries = list_tensors(path)
    if not entries:
        raise LoraKeyError(f"{path.name}: the file holds no tensors; it is not a LoRA.")
    for e in entries:
        for marker, kind in _UNSUPPORTED.items():
            if marker in e.name:
                raise LoraKeyError(
                    f"{path.name}: this is a {kind} adapter (key {e.name}); only plain LoRA files "
                    "(lora_A/lora_B or lora_down/lora_up) are supported."
                )
    tensors = load_entries(entries, "cpu")
    broken = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise LoraKeyError(
            f"{path.name}: {len(broken)} tensor(s) hold NaN or infinite values (e.g. {broken[0]}), which would "
            "turn every image black. The file is broken: download it again, or re-export it from the trainer."
        )
    lookup = _module_lookup(modules)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None or _norm(split[0]) not in lookup:
            unmatched.append(key)
            continue
        groups.setdefault(_norm(split[0]), {})[split[1]] = tensor
    if unmatched:
        shown = ", ".join(unmatched[:6]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 6 else "")
        raise LoraKeyError(
            f"{path.name}: {len(unmatched)} of {len(tensors)} keys fit no layer of the Z-Image transformer, so "
            f"the LoRA was not applied (it is probably made for another model): {shown}"
        )

    targets: dict[str, LoraTarget] = {}
    for norm_name, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise LoraKeyError(f"{path.name}: layer {norm_name} has only {sorted(parts)}: a LoRA needs both down/A and up/B.")
        down, up = parts["down"].float(), parts["up"].float()
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraKeyError(f"{path.name}: layer {norm_name} has inconsistent LoRA shapes {tuple(down.shape)} / {tuple(up.shape)}.")
        rank = down.shape[0]
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
        dests = lookup[norm_name]
        ups = up.chunk(3, dim=0) if len(dests) == 3 else (up,)
        if len(dests) == 3 and up.shape[0] % 3:
            raise LoraKeyError(f"{path.name}: fused qkv LoRA {norm_name} has {up.shape[0]} output rows, not a multiple of 3.")
        for (dest, _), part_up in zip(dests, ups):
            fan_in, fan_out = modules[dest]
            if down.shape[1] != fan_in or part_up.shape[0] != fan_out:
                raise LoraKeyError(
                    f"{path.name}: layer {dest} is {fan_in}->{fan_out} in this model but the LoRA has "
                    f"{down.shape[1]}->{part_up.shape[0]}: it was made for a different model size."
                )
            targets[dest] = LoraTarget(dest, down.contiguous(), part_up.contiguous(), alpha)
    return ParsedLora(path, FileId.of(path), _detect_format(list(tensors)), targets,
                      sum(e.nbytes for e in entries), time.perf_counter() - t0)


class LoraFileCache:
    """Each LoRA file is read once (per size + mtime) and kept on the host."""

    def __init__(self, max_items: int = 16):
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, ParsedLora] = OrderedDict()
        self.max_items = max_items
        self.reads = 0

    def get(self, path: Path, modules: dict[str, tuple[int, int]], model_signature: str) -> tuple[ParsedLora, bool]:
        fid = FileId.of(path)
        key = (fid, model_signature)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit, True
        parsed = parse_lora(path, modules)
        with self._lock:
            self.reads += 1
            self._items[key] = parsed
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return parsed, False

    def clear(self):
        with self._lock:
            self._items.clear()


LORA_FILES = LoraFileCache()
