"""Reading LoRA files: every Z-Image key layout and adapter kind, mapped onto the transformer's Linears.

A key is read as <prefix><layer><suffix>; the three parts are recognised independently:
  prefix   transformer. (diffusers/peft), diffusion_model. (kohya/ComfyUI, ai-toolkit, Comfy-Org),
           lora_unet_ / lora_transformer_ / lycoris_ (kohya/OneTrainer/LyCORIS, underscored layer
           names), none (DiffSynth/ModelScope), base_model.model., model.diffusion_model., unet.
  layer    diffusers names (layers.0.attention.to_q, to_out.0, feed_forward.w1, ...) or the
           original/ComfyUI names (attention.qkv fused, attention.out, final_layer, x_embedder),
           with dots, underscores (kohya) or dots inside names (layers.0.attention.to.q).
  suffix   low-rank: lora_A/lora_B (.weight, .default.weight), lora_down/lora_up, lora.down/lora.up;
           LyCORIS LoKr: lokr_w1 / lokr_w1_a+_b, lokr_w2 / lokr_w2_a+_b, lokr_t2;
           LyCORIS LoHa: hada_w1_a/_b, hada_w2_a/_b, hada_t1/_t2;
           full diffs: diff (weight), diff_b (bias); alpha.
Scales: low-rank alpha/rank (alpha from the key, else from diffusers' `lora_adapter_metadata`, else
rank: scale 1); LoKr and LoHa follow LyCORIS (see deltas.py); diffs have none.

Every key must land on a Linear of the model with matching shapes, each layer must be complete, and
no layer may be changed twice with different values; otherwise the whole file is refused with the
offending keys named (never a silent partial apply). A fused qkv delta is split by rows into q, k, v
(exact for every kind: a dense delta's rows are the deltas of the three projections).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraKeyError
from ..files.model_files import FileId
from ..files.safetensors_io import list_tensors, load_entries, read_header
from .deltas import (
    KIND_NAMES,
    LOHA_ROLES,
    LOKR_ROLES,
    DeltaShapeError,
    LayerDelta,
    LowRank,
    diff_delta,
    lokr_delta,
    loha_delta,
)

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
# (suffix, role), longest first where one ends another. down: A [r, in]; up: B [out, r].
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
    (".diff_b", "diff_b"),
    (".diff", "diff"),
) + tuple((f".{role}", role) for role in LOKR_ROLES + LOHA_ROLES)
# Adapter kinds we do not apply: refused by name rather than half-read.
_UNSUPPORTED = {
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "oft_blocks": "OFT", "oft_R": "OFT",
    "lora_mid": "LoCon with a Tucker core (a convolution format)", "w_norm": "norm-layer patch", "b_norm": "norm-layer patch",
}
# Keys of a text-encoder LoRA: named in the refusal (this pack does not patch the text encoder).
_TEXT_ENCODER_HINTS = ("lora_te", "text_encoder", "te1_", "te2_", "text_model", "qwen3", "lora_te1_")
MAX_REPORTED_KEYS = 6


def unsupported_kind(key: str) -> str | None:
    """The adapter kind a key belongs to when it is one this pack refuses (DoRA, OFT, ...), else None."""
    for marker, kind in _UNSUPPORTED.items():
        if re.search(rf"[._]{marker}(\.|$)", key):
            return kind
    return None


def _norm(name: str) -> str:
    return name.replace(".", "_")


@dataclass
class ParsedLora:
    path: Path
    file_id: FileId
    format: str
    targets: dict[str, LayerDelta]
    bytes: int
    read_seconds: float
    metadata: dict | None = None  # the file's safetensors metadata (strings)

    @property
    def adapter_name(self) -> str:
        digest = hashlib.sha1(repr(self.file_id).encode()).hexdigest()[:12]
        return f"lora_{digest}"

    @property
    def ranks(self) -> list[int]:
        return sorted({t.rank for t in self.targets.values() if t.low_rank is not None})

    @property
    def kinds(self) -> list[str]:
        """The adapter kinds in the file: lora, lokr, loha, diff (bias-only targets count as diff)."""
        kinds = {t.kind for t in self.targets.values()}
        if any(t.bias is not None for t in self.targets.values()):
            kinds.add("diff")
        return sorted(kinds)

    @property
    def needs_merge(self) -> bool:
        """A file with anything but low-rank pairs can only be merged into the weights (not a PEFT slot)."""
        return any(t.needs_merge for t in self.targets.values())


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


def biased_modules(model: nn.Module) -> set[str]:
    """The Linears of `model` that have a bias (where a diff_b can land)."""
    out = set()
    for name, mod in model.named_modules():
        if ".lora_" in name or name.endswith(".base_layer"):
            continue
        base = getattr(mod, "base_layer", mod)
        if isinstance(base, nn.Linear) and base.bias is not None:
            out.add(name)
    return out


def _module_lookup(modules: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """normalised layer name (any naming) -> the model's module(s); a fused qkv -> [to_q, to_k, to_v]."""
    lookup: dict[str, list[str]] = {}
    for name in modules:
        lookup[_norm(name)] = [name]
    for name in modules:
        if name.endswith(".attention.to_q"):
            base = name[: -len(".attention.to_q")]
            fused = [f"{base}.attention.{p}" for p in ("to_q", "to_k", "to_v")]
            if all(t in modules for t in fused):
                lookup[_norm(base + ".attention.qkv")] = fused
    # The original (ComfyUI) single names: attention.out, final_layer.*, x_embedder.
    for diffusers_name in list(modules):
        for original in _original_aliases(diffusers_name):
            lookup.setdefault(_norm(original), [diffusers_name])
    return lookup


