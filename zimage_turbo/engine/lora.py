"""LoRA files: reading every Z-Image key format, and applying stacks as PEFT adapters.

Formats accepted (prefix, module naming and pair naming are recognised independently):
  * diffusers/peft   transformer.layers.0.attention.to_q.lora_A.weight / lora_B
  * kohya/ComfyUI    diffusion_model.layers.0.attention.qkv.lora_down.weight / lora_up / alpha
                     (fused qkv is split into q, k, v; split to_q/to_k/to_v also work),
                     lora_unet_layers_0_attention_qkv.lora_down.weight (underscores)
  * DiffSynth        bare keys: layers.0.attention.to_q.lora_A.default.weight
  * lycoris prefixes (lycoris_...) for plain LoRA weights
Every key must land on a module of the model with matching shapes; otherwise the
whole file is refused with the offending keys named (never a silent partial apply).

Each file is copied into a PEFT adapter slot on the transformer. How an active stack then
runs is chosen per apply (LoraManager):
  * merged   W = W0 + sum(strength * up @ down) written into the base weights, from a spare
             copy W0 of each weight the stack touches: no cost per step (a LoRA on costs nothing
             at sampling time), exact restore (the copy is put back bit for bit), a switch or a
             strength change re-merges in milliseconds on a GPU. Used when the copies fit in
             free memory with room to spare and the transformer is not streamed.
  * adapters the slots run beside the base layers (two small GEMMs and an add per layer: about
             +12 % per step at 1024²); no extra copy of any weight. The fallback.
With every LoRA off the untouched (or restored) base weights run alone: bit-identical to never
having loaded a LoRA.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import key_maps
from .errors import InvalidSettingError, LoraKeyError
from .loading import FileId
from .safetensors_io import list_tensors, load_entries

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


# Beyond this a LoRA only produces overflow or noise; the real ones are used between about -2 and 2
# ("slider" LoRAs up to about 5-8). Non-finite strengths would give a black image.
MAX_ABS_STRENGTH = 20.0


def check_strength(strength: float) -> float:
    """The strength if it is usable, else InvalidSettingError saying what to use instead."""
    if not math.isfinite(strength):
        raise InvalidSettingError(f"strength {strength} is not a finite number: use e.g. 0.8 (or switch the row off).")
    if abs(strength) > MAX_ABS_STRENGTH:
        raise InvalidSettingError(
            f"strength {strength:g} is outside -{MAX_ABS_STRENGTH:g}..{MAX_ABS_STRENGTH:g}: LoRAs are used at about "
            "-2..2; larger values only overflow the model."
        )
    return strength


@dataclass(frozen=True)
class LoraSpec:
    """One row of a LoRA stack."""

    path: Path
    strength: float = 1.0
    enabled: bool = True

    def __repr__(self) -> str:
        # ComfyUI shows node inputs (str of this) in its error reports to API clients: no server paths.
        return f"LoraSpec({Path(self.path).name!r}, strength={self.strength:g}, on={self.enabled})"


def combine_stack(front, back) -> tuple[LoraSpec, ...]:
    """`front` followed by `back`; a LoRA file that is on twice is refused.

    Two rows of one file used to add their strengths (200 rows at 0.8 became 160): that is never
    what a user means, so the stack says which rows to merge instead.
    """
    out: list[LoraSpec] = []
    seen: dict[Path, LoraSpec] = {}
    for spec in tuple(front) + tuple(back):
        if spec.enabled:
            key = Path(spec.path).resolve()
            if key in seen:
                raise InvalidSettingError(
                    f"{Path(spec.path).name} is switched on twice in the LoRA stack (strengths "
                    f"{seen[key].strength:g} and {spec.strength:g}); a LoRA is applied once: keep one row with the "
                    "strength you want."
                )
            seen[key] = spec
        out.append(spec)
    return tuple(out)


@dataclass
class LoraApplyReport:
    seconds: float = 0.0
    files_read: int = 0
    adapters_injected: int = 0  # LoRA files copied into an adapter slot by this call
    slots_rebuilt: bool = False  # the adapter structure changed (a compiled model recompiles once)
    active: list[dict] = field(default_factory=list)
    changed: bool = False
    path: str = ""  # "merged" / "adapters" / "" (nothing on)
    why_adapters: str = ""  # why a stack ran on the adapter path instead of merged


SLOT_RANK_STEP = 16
LORA_MODES = ("auto", "merge", "adapters")
LORA_MODE_ENV = "ZIMAGE_TURBO_LORA_MODE"
# Free memory to leave after the spare copies for merging (activations at 1024² need about 2 GiB).
MERGE_HEADROOM_BYTES = 4 * 1024**3


def lora_mode_from_env() -> str:
    mode = os.environ.get(LORA_MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in LORA_MODES:
        raise InvalidSettingError(f"{LORA_MODE_ENV}={mode!r}: use one of {', '.join(LORA_MODES)}.")
    return mode


def _free_bytes(device: torch.device) -> int:
    """Memory a new allocation can take on this device (the caching allocator's spare blocks included)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 0


DEVICE_COPIES = 4  # LoRA files kept on the device, ready to merge or to copy into a slot


class LoraManager:
    """The LoRA state of one transformer. An active stack runs on one of two paths.

    merged: W = W0 + sum(strength * up @ down) is written into each base weight the stack
    touches, from a spare copy W0 taken the first time (restored bit for bit when a layer is no
    longer touched). The module structure never changes, so a compiled transformer never
    recompiles or re-traces for a LoRA, and a LoRA on costs nothing per step. The files' tensors
    are kept on the device (the last DEVICE_COPIES files), so a switch or a strength change is one
    GEMM per layer on the GPU. Chosen when the copies fit in free memory with headroom to spare.

    adapters: the files sit in PEFT adapter slots beside the base layers (two small GEMMs and an
    add per layer per step). Slot i is the adapter "slot{i}" on every Linear, one rank for all
    (lower ranks zero-padded); strengths are 0-dim tensors updated in place, so strength and file
    changes do not recompile. Slots are built the first time this path runs, and rebuilt only for
    more LoRAs at once or a higher rank than they have.

    With every LoRA off the base weights (untouched, or restored) run alone: bit-identical to
    never having loaded a LoRA.
    """

    def __init__(self, transformer: nn.Module, files: LoraFileCache = LORA_FILES):
        self.transformer = transformer
        self.files = files
        self.modules = linear_modules(transformer)
        # Parsed files are only valid for a model with these exact layers.
        self.signature = hashlib.sha1(repr(sorted(self.modules.items())).encode()).hexdigest()
        # The base Linear of every LoRA-able module (PEFT keeps the same object as its base_layer).
        self.linears: dict[str, nn.Linear] = {
            n: getattr(transformer.get_submodule(n), "base_layer", transformer.get_submodule(n)) for n in self.modules
        }
        self.mode = lora_mode_from_env()
        self.allow_merge = True  # False while the transformer's blocks stream (low_vram)
        self.path = ""  # how the current stack runs: merged / adapters / ""
        self.current: tuple[tuple[str, float], ...] = ()  # (file's adapter name, strength), canonical order
        self.why_adapters = ""
        self._stale = False  # the next apply re-applies even an unchanged stack
        self.device_copies: OrderedDict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.originals: dict[str, torch.Tensor] = {}  # module -> spare copy of its base weight
        self.merged: set[str] = set()  # modules whose base weight now holds a merge
        # adapter slots (built on first use of the adapters path)
        self.slot_rank = 0
        self.slot_files: list[str | None] = []  # slot -> adapter name of the file it holds
        self.layers: list[nn.Module] = []  # the PEFT LoRA layers
        self.layer_names: list[str] = []
        self.adapters_enabled = False
        self.rebuilds = 0

    # ------------------------------------------------------------- public

    def apply(self, stack: list[LoraSpec]) -> LoraApplyReport:
        t0 = time.perf_counter()
        report = LoraApplyReport()
        wanted: OrderedDict[str, float] = OrderedDict()
        parsed_by_name: dict[str, ParsedLora] = {}
        for spec in combine_stack((), stack):
            if not spec.enabled:
                continue
            strength = check_strength(float(spec.strength))
            if strength == 0:
                continue
            parsed, hit = self.files.get(spec.path, self.modules, self.signature)
            report.files_read += 0 if hit else 1
            name = parsed.adapter_name
            parsed_by_name[name] = parsed
            wanted[name] = strength

        # Canonical order: by (file name, size). Merges sum in this order and adapter slots are
        # filled in it, so the same stack gives the same bits whatever ran before it (and on a copy
        # of the files elsewhere: the order uses no path or mtime).
        order = sorted(wanted, key=lambda n: (parsed_by_name[n].path.name, parsed_by_name[n].file_id.size, n))
        state = tuple((n, wanted[n]) for n in order)
        targets = set().union(*(parsed_by_name[n].targets for n in order)) if order else set()
        path = ("merged" if self._merge_fits(targets) else "adapters") if state else ""
        if state != self.current or path != self.path or self._stale:
            if path == "merged":
                self._set_adapters([], {})
                self._merge(state, parsed_by_name, targets)
            else:
                self._restore(set(self.merged))
                if path == "adapters":
                    self._fill_slots(order, parsed_by_name, report)
                    self._set_adapters([f"slot{i}" for i in range(len(order))],
                                       {f"slot{i}": wanted[n] for i, n in enumerate(order)})
                else:
                    self._set_adapters([], {})
            report.changed = True
            self.current, self.path, self._stale = state, path, False
        report.path = self.path
        report.why_adapters = self.why_adapters if self.path == "adapters" else ""
        report.active = [
            {"file": parsed_by_name[n].path.name, "strength": s, "format": parsed_by_name[n].format,
             "layers": len(parsed_by_name[n].targets), "rank": parsed_by_name[n].ranks, "order": order.index(n)}
            for n, s in wanted.items()
        ]
        report.seconds = time.perf_counter() - t0
        return report

    def variant(self):
        """What a compiled transformer sees: "base" (no adapter runs) or the number of adapter slots on."""
        if self.path == "adapters" and self.current:
            return ("adapters", len(self.current))
        return "base"

    def set_allow_merge(self, allow: bool) -> None:
        """The pipeline says whether the base weights may be merged into (not while they stream)."""
        if allow == self.allow_merge:
            return
        if not allow:
            self.unmerge()
        self.allow_merge = allow
        self._stale = True  # the next apply chooses the path again

    def unmerge(self) -> None:
        """Put every merged base weight back (exactly) and forget the spare copies."""
        self._restore(set(self.merged))
        self.originals.clear()
        if self.path == "merged":
            self._stale = True

    def remove_all(self) -> None:
        """No LoRA at all any more: weights restored, adapter slots deleted, device copies dropped."""
        self.unmerge()
        self._delete_slots()
        self.device_copies.clear()
        self.current, self.path = (), ""

    @property
    def slot_count(self) -> int:
        return len(self.slot_files)

    # ------------------------------------------------------------ device copies

    def _on_device(self, parsed: ParsedLora) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module -> (down [r, in], up * alpha / r [out, r]) on the weights' device and dtype, cached."""
        name = parsed.adapter_name
        hit = self.device_copies.get(name)
        if hit is not None:
            self.device_copies.move_to_end(name)
            return hit
        ref = next(iter(self.linears.values())).weight
        out = {}
        for module, t in parsed.targets.items():
            down = t.down.to(device=ref.device, dtype=torch.float32, non_blocking=True)
            up = t.up.to(device=ref.device, dtype=torch.float32, non_blocking=True) * (t.alpha / t.rank)
            out[module] = (down.to(ref.dtype), up.to(ref.dtype))  # alpha/rank folded in: scale = strength
        self.device_copies[name] = out
        while len(self.device_copies) > DEVICE_COPIES:
            self.device_copies.popitem(last=False)
        return out

    # ------------------------------------------------------------ merging

    def _merge_fits(self, targets: set[str]) -> bool:
        """Merge when allowed and the spare copies still missing fit with headroom to spare."""
        if self.mode == "adapters":
            self.why_adapters = f"{LORA_MODE_ENV}=adapters"
            return False
        if not self.allow_merge:
            self.why_adapters = "the transformer streams (low_vram): its weights cannot be merged"
            return False
        missing = targets - set(self.originals)
        need = sum(self.linears[m].weight.numel() * self.linears[m].weight.element_size() for m in missing)
        if self.mode == "merge" or need == 0:
            return True
        free = _free_bytes(self.linears[next(iter(missing))].weight.device)
        if free >= need + MERGE_HEADROOM_BYTES:
            return True
        gib = 1024**3
        self.why_adapters = (f"merging needs a {need / gib:.1f} GiB copy of the weights it changes; "
                             f"{free / gib:.1f} GiB is free (with {MERGE_HEADROOM_BYTES / gib:.0f} GiB kept for images)")
        return False

    def _merge(self, state, parsed_by_name: dict[str, ParsedLora], targets: set[str]) -> None:
        """W = W0 + sum(strength * up @ down) for every module the stack touches; the others hold W0."""
        self._restore(self.merged - targets)
        copies = [(self._on_device(parsed_by_name[n]), s) for n, s in state]
        with torch.no_grad():
            for module in sorted(targets):
                w = self.linears[module].weight
                w0 = self.originals.get(module)
                if w0 is None:
                    w0 = self.originals[module] = w.detach().clone()
                ups, downs = [], []
                for tensors, strength in copies:  # canonical order: the same stack gives the same bits
                    pair = tensors.get(module)
                    if pair is not None:
                        downs.append(pair[0])
                        ups.append(pair[1] * strength)
                # One GEMM with W0 as its addend: accumulated in fp32, rounded once into W.
                torch.addmm(w0, torch.cat(ups, dim=1), torch.cat(downs, dim=0), out=w.data)
                self.merged.add(module)

    def _restore(self, modules: set[str]) -> None:
        with torch.no_grad():
            for module in modules:
                self.linears[module].weight.data.copy_(self.originals[module])
                self.merged.discard(module)

    # ------------------------------------------------------------ adapter slots

    def _set_adapters(self, active: list[str], strengths: dict[str, float]) -> None:
        if not active and not self.adapters_enabled:
            return
        for layer in self.layers:
            if not active:
                # No adapter runs: the PEFT layers call the base layers only.
                layer.enable_adapters(False)
                continue
            layer.enable_adapters(True)
            try:
                layer.set_adapter(active, inference_mode=True)
            except TypeError:  # PEFT before 0.17 has no inference_mode argument
                layer.set_adapter(active)
            for name, s in strengths.items():
                layer.scaling[name].fill_(s)
        self.adapters_enabled = bool(active)

    def _fill_slots(self, order: list[str], parsed_by_name: dict[str, ParsedLora], report) -> None:
        need_rank = max(max(parsed_by_name[n].ranks) for n in order)
        if len(order) > len(self.slot_files) or need_rank > self.slot_rank:
            rank = max(self.slot_rank, -(-need_rank // SLOT_RANK_STEP) * SLOT_RANK_STEP)
            self._build_slots(max(len(order), len(self.slot_files)), rank)
            report.slots_rebuilt = True
        for slot, name in enumerate(order):
            if self.slot_files[slot] != name:
                self._fill_slot(slot, parsed_by_name[name])
                report.adapters_injected += 1

    def _delete_slots(self) -> None:
        for layer in self.layers:
            for i in range(len(self.slot_files)):
                layer.delete_adapter(f"slot{i}")
            layer.enable_adapters(False)
        self.slot_files, self.layers, self.layer_names, self.slot_rank = [], [], [], 0
        self.adapters_enabled = False

    def _build_slots(self, count: int, rank: int) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        if self.slot_files:
            self._delete_slots()
        ref = next(iter(self.linears.values())).weight
        pattern = "^(?:" + "|".join(re.escape(n) for n in sorted(self.modules)) + ")$"
        for i in range(count):
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=pattern, lora_dropout=0.0, bias="none")
            with warnings.catch_warnings():
                # PEFT warns that a model already holding adapters gets another one: that is the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(config, self.transformer, adapter_name=f"slot{i}")
        named = [(n, m) for n, m in self.transformer.named_modules() if isinstance(m, LoraLayer)]
        self.layers = [m for _, m in named]
        self.layer_names = [n for n, _ in named]
        for layer in self.layers:
            for i in range(count):
                slot = f"slot{i}"
                for part in (layer.lora_A[slot], layer.lora_B[slot]):
                    part.to(device=ref.device, dtype=ref.dtype)
                    part.weight.requires_grad_(False)
                    part.weight.data.zero_()
                # A tensor, not a float: changing it in place never recompiles a compiled model.
                layer.scaling[slot] = torch.zeros((), device=ref.device, dtype=torch.float32)
            layer.enable_adapters(False)
        self.adapters_enabled = False
        self.slot_files = [None] * count
        self.slot_rank = rank
        self.rebuilds += 1

    def _fill_slot(self, slot: int, parsed: ParsedLora) -> None:
        name = f"slot{slot}"
        tensors = self._on_device(parsed)
        with torch.no_grad():
            for layer, module in zip(self.layers, self.layer_names):
                a = layer.lora_A[name].weight
                b = layer.lora_B[name].weight
                pair = tensors.get(module)
                if pair is None:
                    a.zero_()
                    b.zero_()
                    continue
                down, up = pair
                r = down.shape[0]
                a[:r].copy_(down)
                a[r:].zero_()
                b[:, :r].copy_(up)
                b[:, r:].zero_()
        self.slot_files[slot] = parsed.adapter_name
