"""A file checker: what is this file, and would this node pack use it?

`python -m zimage_turbo check FILE ...` (see __main__.py) answers "my LoRA does not load" without a
server. Each path gets a CheckResult: its kind (transformer, text encoder, VAE, LoRA, diffusers
folder, unknown), the details that matter for Z-Image-Turbo, and, when the engine would refuse
it, the reason in the engine's own words.

Big model files are classified from their safetensors header only (names, dtypes, shapes): a
12 GB transformer is never read. LoRAs are small and go through the engine's own parser
(`lora.parse_lora`) against the layers of a transformer: by default the released Z-Image-Turbo
(its layer names and shapes derived from `model_config.TRANSFORMER_CONFIG`, nothing allocated),
or the transformer in a given file (derived from its header through `key_maps`).
Original key names are read through diffusers' single-file converter, as the loader reads them (on
meta tensors: nothing is allocated). That costs the import of diffusers' single-file utilities once
per process (measured 7-13 s on a busy 2-core machine where importing torch took 5 s): the price of
one source of truth for the names (no model is built).
A quantised file's few bytes of `comfy_quant` JSON are read; everything else comes from the header.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import ZImageError
from ..lora.deltas import KIND_NAMES
from ..lora.lora_files import (
    _detect_format,
    _module_lookup,
    _norm,
    _split_key,
    parse_lora,
    peft_config,
    unsupported_kind,
)
from ..lora.trigger_words import read_trigger_words
from ..model_config import TEXT_ENCODER_CONFIG, TRANSFORMER_CONFIG
from . import key_maps, quantized
from .model_files import (
    text_encoder_config_from_weights,
    transformer_config_from_diffusers_shapes,
    vae_config_from_weights,
)
from .safetensors_io import TensorEntry, list_tensors, load_entries, read_header

KINDS = ("transformer", "text_encoder", "vae", "lora", "diffusers_folder", "unknown")
KIND_LABELS = {
    "transformer": "transformer (diffusion model)",
    "text_encoder": "text encoder",
    "vae": "VAE",
    "lora": "LoRA",
    "diffusers_folder": "diffusers folder",
    "unknown": "unknown",
}
ADALN_EMBED_DIM = 256  # diffusers' Z-Image: modulation input width is min(dim, 256)
T_EMBED_FREQ, T_EMBED_MID = 256, 1024  # its timestep embedder: 256 frequencies -> 1024 -> min(dim, 256)
RELEASED_SIZE_KEYS = ("dim", "n_layers", "n_refiner_layers", "cap_feat_dim", "in_channels")
_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.(.+)$")
_GROUP_NAMES = {"layers": "main blocks", "noise_refiner": "noise-refiner blocks",
                "context_refiner": "context-refiner blocks"}
_KIND_OF_LAYER = {
    "attention.to_q": ("attention", "q"), "attention.to_k": ("attention", "k"), "attention.to_v": ("attention", "v"),
    "attention.to_out.0": ("attention", "out"), "feed_forward.w1": ("feed-forward", "w1"),
    "feed_forward.w2": ("feed-forward", "w2"), "feed_forward.w3": ("feed-forward", "w3"),
    "adaLN_modulation.0": ("adaLN modulation", ""),
}
_PART_ORDER = {"attention": ("q", "k", "v", "out"), "feed-forward": ("w1", "w2", "w3"), "adaLN modulation": ("",)}
# Other models' files, recognised by a key fragment, for a helpful "unknown".
_FOREIGN_HINTS = (
    ("double_blocks.", "a Flux diffusion model"),
    ("single_transformer_blocks.", "a Flux diffusion model (diffusers keys)"),
    ("joint_blocks.", "an SD3 diffusion model"),
    ("input_blocks.", "a Stable Diffusion 1.x/SDXL UNet or checkpoint"),
    ("down_blocks.0.attentions.", "a Stable Diffusion UNet (diffusers keys)"),
)


# ------------------------------------------------------------------ results


@dataclass
class LoraInfo:
    format: str
    dtypes: list[str]
    ranks: list[int]
    alphas: list[float]  # empty: the file stores none (scale 1, as alpha = rank)
    layers_named: int  # distinct layers the file names
    layers_found: int  # of those, how many exist by name in the checked transformer
    model_layers_changed: int = 0  # layers of the model it changes (a fused qkv changes three)
    coverage: str = ""
    made_for_dim: int | None = None  # the transformer width its layers are sized for, when it shows
    checked_against: str = ""
    metadata: dict = field(default_factory=dict)  # base model / trigger words, where the file says
    kinds: list[str] = field(default_factory=list)  # lora / lokr / loha / diff
    trigger_words: list[str] = field(default_factory=list)  # what the LoRA Stack's trigger_words output gives


@dataclass
class TransformerInfo:
    layout: str  # "original" (ComfyUI, fused attention.qkv) or "diffusers"
    prefix: str
    dtypes: list[str]
    parameters: int
    dim: int | None = None
    n_layers: int | None = None
    n_refiner_layers: int | None = None
    n_heads: int | None = None
    cap_feat_dim: int | None = None
    in_channels: int | None = None
    released_size: bool = False
    quantized: str | None = None
    linear_layers: int = 0


@dataclass
class TextEncoderInfo:
    family: str  # "Qwen3", "Qwen2/Llama-style", "CLIP", "T5"
    dtypes: list[str]
    parameters: int
    layers: int | None = None
    hidden: int | None = None
    vocab: int | None = None
    qwen3_4b: bool = False
    quantized: str | None = None


@dataclass
class VaeInfo:
    layout: str  # "original" (Flux ae.safetensors names) or "diffusers"
    dtypes: list[str]
    parameters: int
    latent_channels: int | None = None
    block_out_channels: list[int] = field(default_factory=list)
    flux_vae: bool = False


@dataclass
class FolderInfo:
    components: dict = field(default_factory=dict)  # name -> CheckResult


@dataclass
class CheckResult:
    """What one checked path is, and whether the engine would use it (`error` says why not)."""

    file: str  # base name
    kind: str  # one of KINDS
    usable: bool
    error: str | None = None
    details: list[str] = field(default_factory=list)  # human-readable lines
    info: LoraInfo | TransformerInfo | TextEncoderInfo | VaeInfo | FolderInfo | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self, indent: str = "") -> list[str]:
        verdict = "usable" if self.usable else "REFUSED"
        out = [f"{indent}{self.file}: {KIND_LABELS[self.kind]}: {verdict}"]
        out += [f"{indent}  {line}" for line in self.details]
        if isinstance(self.info, FolderInfo):
            for part in self.info.components.values():
                out += part.lines(indent + "  ")
        if self.error:
            out.append(f"{indent}  why: {self.error}")
        return out


# ---------------------------------------------------- the reference transformer


@dataclass(frozen=True)
class Reference:
    """The transformer LoRAs are checked against: its LoRA-able layers, name -> (in, out)."""

    label: str
    config: dict
    layers: dict

    @property
    def biased(self) -> set[str]:
        return biased_layers(self.config)


def transformer_layers(cfg: dict) -> dict[str, tuple[int, int]]:
    """Every Linear of diffusers' ZImageTransformer2DModel built with `cfg`: name -> (in, out).

    The same names and sizes as `lora.linear_modules` of the real module (the tests compare
    both), derived from the config alone so no model is built and diffusers is not imported.
    """
    dim, in_ch = cfg["dim"], cfg["in_channels"]
    inner = dim // cfg["n_heads"] * cfg["n_heads"]
    hidden, ada = int(dim / 3 * 8), min(dim, ADALN_EMBED_DIM)
    block = {
        "attention.to_q": (dim, inner), "attention.to_k": (dim, inner), "attention.to_v": (dim, inner),
        "attention.to_out.0": (inner, dim),
        "feed_forward.w1": (dim, hidden), "feed_forward.w2": (hidden, dim), "feed_forward.w3": (dim, hidden),
    }
    out: dict[str, tuple[int, int]] = {}
    for p, f in zip(cfg["all_patch_size"], cfg["all_f_patch_size"]):
        out[f"all_x_embedder.{p}-{f}"] = (f * p * p * in_ch, dim)
        out[f"all_final_layer.{p}-{f}.linear"] = (dim, p * p * f * in_ch)
        out[f"all_final_layer.{p}-{f}.adaLN_modulation.1"] = (ada, dim)
    for group, count, modulated in (("noise_refiner", cfg["n_refiner_layers"], True),
                                    ("context_refiner", cfg["n_refiner_layers"], False),
                                    ("layers", cfg["n_layers"], True)):
        for i in range(count):
            out.update({f"{group}.{i}.{name}": shape for name, shape in block.items()})
            if modulated:
                out[f"{group}.{i}.adaLN_modulation.0"] = (ada, 4 * dim)
    out["t_embedder.mlp.0"] = (T_EMBED_FREQ, T_EMBED_MID)
    out["t_embedder.mlp.2"] = (T_EMBED_MID, ada)
    out["cap_embedder.1"] = (cfg["cap_feat_dim"], dim)
    return out


def biased_layers(cfg: dict) -> set[str]:
    """The Linears of `transformer_layers(cfg)` that have a bias (where a LoRA's diff_b can land): the
    embedders, the final layer and every adaLN modulation; attention and feed-forward have none."""
    return {name for name in transformer_layers(cfg)
            if not re.search(r"\.(attention|feed_forward)\.", name)}


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _size_text(cfg: dict) -> str:
    return f"dim {cfg['dim']}, {_n(cfg['n_layers'], 'layer')}"


def released_reference() -> Reference:
    return Reference(f"the released Z-Image-Turbo transformer ({_size_text(TRANSFORMER_CONFIG)})",
                     dict(TRANSFORMER_CONFIG), transformer_layers(TRANSFORMER_CONFIG))


def reference_from(path: Path) -> Reference:
    """The transformer in `path` (a file, or a diffusers folder): ZImageError if it holds none usable."""
    path = Path(path)
    result, layers, cfg = _check_path(path, released_reference())
    info = result.info
    if isinstance(info, FolderInfo) and "transformer" in info.components:
        info = info.components["transformer"].info
    if not isinstance(info, TransformerInfo) or layers is None or cfg is None or (info.quantized and not result.usable):
        reason = result.error or f"it is a {KIND_LABELS[result.kind]}, not a Z-Image transformer"
        raise ZImageError(f"{result.file}: cannot check LoRAs against this file: {reason}")
    return Reference(f"{result.file} ({_size_text(cfg)})", cfg, layers)


# ---------------------------------------------------------------- helpers


def _dtype_name(dtype: torch.dtype) -> str:
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
             torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}
    return short.get(dtype, str(dtype).replace("torch.", ""))


def _dtypes(entries: list[TensorEntry]) -> list[str]:
    counts = Counter(_dtype_name(e.dtype) for e in entries)
    return [name for name, _ in counts.most_common()]


def _dtype_text(entries: list[TensorEntry]) -> str:
    counts = Counter(_dtype_name(e.dtype) for e in entries)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{name} ({n} tensors)" for name, n in counts.most_common())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _count_text(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit} parameters ({n:,})"
    return f"{n} parameters"


def _ranges(indices) -> str:
    idx = sorted(indices)
    parts, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def _meta(entries: list[TensorEntry]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins for the file's tensors (meta device: nothing is allocated or read)."""
    return {e.name: torch.empty(e.shape, dtype=torch.float32, device="meta") for e in entries}


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _linear_layers(diffusers_sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """The Linear layers a diffusers-named transformer state dict holds: `<module>.weight` of 2 dims."""
    return {k[: -len(".weight")]: (v.shape[1], v.shape[0]) for k, v in diffusers_sd.items()
            if k.endswith(".weight") and v.ndim == 2 and "." in k[: -len(".weight")]}


def _incomplete_blocks(names, prefix: str) -> str | None:
    """Blocks `prefix`N. must all hold the same weights: name the first that does not."""
    blocks: dict[int, set[str]] = {}
    for n in names:
        if n.startswith(prefix):
            idx, _, rest = n[len(prefix):].partition(".")
            if idx.isdigit():
                blocks.setdefault(int(idx), set()).add(rest)
    if not blocks:
        return None
    count = max(blocks) + 1
    full = set().union(*blocks.values())
    for i in range(count):
        lacking = sorted(full - blocks.get(i, set()))
        if lacking:
            return f"{prefix}{i} lacks {len(lacking)} weights (e.g. {prefix}{i}.{lacking[0]})"
    return None


def _quantization(name: str, part: str, entries: list[TensorEntry], metadata: dict):
    """(model tensors, description or None, refusal or None): the engine's own reading of ComfyUI's quantised layers."""
    try:
        quant = quantized.read_quantization(entries, metadata, name)
    except ZImageError as exc:
        return entries, "unreadable quantisation entries", str(exc)
    return quant.weights(entries), quant.describe(entries), quant.refusal(name, part)


def _in_diffusers_folder(path: Path) -> Path | None:
    """The diffusers folder whose component folder holds `path`, if any."""
    parent = path.parent
    if parent.name in ("transformer", "text_encoder", "vae") and (parent.parent / "model_index.json").is_file():
        return parent.parent
    return None


# ------------------------------------------------------------ classification


# Every key that _split_key or unsupported_kind recognises contains one of these. Testing them once on all
# the names (joined) lets a model file with hundreds of tensors skip the key-by-key LoRA test: the loader's file
# lists classify every file of three model folders.
_MAYBE_ADAPTER_KEY = re.compile(r"lora|lokr_|hada_|\.alpha$|\.diff(_b)?$|dora_scale|oft_|w_norm|b_norm", re.M)


def _classify(names: list[str]) -> str:
    if _MAYBE_ADAPTER_KEY.search("\n".join(names)):
        for n in names:
            split = _split_key(n)
            if (split is not None and split[1] != "alpha") or unsupported_kind(n):
                return "lora"
    stripped = [key_maps.strip_transformer_prefix(n) for n in names]
    if any(re.match(r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention|feed_forward)\.", s) for s in stripped):
        return "transformer"
    if any(fragment in n for n in names for fragment, _ in _FOREIGN_HINTS):
        return "unknown"
    # Embedders alone (a shard, a cut file) after the hints: SD3's and other DiTs' files have a t_embedder too.
    if any(s.startswith(("cap_embedder.", "all_x_embedder.", "t_embedder.")) for s in stripped):
        return "transformer"
    if any(re.match(r"^(model\.)?(embed_tokens\.|layers\.\d+\.self_attn\.)", n) for n in names):
        return "text_encoder"
    if any(n.startswith(("text_model.", "encoder.block.")) or ".text_model." in n for n in names):
        return "text_encoder"
    vae_names = {_strip_vae_prefix(n)[0] for n in names}
    if "encoder.conv_in.weight" in vae_names and "decoder.conv_in.weight" in vae_names:
        return "vae"
    return "unknown"


def _strip_vae_prefix(name: str) -> tuple[str, str]:
    for p in ("first_stage_model.", "vae."):
        if name.startswith(p):
            return name[len(p):], p
    return name, ""


# ------------------------------------------------------------------ LoRAs


def _check_lora(path: Path, entries: list[TensorEntry], metadata: dict, ref: Reference):
    """(usable, error, info, details) of a LoRA file, parsed by the engine against `ref`'s layers."""
    names = [e.name for e in entries]
    adapter = next((kind for n in names if (kind := unsupported_kind(n))), None)
    fmt = adapter or _detect_format(names)
    named: dict[str, str] = {}  # normalised module -> module as the file names it
    ranks, alpha_entries = set(), []
    for e in entries:
        split = _split_key(e.name)
        if split is None:
            continue
        module, role = split
        if role == "alpha":
            alpha_entries.append(e)
            continue
        named.setdefault(_norm(module), module)
        if role == "down" and len(e.shape) == 2:
            ranks.add(e.shape[0])
    alpha_values = load_entries(alpha_entries, "cpu").values()  # a few scalars
    alphas = sorted({round(float(t.float().reshape(-1)[0]), 6) for t in alpha_values if t.numel()})
    alpha_where = ""
    conf_alpha = (peft_config(metadata) or {}).get("lora_alpha")
    if not alphas and isinstance(conf_alpha, (int, float)) and not isinstance(conf_alpha, bool):
        alphas, alpha_where = [float(conf_alpha)], " in lora_adapter_metadata"  # diffusers keeps it there
    lookup = _module_lookup(ref.layers)
    found = sum(1 for n in named if n in lookup)
    made_for = None
    for e in entries:
        split = _split_key(e.name)
        if split and split[1] == "down" and len(e.shape) == 2 and re.search(r"attention[._](to_out[._]0|out)$", split[0]):
            made_for = e.shape[1]
            break
    info = LoraInfo(fmt, _dtypes(entries), sorted(ranks), alphas, len(named), found,
                    made_for_dim=made_for, checked_against=ref.label, metadata=_lora_metadata(metadata))
    try:
        found_words = read_trigger_words(path)
    except ZImageError:
        found_words = None
    if found_words:
        info.trigger_words = list(found_words.words)
        info.metadata["trigger words"] = f"{', '.join(found_words.words)} (from {found_words.source})"

    usable, error = True, None
    try:
        parsed = parse_lora(path, ref.layers, ref.biased)
        info.model_layers_changed = len(parsed.targets)
        info.coverage = _coverage(parsed.targets, ref.layers)
        info.ranks = parsed.ranks
        info.kinds = parsed.kinds
    except ZImageError as exc:
        usable, error = False, str(exc)

    details = [f"key format: {fmt}; dtype: {', '.join(info.dtypes)}"]
    dense = [KIND_NAMES[k] for k in info.kinds if k != "lora"]
    if dense:
        details.append(f"{' + '.join(dense)}: whole-matrix changes, merged into the weights when the stack runs (refused "
                       "in the low_vram memory mode, where the weights stream)")
    if info.ranks:
        scale = ""
        if not alphas:
            scale = "; no alpha stored (scale 1)"
        else:
            a_text = "/".join(f"{a:g}" for a in alphas)
            scale = f"; alpha {a_text}{alpha_where}"
            if len(alphas) == 1 and len(info.ranks) == 1:
                scale += f" (scale alpha/rank = {alphas[0] / info.ranks[0]:g})"
        details.append(f"rank {'/'.join(map(str, info.ranks))}{scale}")
    if usable:
        line = f"matches {found} of {len(named)} layers it names"
        if info.model_layers_changed != len(named):
            line += f" ({info.model_layers_changed} layers of the model: a fused qkv feeds q, k and v)"
        details.append(f"{line}; covers {info.coverage}")
    elif named:
        details.append(f"{found} of {len(named)} layers it names exist in the transformer")
        if made_for is not None and made_for != ref.config["dim"]:
            details.append(f"its layers are sized for a transformer of dim {made_for}; "
                           f"the one checked against has dim {ref.config['dim']}")
    details.append(f"checked against: {ref.label}")
    for key, value in info.metadata.items():
        details.append(f"{key}: {value}")
    return usable, error, info, details


def _lora_metadata(metadata: dict) -> dict:
    out = {}
    base = metadata.get("modelspec.architecture") or metadata.get("ss_base_model_version")
    if base:
        out["made for (metadata)"] = str(base)[:80]
    if metadata.get("ss_tag_frequency"):
        try:
            tags: Counter = Counter()
            for per_dir in json.loads(metadata["ss_tag_frequency"]).values():
                tags.update({str(t).strip(): int(n) for t, n in per_dir.items()})
            top = [t for t, _ in tags.most_common(5) if t]
            if top:
                out["most frequent training tags"] = ", ".join(top)[:120]
        except (ValueError, TypeError, AttributeError):
            pass
    return out


def _coverage(targets, model_layers: dict) -> str:
    """E.g. "attention q/k/v/out and feed-forward of all 30 main blocks"."""
    per_group: dict[str, dict[str, set[int]]] = {}  # group -> kind -> block indices
    parts: dict[tuple[str, str], set[str]] = {}  # (group, kind) -> parts present
    others = []
    for name in targets:
        m = _BLOCK.match(name)
        kind = _KIND_OF_LAYER.get(m.group(3)) if m else None
        if kind is None:
            others.append(name)
            continue
        group, idx = m.group(1), int(m.group(2))
        per_group.setdefault(group, {}).setdefault(kind[0], set()).add(idx)
        parts.setdefault((group, kind[0]), set()).add(kind[1])
    totals = Counter()
    for name in model_layers:
        m = _BLOCK.match(name)
        if m and m.group(3) == "attention.to_q":
            totals[m.group(1)] += 1
    phrases = []
    for group in ("layers", "noise_refiner", "context_refiner"):
        kinds = per_group.get(group)
        if not kinds:
            continue
        by_blocks: dict[tuple[int, ...], list[str]] = {}
        for kind, order in _PART_ORDER.items():
            if kind not in kinds:
                continue
            have = [p for p in order if p in parts[(group, kind)]]
            whole = len(have) == len(order) and kind != "attention"
            label = kind if whole else f"{kind} {'/'.join(have)}".strip()
            by_blocks.setdefault(tuple(sorted(kinds[kind])), []).append(label)
        for blocks, labels in by_blocks.items():
            total = totals[group]
            where = f"all {total}" if len(blocks) == total else f"{len(blocks)} of {total} ({_ranges(blocks)})"
            phrases.append(f"{' and '.join(labels)} of {where} {_GROUP_NAMES[group]}")
    if others:
        phrases.append("also " + ", ".join(sorted(others)[:4]) + (f" (+{len(others) - 4})" if len(others) > 4 else ""))
    return "; ".join(phrases) or "nothing"


# --------------------------------------------------------- model components


def _check_transformer(name: str, entries: list[TensorEntry], metadata: dict, in_folder: bool):
    """(usable, error, info, details, diffusers-named linear layers or None, config or None)."""
    all_entries = entries
    entries, quant_text, refusal = _quantization(name, "transformer", entries, metadata)
    stripped = {key_maps.strip_transformer_prefix(e.name) for e in entries}
    prefix = next((p for p in key_maps.TRANSFORMER_PREFIXES if any(e.name.startswith(p) for e in entries)), "")
    original = any(".attention.qkv." in s or s.startswith(("final_layer.", "x_embedder.")) for s in stripped)
    layout = "original" if original else "diffusers"
    used = [e for e in entries if key_maps.strip_transformer_prefix(e.name) != "norm_final.weight"]
    info = TransformerInfo(layout, prefix, _dtypes(entries), sum(_numel(e.shape) for e in used))
    errors: list[str] = []
    layers = cfg = None

    if prefix:
        strays = [e.name for e in all_entries if not e.name.startswith(prefix) and e.name not in
                  (quantized.MARKER, quantized.METADATA_KEY)]
        if strays:
            errors.append(f"{name}: besides the diffusion model it holds {len(strays)} other tensors (e.g. {strays[0]}): "
                          "an all-in-one checkpoint. This pack loads the three split files (diffusion model, text "
                          "encoder, VAE): use z_image_turbo_bf16.safetensors.")
    info.quantized = quant_text
    if refusal:
        errors.append(refusal)
    try:
        meta = _meta(entries)
        # Original names go through diffusers' single-file converter, as the loader does.
        diff_sd = key_maps.transformer_to_diffusers(meta) if original else meta
        cfg = transformer_config_from_diffusers_shapes(_shapes(diff_sd), name)
    except ZImageError as exc:
        errors.append(str(exc))
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        errors.append(f"{name}: incomplete Z-Image transformer (no {str(exc).strip(chr(39))}): a shard of a sharded "
                      "model, or a file cut short: download it again.")
    if cfg is not None:
        info.dim, info.n_layers, info.n_refiner_layers = cfg["dim"], cfg["n_layers"], cfg["n_refiner_layers"]
        info.n_heads, info.cap_feat_dim, info.in_channels = cfg["n_heads"], cfg["cap_feat_dim"], cfg["in_channels"]
        info.released_size = all(cfg[k] == TRANSFORMER_CONFIG[k] for k in RELEASED_SIZE_KEYS)
        layers = _linear_layers(diff_sd)
        info.linear_layers = len(layers)
        if not refusal:
            expected = transformer_layers(cfg)
            missing = sorted(expected.keys() - layers.keys())
            unknown = sorted(layers.keys() - expected.keys())
            wrong = sorted(k for k in expected.keys() & layers.keys() if expected[k] != layers[k])
            gaps = (_incomplete_blocks(stripped, p) for p in ("layers.", "noise_refiner.", "context_refiner."))
            gap = next(filter(None, gaps), None)
            if missing or gap:
                what = gap or f"missing {len(missing)} layers (e.g. {', '.join(missing[:3])})"
                errors.append(f"{name}: incomplete Z-Image transformer: {what}. A shard of a sharded model or a file "
                              "cut short: download it again.")
            if unknown:
                errors.append(f"{name}: {len(unknown)} layers Z-Image-Turbo does not have (e.g. {', '.join(unknown[:3])}): "
                              "another model of the family, or a merged file; the loader refuses it.")
            if wrong:
                k = wrong[0]
                errors.append(f"{name}: layer {k} is {layers[k][0]}->{layers[k][1]}, a Z-Image transformer of "
                              f"dim {cfg['dim']} has {expected[k][0]}->{expected[k][1]}: the file is inconsistent.")
    if layout == "diffusers" and not in_folder and not errors:
        errors.append(f"{name}: transformer weights with diffusers key names: the loader reads those only inside a "
                      "diffusers folder (transformer/ next to model_index.json, in models/diffusers). For "
                      "models/diffusion_models use ComfyUI's file with the original keys (z_image_turbo_bf16.safetensors).")

    lay = ("ComfyUI/original keys (fused attention.qkv)" if original else "diffusers keys (separate to_q/to_k/to_v)")
    details = [f"key layout: {lay}" + (f", prefix {prefix!r}" if prefix else "")]
    details.append(f"dtype: {_dtype_text(entries)}; {_count_text(info.parameters)}")
    if info.quantized:
        details.append(f"quantised: {info.quantized}")
    if cfg is not None:
        size = (f"dim {cfg['dim']}, {_n(cfg['n_layers'], 'layer')}, {_n(cfg['n_refiner_layers'], 'refiner layer')}, "
                f"{_n(cfg['n_heads'], 'head')}, text features {cfg['cap_feat_dim']}")
        if info.released_size:
            details.append(f"{size}: the released Z-Image-Turbo size")
        else:
            details.append(f"{size}: another size, not the released Z-Image-Turbo ({_size_text(TRANSFORMER_CONFIG)}); "
                           "LoRAs made for the released model do not fit it")
    return not errors, (" ".join(errors) or None), info, details, layers, cfg


def _check_text_encoder(name: str, entries: list[TensorEntry], metadata: dict, ref: Reference):
    entries, quant_text, refusal = _quantization(name, "text_encoder", entries, metadata)
    names = [e.name for e in entries]
    info = TextEncoderInfo("", _dtypes(entries), sum(_numel(e.shape) for e in entries))
    error = None
    mapped = {key_maps.text_encoder_file_name_to_model(e.name): e.shape for e in entries}
    mapped.pop(None, None)
    if any(n.startswith("text_model.") or ".text_model." in n for n in names):
        info.family = "CLIP"
    elif any(n.startswith("encoder.block.") for n in names):
        info.family = "T5"
    elif "layers.0.self_attn.q_norm.weight" in mapped:
        info.family = "Qwen3"
    else:
        info.family = "Qwen2/Llama-style (no q_norm)"
    details = []
    size_4b = (TEXT_ENCODER_CONFIG["num_hidden_layers"], TEXT_ENCODER_CONFIG["hidden_size"])
    needs = f"Z-Image needs Qwen3-4B (qwen_3_4b.safetensors: {size_4b[0]} layers, hidden {size_4b[1]})"
    if info.family in ("CLIP", "T5"):
        error = f"{name}: a {info.family} text encoder (Stable Diffusion / Flux); {needs}."
    else:
        try:
            cfg = text_encoder_config_from_weights(mapped, name)
            info.layers, info.hidden, info.vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
            info.qwen3_4b = (info.layers, info.hidden) == size_4b
        except ZImageError as exc:
            error = f"{exc} {needs}."
        except (KeyError, IndexError, ValueError) as exc:
            error = f"{name}: incomplete text encoder ({type(exc).__name__}: {exc}); download it again."
    info.quantized = quant_text
    errors = [error] if error else []
    if refusal:
        errors.append(refusal)
    if info.hidden is not None:
        gap = _incomplete_blocks(mapped, "layers.")
        if gap:
            errors.append(f"{name}: incomplete text encoder: {gap}. Download it again.")
        if info.hidden != ref.config["cap_feat_dim"]:
            errors.append(f"{name}: its hidden size {info.hidden} does not fit {ref.label}, which takes "
                          f"{ref.config['cap_feat_dim']}-wide text features. {needs}.")
    size = f", {info.layers} layers, hidden {info.hidden}, vocabulary {info.vocab}" if info.hidden else ""
    details.append(info.family + size)
    details.append(f"dtype: {_dtype_text(entries)}; {_count_text(info.parameters)}")
    if info.quantized:
        details.append(f"quantised: {info.quantized}")
    if info.hidden is not None:
        details.append("the Qwen3-4B Z-Image-Turbo uses" if info.qwen3_4b else "not Qwen3-4B (another size)")
    return not errors, (" ".join(errors) or None), info, details


def _check_vae(name: str, entries: list[TensorEntry], ref: Reference, in_folder: bool):
    shapes, prefixes = {}, set()
    for e in entries:
        n, p = _strip_vae_prefix(e.name)
        shapes[n] = e.shape
        prefixes.add(p)
    layout = "diffusers" if any(".down_blocks." in n or n.startswith("encoder.down_blocks.") for n in shapes) else "original"
    info = VaeInfo(layout, _dtypes(entries), sum(_numel(e.shape) for e in entries))
    errors = []
    info.latent_channels = shapes["decoder.conv_in.weight"][1]
    try:
        if layout == "original":
            info.block_out_channels = list(vae_config_from_weights(shapes, name)["block_out_channels"])
        else:
            n_blocks = len({n.split(".")[2] for n in shapes if n.startswith("encoder.down_blocks.")})
            info.block_out_channels = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n_blocks)]
    except ZImageError as exc:
        errors.append(str(exc))
    except (KeyError, IndexError, ValueError) as exc:
        errors.append(f"{name}: incomplete VAE ({type(exc).__name__}: {exc}); download it again.")
    need = ref.config["in_channels"]
    info.flux_vae = info.latent_channels == 16 and "quant_conv.weight" not in shapes
    if info.latent_channels != need:
        errors.insert(0, f"{name}: a VAE with {info.latent_channels} latent channels (e.g. an SD/SDXL VAE): not the Flux "
                         f"VAE Z-Image needs ({need} latent channels): use ae.safetensors.")
    elif "quant_conv.weight" in shapes:
        errors.append(f"{name}: this VAE has quant_conv layers, the Flux VAE Z-Image uses has none: use ae.safetensors.")
    if prefixes - {""}:
        errors.append(f"{name}: VAE keys carry the prefix {min(prefixes - {''})!r} (taken from a checkpoint): the "
                      "loader needs the plain VAE file: use ae.safetensors.")
    if layout == "diffusers" and not in_folder:
        errors.append(f"{name}: VAE weights with diffusers key names: the loader reads those only inside a diffusers "
                      "folder; for models/vae use ae.safetensors (original keys).")
    lay = "original (the key names of Flux ae.safetensors)" if layout == "original" else "diffusers AutoencoderKL"
    details = [f"key layout: {lay}",
               f"dtype: {_dtype_text(entries)}; {_count_text(info.parameters)}",
               f"latent channels {info.latent_channels}, block channels {info.block_out_channels}"
               + (": Flux-style AutoencoderKL, as Z-Image needs" if info.flux_vae else "")]
    return not errors, (" ".join(errors) or None), info, details


def _unknown_details(names: list[str]) -> list[str]:
    for fragment, what in _FOREIGN_HINTS:
        if any(fragment in n for n in names):
            return [f"looks like {what}, not a Z-Image file"]
    return [f"{len(names)} tensors, e.g. {', '.join(names[:3])}"] if names else ["no tensors"]


# ------------------------------------------------------------ the entry point


def check_file(path: Path, reference: Reference | None = None) -> CheckResult:
    """Check one file or diffusers folder; never raises for a bad file (the result says what is wrong)."""
    result, _, _ = _check_path(Path(path), reference or released_reference())
    return result


def check_files(paths, model: Path | None = None) -> list[CheckResult]:
    """Check several paths against the released transformer or the transformer in `model`
    (`reference_from` raises ZImageError when `model` is not a usable transformer)."""
    ref = reference_from(Path(model)) if model is not None else released_reference()
    return [check_file(Path(p), ref) for p in paths]


def _check_path(path: Path, ref: Reference):
    name = path.name or str(path)
    try:
        if path.is_dir():
            return _check_folder(path, ref)
        if not path.exists():
            return CheckResult(name, "unknown", False, f"{name}: file not found."), None, None
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return CheckResult(name, "unknown", False,
                               f"{name}: a GGUF file (quantised, for the ComfyUI-GGUF nodes); this pack loads .safetensors "
                               "files only."), None, None
        header, _ = read_header(path)
        entries = list_tensors(path)
        metadata = header.get("__metadata__") or {}
        folder = _in_diffusers_folder(path)
        if folder is not None and path.parent.name in ("transformer", "vae", "text_encoder"):
            shards = sorted(path.parent.glob("*.safetensors"))
            if len(shards) > 1:  # one shard of a component: check it with its siblings
                entries = [e for f in shards for e in list_tensors(f)]
        result, layers, cfg = _check_entries(path, name, entries, metadata, ref, folder is not None)
        if folder is not None and result.kind != "lora":
            result.details.append(f"part of the diffusers folder {folder.name}: the loader reads the whole folder")
        return result, layers, cfg
    except ZImageError as exc:
        return CheckResult(name, "unknown", False, str(exc)), None, None
    except OSError as exc:
        return CheckResult(name, "unknown", False, f"{name}: cannot be read ({exc.strerror or exc})."), None, None
    except Exception as exc:  # noqa: BLE001 -- a file odd enough to trip the checker itself: report it, check the others
        error = f"{name}: could not be checked ({type(exc).__name__}: {exc})."
        return CheckResult(name, "unknown", False, error), None, None


def _check_entries(path: Path, name: str, entries, metadata: dict, ref: Reference, in_folder: bool, kind: str | None = None):
    names = [e.name for e in entries]
    kind = kind or _classify(names)
    layers = cfg = None
    if kind == "lora":
        usable, error, info, details = _check_lora(path, entries, metadata, ref)
    elif kind == "transformer":
        usable, error, info, details, layers, cfg = _check_transformer(name, entries, metadata, in_folder)
    elif kind == "text_encoder":
        usable, error, info, details = _check_text_encoder(name, entries, metadata, ref)
    elif kind == "vae":
        usable, error, info, details = _check_vae(name, entries, ref, in_folder)
    else:
        usable, info, details = False, None, _unknown_details(names)
        error = (f"{name}: not a Z-Image transformer, text encoder, VAE or LoRA"
                 f"{' (the file holds no tensors)' if not names else ''}.")
    return CheckResult(name, kind, usable, error, details, info), layers, cfg


def _check_folder(root: Path, ref: Reference):
    name = root.name
    if not (root / "model_index.json").is_file():
        return CheckResult(name, "unknown", False, f"{name}: a folder, but not a diffusers model folder (no "
                           "model_index.json)."), None, None
    parts: dict[str, CheckResult] = {}
    layers = cfg = None
    folder_ref = ref
    for part, kind in (("transformer", "transformer"), ("text_encoder", "text_encoder"), ("vae", "vae")):
        sub = root / part
        label = f"{part}/"
        files = sorted(sub.glob("*.safetensors")) if sub.is_dir() else []
        if not files:
            pickles = [p.name for p in sub.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth")] if sub.is_dir() else []
            why = (f"only pickle weights ({pickles[0]}), refused because loading them can run code" if pickles
                   else "no .safetensors weights" if sub.is_dir() else "missing")
            parts[part] = CheckResult(label, kind, False, f"{name}/{label}: {why}.")
            continue
        if not (sub / "config.json").is_file():
            parts[part] = CheckResult(label, kind, False, f"{name}/{label}: no config.json.")
            continue
        try:
            entries = [e for f in files for e in list_tensors(f)]
        except ZImageError as exc:
            parts[part] = CheckResult(label, kind, False, str(exc))
            continue
        found = _classify([e.name for e in entries])
        if found != kind:
            error = f"{name}/{label}: holds a {KIND_LABELS[found]}, not a {KIND_LABELS[kind]}."
            parts[part] = CheckResult(label, found, False, error)
            continue
        result, part_layers, part_cfg = _check_entries(sub, label, entries, {}, folder_ref, True, kind)
        if len(files) > 1:
            result.details.insert(0, f"{len(files)} shards")
        parts[part] = result
        if part == "transformer" and part_cfg is not None:
            layers, cfg = part_layers, part_cfg
            # The folder's own transformer decides what its text encoder and VAE must fit.
            folder_ref = Reference(f"this folder's transformer ({_size_text(part_cfg)})", part_cfg, part_layers)
    tok = root / "tokenizer"
    if not ((tok / "tokenizer.json").is_file() or ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())):
        parts["tokenizer"] = CheckResult("tokenizer/", "unknown", False,
                                         f"{name}/tokenizer/: no tokenizer files (tokenizer.json, or vocab.json + "
                                         "merges.txt).")
    usable = all(r.usable for r in parts.values())
    bad = [f"{p}" for p, r in parts.items() if not r.usable]
    error = None if usable else f"{name}: the diffusers folder's {', '.join(bad)} cannot be used (see above)."
    return CheckResult(name, "diffusers_folder", usable, error, [], FolderInfo(parts)), layers, cfg