def _original_aliases(diffusers_name: str) -> list[str]:
    pairs = (
        ("all_final_layer.2-1.", "final_layer."),
        ("all_x_embedder.2-1", "x_embedder"),
        (".attention.to_out.0", ".attention.out"),
    )
    return [diffusers_name.replace(new, old) for new, old in pairs if new in diffusers_name]


def _split_key(key: str) -> tuple[str, str] | None:
    """(layer name without prefix, role) of a key, or None when its suffix is no LoRA part."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            for p in _PREFIXES:
                if module.startswith(p):
                    module = module[len(p):]
                    break
            return module, role
    return None


def _adapter_kind(role: str) -> str:
    if role in ("down", "up"):
        return "lora"
    if role.startswith("lokr_"):
        return "lokr"
    if role.startswith("hada_"):
        return "loha"
    if role in ("diff", "diff_b"):
        return "diff"
    return ""


def _naming(keys: list[str]) -> str:
    """Which tool's key layout the file uses, from its first LoRA keys."""
    k = " ".join(keys[:80])
    if "lora_unet_" in k or "lora_transformer_" in k or "lycoris_" in k:
        return "kohya (underscore names)"
    if ".lora.down." in k or ".to.q." in k:
        return "dot names (Anime-Z style)"
    if ".qkv." in k or ".qkv_" in k:
        return "kohya/ComfyUI (fused qkv)"
    if ".attention.out." in k or "lora_down" in k:
        return "kohya/ComfyUI (split q/k/v)"
    if k.startswith("transformer.") or " transformer." in k:
        return "diffusers/peft"
    if "diffusion_model." in k:
        if ".default." in k:
            return "Comfy-Org/DiffSynth (diffusion_model. + lora_A.default)"
        return "ai-toolkit (diffusion_model. + diffusers names)"
    return "DiffSynth (bare keys)"


def _detect_format(keys: list[str]) -> str:
    """A user-facing name of the file's format: key layout, and the adapter kind when not plain LoRA."""
    naming = _naming(sorted(keys))
    roles = {s[1] for s in map(_split_key, keys) if s is not None}
    # A bias diff alone does not make a file a full-weight diff: it is named as an addition.
    kinds = sorted({_adapter_kind(r) for r in roles - {"diff_b"}} - {"", "lora"})
    bias = " + bias diffs" if "diff_b" in roles and "diff" not in roles else ""
    if not kinds:
        return naming + bias
    return f"{' + '.join(KIND_NAMES[x] for x in kinds)}, {naming}{bias}"


