"""Applying a LoRA stack to the loaded transformer.

How an active stack runs is chosen per apply (LoraManager):
  * merged   W = W0 + sum(strength * up @ down) written into the base weights, from a spare
             copy W0 of each weight the stack touches: no cost per step (a LoRA on costs nothing
             at sampling time), exact restore (the copy is put back bit for bit), a switch or a
             strength change re-merges in milliseconds on a GPU. Used when the copies fit in
             free memory with room to spare and the transformer is not streamed.
  * adapters each file is copied into a PEFT adapter slot (built on first use); the slots run beside the base layers (two small GEMMs and an add per layer: about
             +12 % per step at 1024²); no extra copy of any weight. The fallback.
With every LoRA off the untouched (or restored) base weights run alone, and the adapters path takes its PEFT
layers out of the module tree (a compiled transformer runs its pre-LoRA code again): bit-identical to never
having loaded a LoRA.

LoKr, LoHa and full-weight diffs (and bias diffs) change whole matrices, not a low-rank pair: they run
merged only, each layer's dense delta made on the device from the file's factors at merge time. A
stack that holds one and would run as adapters (low_vram, not enough memory for the spare copies,
ZIMAGE_TURBO_LORA_MODE=adapters) is refused before anything changes, saying why and what to do: a
dense delta beside a streamed or unmerged layer would cost as much memory as the spare copy the
merged path was refused for.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InvalidSettingError, LoraKeyError
from .deltas import KIND_NAMES, DenseDelta
from .lora_files import LORA_FILES, LoraFileCache, ParsedLora, biased_modules, linear_modules
from .stack import LoraSpec, check_strength, combine_stack


@dataclass
class _OnDevice:
    """One file's change to one layer, on the weights' device (alpha/rank etc. folded in)."""

    down: torch.Tensor | None = None  # [r, in], weights' dtype
    up: torch.Tensor | None = None  # [out, r] * scale, weights' dtype
    dense: DenseDelta | None = None  # factors on the device; the dense delta is made at merge time
    bias: torch.Tensor | None = None  # [out], float32


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


STREAMING_WHY = "the transformer streams (low_vram): its weights cannot be merged"
STREAMING_ADVICE = "choose the memory mode resident or offload_text_encoder in the Turbo Loader (low_vram streams the weights)"

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

    def __init__(self, transformer: nn.Module, files: LoraFileCache = LORA_FILES, device: torch.device | None = None):
        self.transformer = transformer
        # Where the LoRA tensors, merges and adapter slots live: the compute device. Not "wherever the base
        # weights are now": in low_vram they sit in host memory between blocks, and slots built there would
        # meet the activations on the GPU (seen on the GPU: the first LoRA of a low_vram pipeline).
        self.files = files
        self.modules = linear_modules(transformer)
        # Parsed files are only valid for a model with these exact layers.
        self.biased = biased_modules(transformer)
        self.signature = hashlib.sha1(repr((sorted(self.modules.items()), sorted(self.biased))).encode()).hexdigest()
        # The base Linear of every LoRA-able module (PEFT keeps the same object as its base_layer).
        self.linears: dict[str, nn.Linear] = {
            n: getattr(transformer.get_submodule(n), "base_layer", transformer.get_submodule(n)) for n in self.modules
        }
        self.device = torch.device(device) if device is not None else next(iter(self.linears.values())).weight.device
        self.mode = lora_mode_from_env()
        self.allow_merge = True  # False while the transformer's blocks stream (low_vram), and in fp8 mode
        self.no_merge_why, self.no_merge_advice = STREAMING_WHY, STREAMING_ADVICE  # said while allow_merge is False
        self.path = ""  # how the current stack runs: merged / adapters / ""
        self.current: tuple[tuple[str, float], ...] = ()  # (file's adapter name, strength), canonical order
        self.why_adapters = ""
        self._stale = False  # the next apply re-applies even an unchanged stack
        self.device_copies: OrderedDict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.originals: dict[str, torch.Tensor] = {}  # module -> spare copy of its base weight
        self.merged: set[str] = set()  # modules whose base weight now holds a merge
        self.bias_originals: dict[str, torch.Tensor] = {}  # module -> spare copy of its bias (diff_b files)
        self.merged_bias: set[str] = set()
        # adapter slots (built on first use of the adapters path)
        self.slot_rank = 0
        self.slot_files: list[str | None] = []  # slot -> adapter name of the file it holds
        self.layers: list[nn.Module] = []  # the PEFT LoRA layers
        self.layer_names: list[str] = []
        self.adapters_enabled = False
        self.wrapped = False  # the PEFT layers (not their base layers) are in the module tree
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
            parsed, hit = self.files.get(spec.path, self.modules, self.signature, self.biased)
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
        path = ("merged" if self._merge_fits(targets, [parsed_by_name[n] for n in order]) else "adapters") if state else ""
        if path == "adapters":
            self._refuse_dense_on_adapters([parsed_by_name[n] for n in order])
        if state != self.current or path != self.path or self._stale:
            if path == "merged":
                self._set_adapters([], {})
                self._merge(state, parsed_by_name, targets)
            else:
                self._restore_all()
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
             "kind": "+".join(parsed_by_name[n].kinds), "layers": len(parsed_by_name[n].targets),
             "rank": parsed_by_name[n].ranks, "order": order.index(n)}
            for n, s in wanted.items()
        ]
        report.seconds = time.perf_counter() - t0
        return report

    def variant(self):
        """What a compiled transformer sees: "base" (no adapter runs) or the number of adapter slots on."""
        if self.path == "adapters" and self.current:
            return ("adapters", len(self.current))
        return "base"

    def set_allow_merge(self, allow: bool, why: str = "", advice: str = "") -> None:
        """The pipeline says whether the base weights may be merged into (not while they stream, not in fp8 mode);
        `why` / `advice`: what the probe and a refusal say while they may not (default: streaming's)."""
        self.no_merge_why, self.no_merge_advice = why or STREAMING_WHY, advice or STREAMING_ADVICE
        if allow == self.allow_merge:
            return
        if not allow:
            self.unmerge()
        self.allow_merge = allow
        self._stale = True  # the next apply chooses the path again

    def unmerge(self) -> None:
        """Put every merged base weight back (exactly) and forget the spare copies."""
        self._restore_all()
        self.originals.clear()
        self.bias_originals.clear()
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

    def _on_device(self, parsed: ParsedLora) -> dict[str, _OnDevice]:
        """module -> the file's change on the weights' device (low-rank: down, up * scale), cached."""
        name = parsed.adapter_name
        hit = self.device_copies.get(name)
        if hit is not None:
            self.device_copies.move_to_end(name)
            return hit
        ref = next(iter(self.linears.values())).weight
        out = {}
        for module, t in parsed.targets.items():
            entry = _OnDevice()
            if t.low_rank is not None:
                down = t.low_rank.down.to(device=self.device, dtype=torch.float32, non_blocking=True)
                up = t.low_rank.up.to(device=self.device, dtype=torch.float32, non_blocking=True) * t.low_rank.scale
                entry.down, entry.up = down.to(ref.dtype), up.to(ref.dtype)  # scale folded in: scale = strength
            if t.dense is not None:
                entry.dense = t.dense.to(self.device)
            if t.bias is not None:
                entry.bias = t.bias.to(device=self.device, dtype=torch.float32, non_blocking=True)
            out[module] = entry
        self.device_copies[name] = out
        while len(self.device_copies) > DEVICE_COPIES:
            self.device_copies.popitem(last=False)
        return out

    # ------------------------------------------------------------ merging

    def _merge_fits(self, targets: set[str], files: list[ParsedLora] = ()) -> bool:
        """Merge when allowed and the spare copies still missing fit with headroom to spare."""
        if self.mode == "adapters":
            self.why_adapters = f"{LORA_MODE_ENV}=adapters"
            return False
        if not self.allow_merge:
            self.why_adapters = self.no_merge_why
            return False
        weights = {m for p in files for m, t in p.targets.items() if t.low_rank is not None or t.dense is not None}
        biases = {m for p in files for m, t in p.targets.items() if t.bias is not None}
        if not files:
            weights = set(targets)
        missing = weights - set(self.originals)
        missing_bias = biases - set(self.bias_originals)
        need = sum(self.linears[m].weight.numel() * self.linears[m].weight.element_size() for m in missing)
        need += sum(self.linears[m].bias.numel() * self.linears[m].bias.element_size() for m in missing_bias)
        # The largest dense delta is made in float32 during a merge, one layer at a time.
        need += max((4 * self.linears[m].weight.numel() for p in files for m, t in p.targets.items()
                     if t.dense is not None), default=0)
        if self.mode == "merge" or need == 0:
            return True
        free = _free_bytes(self.device)
        if free >= need + MERGE_HEADROOM_BYTES:
            return True
        gib = 1024**3
        self.why_adapters = (f"merging needs a {need / gib:.1f} GiB copy of the weights it changes; "
                             f"{free / gib:.1f} GiB is free (with {MERGE_HEADROOM_BYTES / gib:.0f} GiB kept for images)")
        return False

    def _merge(self, state, parsed_by_name: dict[str, ParsedLora], targets: set[str]) -> None:
        """W = W0 + sum(strength * delta) for every module the stack touches; the others hold W0."""
        copies = [(self._on_device(parsed_by_name[n]), s) for n, s in state]
        weight_targets = {m for tensors, _ in copies for m, e in tensors.items() if e.down is not None or e.dense is not None}
        bias_targets = {m for tensors, _ in copies for m, e in tensors.items() if e.bias is not None}
        self._restore(self.merged - weight_targets)
        self._restore_bias(self.merged_bias - bias_targets)
        with torch.no_grad():
            for module in sorted(weight_targets):
                w = self.linears[module].weight
                w0 = self.originals.get(module)
                if w0 is None:
                    w0 = self.originals[module] = w.detach().clone()
                ups, downs, dense = [], [], []
                for tensors, strength in copies:  # canonical order: the same stack gives the same bits
                    entry = tensors.get(module)
                    if entry is None:
                        continue
                    if entry.down is not None:
                        downs.append(entry.down)
                        ups.append(entry.up * strength)
                    if entry.dense is not None:
                        dense.append((entry.dense, strength))
                if not dense:
                    # One GEMM with W0 as its addend: accumulated in fp32, rounded once into W.
                    torch.addmm(w0, torch.cat(ups, dim=1), torch.cat(downs, dim=0), out=w.data)
                else:
                    # Whole-matrix deltas: summed in fp32 with the low-rank part, rounded once into W.
                    acc = w0.to(torch.float32, copy=True)  # never .float(): on fp32 weights that is W0 itself
                    if ups:
                        acc.addmm_(torch.cat(ups, dim=1).float(), torch.cat(downs, dim=0).float())
                    for delta, strength in dense:
                        acc.add_(delta.materialize(torch.float32), alpha=strength)
                    w.data.copy_(acc)
                    del acc
                self.merged.add(module)
            for module in sorted(bias_targets):
                b = self.linears[module].bias
                b0 = self.bias_originals.get(module)
                if b0 is None:
                    b0 = self.bias_originals[module] = b.detach().clone()
                acc = b0.to(torch.float32, copy=True)
                for tensors, strength in copies:
                    entry = tensors.get(module)
                    if entry is not None and entry.bias is not None:
                        acc.add_(entry.bias, alpha=strength)
                b.data.copy_(acc)
                self.merged_bias.add(module)

    def _refuse_dense_on_adapters(self, files: list[ParsedLora]) -> None:
        """A LoKr/LoHa/diff cannot sit in a low-rank adapter slot: refuse the stack, saying why and what to do."""
        dense = [p for p in files if p.needs_merge]
        if not dense:
            return
        names = ", ".join(f"{p.path.name} ({' + '.join(KIND_NAMES[k] for k in p.kinds if k != 'lora') or 'bias diffs'})"
                          for p in dense)
        if self.mode == "adapters":
            advice = f"unset {LORA_MODE_ENV}=adapters (or set it to merge)"
        elif not self.allow_merge:
            advice = self.no_merge_advice
        else:
            advice = (f"free memory on the device (fewer LoRAs at once, a smaller batch), or set {LORA_MODE_ENV}=merge "
                      "to merge anyway")
        raise LoraKeyError(
            f"{names}: changes whole weight matrices, not a low-rank pair, so it runs only merged into the weights; "
            f"this stack would run as adapters because {self.why_adapters}. Nothing was applied: {advice}."
        )

    def _restore(self, modules: set[str]) -> None:
        with torch.no_grad():
            for module in modules:
                self.linears[module].weight.data.copy_(self.originals[module])
                self.merged.discard(module)

    def _restore_bias(self, modules: set[str]) -> None:
        with torch.no_grad():
            for module in modules:
                self.linears[module].bias.data.copy_(self.bias_originals[module])
                self.merged_bias.discard(module)

    def _restore_all(self) -> None:
        self._restore(set(self.merged))
        self._restore_bias(set(self.merged_bias))

    # ------------------------------------------------------------ adapter slots

    def _set_adapters(self, active: list[str], strengths: dict[str, float]) -> None:
        if not active and not self.adapters_enabled and not self.wrapped:
            return
        if active:
            self._swap_wrappers(True)
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
        if not active:
            self._swap_wrappers(False)

    def _swap_wrappers(self, wrapped: bool) -> None:
        """Put the PEFT layers into the module tree (adapters run) or their base layers back (no adapter runs).

        With every adapter off the PEFT layers only call their base layers, but a compiled transformer still
        traces them: a second graph for the same computation, fused differently. Measured on an H100 in fp8 mode
        (compiled): the all-off image after a LoRA differed from the pre-LoRA one (latents by up to 0.04). With the
        base layers back, the blocks are again the module tree compiled before any LoRA: the same compiled code,
        the same bits. The PEFT layers, and the files in their slots, are kept here, so the next LoRA on is a
        pointer swap, not a rebuild.
        """
        if self.wrapped == wrapped:
            return
        for name, layer in zip(self.layer_names, self.layers):
            parent_name, _, child = name.rpartition(".")
            parent = self.transformer.get_submodule(parent_name) if parent_name else self.transformer
            setattr(parent, child, layer if wrapped else layer.base_layer)
        self.wrapped = wrapped

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
        # Out of the module tree, the PEFT layers (and their slots' tensors) go with the last reference here.
        self._swap_wrappers(False)
        self.slot_files, self.layers, self.layer_names, self.slot_rank = [], [], [], 0
        self.adapters_enabled = self.wrapped = False

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
                # Over torchao's fp8 layers (fp8 mode) PEFT warns that it cannot merge them: it never has to here.
                warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
                inject_adapter_in_model(config, self.transformer, adapter_name=f"slot{i}")
        named = [(n, m) for n, m in self.transformer.named_modules() if isinstance(m, LoraLayer)]
        self.wrapped = True
        self.layers = [m for _, m in named]
        self.layer_names = [n for n, _ in named]
        for layer in self.layers:
            for i in range(count):
                slot = f"slot{i}"
                for part in (layer.lora_A[slot], layer.lora_B[slot]):
                    part.to(device=self.device, dtype=ref.dtype)
                    part.weight.requires_grad_(False)
                    part.weight.data.zero_()
                # A tensor, not a float: changing it in place never recompiles a compiled model.
                layer.scaling[slot] = torch.zeros((), device=self.device, dtype=torch.float32)
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
                entry = tensors.get(module)
                if entry is None or entry.down is None:
                    a.zero_()
                    b.zero_()
                    continue
                down, up = entry.down, entry.up
                r = down.shape[0]
                a[:r].copy_(down)
                a[r:].zero_()
                b[:, :r].copy_(up)
                b[:, r:].zero_()
        self.slot_files[slot] = parsed.adapter_name