def _shown(keys: list[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:MAX_REPORTED_KEYS]) + (f" ... ({len(keys)} in all)" if len(keys) > MAX_REPORTED_KEYS else "")


# ------------------------------------------------------------ diffusers' metadata scale


def peft_config(metadata: dict | None) -> dict | None:
    """The LoraConfig diffusers saved in the file's `lora_adapter_metadata` (keys without "transformer."), if any.

    lora_alpha != r there makes the scale differ from 1, which a file without per-key alphas shows nowhere else.
    """
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        conf = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if not isinstance(conf, dict):
        return None
    return {k.removeprefix("transformer."): v for k, v in conf.items()}


def _peft_scale(metadata: dict | None, module: str, rank: int) -> float | None:
    """The scale diffusers/PEFT would use for `module`, from the file's `lora_adapter_metadata`, if any."""
    conf = peft_config(metadata)
    if conf is None:
        return None
    alpha = conf.get("lora_alpha")
    patterns = conf.get("alpha_pattern") or {}
    if isinstance(patterns, dict):
        for pattern, value in patterns.items():
            # PEFT matches a pattern against the end of the module's name ("^..." anchors it at the start).
            bare = str(pattern).removeprefix("^").removesuffix("$")
            try:
                hit = re.fullmatch(bare if str(pattern).startswith("^") else rf"(.*\.)?(?:{bare})", module)
            except re.error:
                hit = module == bare or module.endswith("." + bare)
            if hit:
                alpha = value
                break
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    if conf.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


# ------------------------------------------------------------------ parsing


def _alpha_of(parts: dict[str, torch.Tensor], name: str, path: Path) -> float | None:
    if "alpha" not in parts:
        return None
    a = parts["alpha"]
    if a.numel() != 1:
        raise LoraKeyError(f"{path.name}: the alpha of layer {name} holds {a.numel()} values; an alpha is one number.")
    return float(a.reshape(-1)[0].item())


# Float types a LoRA pair is kept in as the file holds it: the apply converts on the device (exactly), and
# converting 160 MB of bf16 to float32 on the host was the largest part of reading a new file (1.5 s of 2.4 s
# on a 2-core CPU). Anything else (fp8, float64) becomes float32 here.
_KEPT_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _kept(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t.dtype in _KEPT_FLOATS else t.float().contiguous()


def _holds_non_finite(t: torch.Tensor) -> bool:
    """Does this tensor hold a NaN or an infinity?

    One float32 sum per tensor first: a NaN or infinity anywhere makes it non-finite, and it is ~6x faster on a
    CPU than an element-wise isfinite over bf16. A sum can also overflow with finite values near the type's
    limit: only then, and for types a sum does not take (fp8), each element is checked.
    """
    if not t.is_floating_point():
        return False
    if t.dtype in _KEPT_FLOATS and bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return False
    return not bool(torch.isfinite(t).all())


def _layer_delta(path: Path, name: str, parts: dict[str, torch.Tensor], metadata: dict | None,
                 roles_to_keys: dict[str, str]) -> tuple[LowRank | None, object | None, torch.Tensor | None]:
    """(low-rank pair, dense delta, bias diff) of one layer of the file, as the file names it."""
    kinds = {_adapter_kind(r) for r in parts if r not in ("alpha", "diff_b")} - {""}
    if len(kinds) > 1:
        raise LoraKeyError(f"{path.name}: layer {name} holds parts of {' and '.join(KIND_NAMES[k] for k in sorted(kinds))} "
                           f"at once ({_shown(list(roles_to_keys.values()))}); a layer is one kind of adapter.")
    alpha = _alpha_of(parts, name, path)
    low = dense = None
    try:
        if kinds == {"lora"}:
            if "down" not in parts or "up" not in parts:
                raise DeltaShapeError(f"has only {'the down/A' if 'down' in parts else 'the up/B'} half of a LoRA pair")
            down, up = parts["down"], parts["up"]
            if down.ndim == 4 and down.shape[2:] == (1, 1):
                down = down.reshape(down.shape[0], -1)
            if up.ndim == 4 and up.shape[2:] == (1, 1):
                up = up.reshape(up.shape[0], -1)
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise DeltaShapeError(f"has inconsistent LoRA shapes {tuple(parts['down'].shape)} / {tuple(parts['up'].shape)}")
            rank = down.shape[0]
            if alpha is not None:
                scale = alpha / rank
            else:
                scale = _peft_scale(metadata, name, rank) or 1.0
            low = LowRank(_kept(down), _kept(up), scale)
        elif kinds == {"lokr"}:
            dense = lokr_delta({r: t for r, t in parts.items() if r in LOKR_ROLES}, alpha)
        elif kinds == {"loha"}:
            dense = loha_delta({r: t for r, t in parts.items() if r in LOHA_ROLES}, alpha)
        elif kinds == {"diff"}:
            dense = diff_delta(parts["diff"])
        elif "diff_b" not in parts:
            raise DeltaShapeError("has only an alpha")
    except DeltaShapeError as exc:
        raise LoraKeyError(f"{path.name}: layer {name} {exc}; the file is incomplete or broken.") from None
    bias = parts.get("diff_b")
    if bias is not None:
        bias = bias.reshape(-1).float()
    return low, dense, bias


def _same(a: LayerDelta, b: LayerDelta) -> bool:
    """Two readings of one layer that change it identically (a file naming it twice, redundantly)."""
    wa, wb = a.weight_delta(torch.float64), b.weight_delta(torch.float64)
    if (wa is None) != (wb is None) or (a.bias is None) != (b.bias is None):
        return False
    ok = wa is None or (wa.shape == wb.shape and torch.allclose(wa, wb, rtol=1e-5, atol=1e-7 * (1 + float(wa.abs().max()))))
    return ok and (a.bias is None or (a.bias.shape == b.bias.shape and torch.allclose(a.bias, b.bias)))


def parse_lora(path: Path, modules: dict[str, tuple[int, int]], biased: set[str] | None = None) -> ParsedLora:
    """Read a LoRA file and map every key onto `modules`; raise LoraKeyError if anything does not fit.

    biased: the modules that have a bias, where a diff_b may land (None: not checked).
    """
    path = Path(path)
    t0 = time.perf_counter()
    header, _ = read_header(path)
    metadata = header.get("__metadata__") or None
    entries = list_tensors(path)
    if not entries:
        raise LoraKeyError(f"{path.name}: the file holds no tensors; it is not a LoRA.")
    for e in entries:
        kind = unsupported_kind(e.name)
        if kind:
            raise LoraKeyError(
                f"{path.name}: this is a {kind} adapter (key {e.name}), which this pack does not apply; it reads "
                "LoRA (lora_A/B, lora_down/up), LyCORIS LoKr and LoHa, and full-weight diffs (diff, diff_b)."
            )
    tensors = load_entries(entries, "cpu")
    broken = [k for k, t in tensors.items() if _holds_non_finite(t)]
    if broken:
        raise LoraKeyError(
            f"{path.name}: {len(broken)} tensor(s) hold NaN or infinite values (e.g. {broken[0]}), which would "
            "turn every image black. The file is broken: download it again, or re-export it from the trainer."
        )
    lookup = _module_lookup(modules)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    group_keys: dict[str, dict[str, str]] = {}
    unmatched: list[str] = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None or _norm(split[0]) not in lookup:
            unmatched.append(key)
            continue
        norm = _norm(split[0])
        if split[1] in groups.setdefault(norm, {}):
            raise LoraKeyError(f"{path.name}: keys {group_keys[norm][split[1]]} and {key} name the same part of one "
                               "layer; the file is inconsistent.")
        groups[norm][split[1]] = tensor
        group_keys.setdefault(norm, {})[split[1]] = key
    if unmatched:
        te = [k for k in unmatched if any(h in k.lower() for h in _TEXT_ENCODER_HINTS)]
        hint = (f" {len(te)} of them change a text encoder, which this pack does not patch (its LoRA support is for the "
                "transformer only)." if te else " It is probably made for another model.")
        raise LoraKeyError(
            f"{path.name}: {len(unmatched)} of {len(tensors)} keys fit no layer of the Z-Image transformer, so "
            f"the LoRA was not applied.{hint} Keys: {_shown(unmatched)}"
        )

    targets: dict[str, LayerDelta] = {}
    for norm_name, parts in groups.items():
        keys = group_keys[norm_name]
        # Messages name the layer as the file writes it (its first key without the part's suffix).
        shown_name = min(k[: len(k) - len(next(sfx for sfx, r in _SUFFIXES if k.endswith(sfx)))] for k in keys.values())
        low, dense, bias = _layer_delta(path, shown_name, parts, metadata, keys)
        dests = lookup[norm_name]
        n = len(dests)
        for i, dest in enumerate(dests):
            fan_in, fan_out = modules[dest]
            piece = LayerDelta(dest, sources=[shown_name])
            if low is not None:
                if low.up.shape[0] % n:
                    raise LoraKeyError(f"{path.name}: fused qkv LoRA {shown_name} has {low.up.shape[0]} output rows, not a "
                                       "multiple of 3.")
                rows = low.up.shape[0] // n
                piece.low_rank = LowRank(low.down, low.up[i * rows:(i + 1) * rows].contiguous(), low.scale)
                got = (low.down.shape[1], rows)
            elif dense is not None:
                full_out, full_in = dense.full_shape
                if full_out % n:
                    raise LoraKeyError(f"{path.name}: fused qkv {shown_name} has {full_out} output rows, not a multiple of 3.")
                rows = full_out // n
                piece.dense = dense if n == 1 else dense.sliced(i * rows, (i + 1) * rows)
                got = (full_in, rows)
            else:
                got = None
            if got is not None and got != (fan_in, fan_out):
                raise LoraKeyError(
                    f"{path.name}: layer {dest} is {fan_in}->{fan_out} in this model but the LoRA has "
                    f"{got[0]}->{got[1]}: it was made for a different model size."
                )
            if bias is not None:
                if biased is not None and dest not in biased:
                    raise LoraKeyError(f"{path.name}: {keys['diff_b']} changes the bias of {dest}, a layer without a bias "
                                       "in this model; the file is made for another model.")
                if bias.shape[0] % n or bias.shape[0] // n != fan_out:
                    raise LoraKeyError(f"{path.name}: {keys['diff_b']} has {bias.shape[0]} values; layer {dest} has "
                                       f"{fan_out} outputs{' (x3 fused)' if n == 3 else ''}.")
                rows = bias.shape[0] // n
                piece.bias = bias[i * rows:(i + 1) * rows].contiguous()
            old = targets.get(dest)
            if old is None:
                targets[dest] = piece
                continue
            # Named twice (a fused qkv next to split q/k/v, `attention.out` next to `to_out.0`): redundant
            # copies of one change are read once; two different changes mean the file contradicts itself.
            if _same(old, piece):
                old.sources.append(shown_name)
                continue
            raise LoraKeyError(f"{path.name}: layer {dest} is changed twice with different values (by {old.sources[0]} "
                               f"and {shown_name}); the file is inconsistent, so it is not applied.")
    return ParsedLora(path, FileId.of(path), _detect_format(list(tensors)), targets,
                      sum(e.nbytes for e in entries), time.perf_counter() - t0, metadata)


class LoraFileCache:
    """Each LoRA file is read once (per size + mtime) and kept on the host."""

    def __init__(self, max_items: int = 16):
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, ParsedLora] = OrderedDict()
        self.max_items = max_items
        self.reads = 0

    def get(self, path: Path, modules: dict[str, tuple[int, int]], model_signature: str,
            biased: set[str] | None = None) -> tuple[ParsedLora, bool]:
        fid = FileId.of(path)
        key = (fid, model_signature)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit, True
        parsed = parse_lora(path, modules, biased)
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
