"""ComfyUI's quantised-layer files: recognised from the header, fp8 dequantised on load, the rest refused.

Comfy-Org publishes smaller variants of the model files (`qwen_3_4b_fp8_mixed.safetensors`,
`qwen_3_4b_fp4_mixed`, `z_image_turbo_nvfp4`, ...), and community fp8 checkpoints exist. Their layouts,
as ComfyUI reads them (comfy/ops.py `mixed_precision_ops`, comfy/utils.py `convert_old_quants`,
comfy/quant_ops.py, comfy/model_detection.py):

  * comfy_quant (current): a quantised layer stores `<layer>.weight` in the low-precision type, a
    `<layer>.comfy_quant` uint8 tensor holding UTF-8 JSON such as {"format": "float8_e4m3fn"}, for fp8
    a per-tensor fp32 `<layer>.weight_scale`, and optionally `<layer>.input_scale`. The same JSON may
    instead sit in the header metadata `_quantization_metadata` = {"layers": {layer: conf}}. Layers
    without an entry are full precision: "mixed" files keep embeddings, norms and some layers in bf16.
  * scaled_fp8 (older): a `scaled_fp8` marker tensor at the model's prefix (its dtype is the fp8 type;
    float32 means e4m3fn), `<layer>.scale_weight` (what comfy_quant calls weight_scale) and
    `<layer>.scale_input`.
  * plain fp8: fp8 weights without any scale; ComfyUI casts them (scale 1).

fp8 dequantises as `weight.float() * scale` (ComfyUI's TensorCoreFP8Layout.dequantize and
scaled_fp8_ops.convert_weight). Input scales only matter to an fp8 matrix multiply: after
dequantising they are unused, so they are not loaded.

What this pack does with them: fp8 weights are dequantised on load to the loader's dtype, so every
path downstream (LoRA merge, compile, offload, fp16 guards) sees ordinary weights. The gain is the
download and the disk (qwen_3_4b_fp8_mixed is about half of the bf16 file), not VRAM: kept in fp8,
Qwen3-4B's linear weights (3.53 B of the 3.92 B parameters loaded, 35 of its 36 layers) would take
one byte instead of two, 3.3 GiB less of its 7.3 GiB in bf16. The checker and the load log state the
figure for each file. Formats with block scales or 4-bit values (nvfp4, mxfp8, int8 and its ConvRot
variant, anything unknown) are refused with the file to use instead: this pack has neither kernels
nor a dequantiser for them, on any GPU or on the CPU.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from ..errors import ModelFileError
from .safetensors_io import TensorEntry, load_entries

log = logging.getLogger("zimage_turbo")

FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
FP8_DTYPES = frozenset(FP8_FORMATS.values())
# Formats ComfyUI writes that this pack does not run: what they are, for the refusal.
NOT_RUN = {
    "nvfp4": "NVFP4 (4-bit floats with fp8 block scales, made for the fp4 units of NVIDIA Blackwell GPUs)",
    "mxfp8": "MXFP8 (fp8 with per-block power-of-two scales)",
    "mxfp4": "MXFP4 (4-bit floats with per-block power-of-two scales)",
    "int8_tensorwise": "int8 (per-row scales; the ConvRot files also rotate the weights)",
    "int8": "8-bit integer weights without a format entry (bitsandbytes or another tool's layout)",
}
# The file of the same part this pack does run, per part.
INSTEAD = {
    "text_encoder": "qwen_3_4b_fp8_mixed.safetensors (fp8, dequantised on load) or qwen_3_4b.safetensors (bf16)",
    "transformer": "z_image_turbo_bf16.safetensors",
    "vae": "ae.safetensors",
}
PART_LABELS = {"text_encoder": "text encoder", "transformer": "diffusion model", "vae": "VAE"}
METADATA_KEY = "_quantization_metadata"
MARKER = "scaled_fp8"
# Per-layer tensors that belong to the quantisation, not to the model.
_LAYER_EXTRAS = (".comfy_quant", ".weight_scale", ".weight_scale_2", ".input_scale", ".scale_weight", ".scale_input")
# Prefixes a metadata layer name may have left out (ComfyUI's own files name layers with their prefix).
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


@dataclass(frozen=True)
class Quantization:
    """How a file's weights are stored. `style` None: no quantised layer, nothing to do."""

    style: str | None = None
    formats: dict[str, str] = field(default_factory=dict)  # layer (file name, no .weight) -> format
    scales: dict[str, TensorEntry] = field(default_factory=dict)  # fp8 weight name -> its scale tensor
    fp8_weights: frozenset[str] = frozenset()  # every fp8 tensor to dequantise (scaled or plain cast)
    extras: frozenset[str] = frozenset()  # tensor names that are not model weights

    @property
    def unrunnable(self) -> dict[str, str]:
        return {layer: fmt for layer, fmt in self.formats.items() if fmt not in FP8_FORMATS}

    def weights(self, entries: list[TensorEntry]) -> list[TensorEntry]:
        """The model's own tensors: markers, JSON entries and scales left out."""
        return [e for e in entries if e.name not in self.extras]

    def refusal(self, file: str, part: str) -> str | None:
        """The message for a file this pack cannot run, or None."""
        bad = self.unrunnable
        if not bad:
            return None
        fmt = sorted(set(bad.values()), key=lambda f: (f not in NOT_RUN, f))[0]
        layers = sorted(layer for layer, f in bad.items() if f == fmt)
        what = NOT_RUN.get(fmt, f"an unknown quantisation format {fmt!r} (from a newer ComfyUI than this pack knows)")
        return (f"{file}: {len(layers)} layers of this {PART_LABELS.get(part, part)} are stored as {fmt} "
                f"(e.g. {layers[0]}): {what}. This pack runs fp8 files (it dequantises them on load) but has no kernels "
                f"nor a dequantiser for {fmt}, on any GPU or on the CPU. Use {INSTEAD.get(part, 'the bf16 file')} instead.")

    def fp8_bytes_saved(self, entries: list[TensorEntry], itemsize: int = 2) -> int:
        """Bytes these fp8 weights would save on the device, kept in fp8 rather than dequantised to `itemsize`."""
        return sum(e.nbytes * (itemsize - 1) for e in entries if e.name in self.fp8_weights)

    def describe(self, entries: list[TensorEntry]) -> str | None:
        """One line for the checker, e.g. "ComfyUI comfy_quant: float8_e4m3fn in 14 of 22 weight matrices ..."."""
        if self.style is None:
            return None
        linear = [e for e in self.weights(entries) if e.name.endswith(".weight") and len(e.shape) == 2]
        counts: dict[str, int] = {}
        for fmt in self.formats.values():
            counts[fmt] = counts.get(fmt, 0) + 1
        plain = len([n for n in self.fp8_weights if n not in self.scales])
        if plain and not self.formats:
            counts["fp8 without scales (cast)"] = plain
        parts = ", ".join(f"{fmt} in {n}" for fmt, n in sorted(counts.items()))
        line = f"ComfyUI {self.style}: {parts} of {len(linear)} weight matrices (the rest full precision)"
        if not self.unrunnable and self.fp8_weights:
            line += (f"; dequantised to the loader's dtype on load (kept in fp8 they would take "
                     f"{_size(self.fp8_bytes_saved(entries))} less than in bf16)")
        return line


def _size(nbytes: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= div:
            return f"{nbytes / div:.2f} {unit}"
    return f"{nbytes} bytes"


# ------------------------------------------------------------------ reading the description


def _bad(file: str, problem: str) -> ModelFileError:
    return ModelFileError(f"{file}: {problem}. The file is corrupt or was written by an unknown tool: download it again.")


def _conf_format(file: str, layer: str, conf) -> str:
    if isinstance(conf, str):  # some converters write the bare format name
        return conf
    if isinstance(conf, dict) and isinstance(conf.get("format"), str):
        return conf["format"]
    raise _bad(file, f"the quantisation entry of layer {layer} names no format ({str(conf)[:80]})")


def _read_comfy_quant(file: str, entries: list[TensorEntry]) -> dict[str, str]:
    """layer -> format from the `<layer>.comfy_quant` tensors (a few bytes each: they are read)."""
    tagged = [e for e in entries if e.name.endswith(".comfy_quant")]
    for e in tagged:
        if e.dtype != torch.uint8 or len(e.shape) != 1 or e.nbytes > 65536:
            raise _bad(file, f"{e.name} is not a short uint8 tensor of JSON text")
    out = {}
    for name, tensor in load_entries(tagged, "cpu").items():
        layer = name[: -len(".comfy_quant")]
        try:
            conf = json.loads(tensor.numpy().tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _bad(file, f"{name} does not hold JSON text") from None
        out[layer] = _conf_format(file, layer, conf)
    return out


def _read_metadata(file: str, metadata: dict) -> dict[str, str]:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise _bad(file, f"the header's {METADATA_KEY} is not JSON") from None
    layers = parsed.get("layers") if isinstance(parsed, dict) else None
    if not isinstance(layers, dict):
        raise _bad(file, f"the header's {METADATA_KEY} has no \"layers\" object")
    return {str(layer): _conf_format(file, str(layer), conf) for layer, conf in layers.items()}


def _resolve(layer: str, names: dict[str, TensorEntry]) -> str | None:
    """The layer's name as the file's tensors spell it (metadata may leave the model prefix out)."""
    for prefix in ("",) + _PREFIXES:
        if f"{prefix}{layer}.weight" in names:
            return prefix + layer
    return None


def _check_scale(file: str, weight: TensorEntry, scale: TensorEntry) -> None:
    if not scale.dtype.is_floating_point:
        raise _bad(file, f"{scale.name} is {scale.dtype}, not a floating-point scale")
    n = 1
    for d in scale.shape:
        n *= d
    rows = weight.shape[0] if weight.shape else 1
    if n != 1 and (n != rows or len(scale.shape) > 2 or (len(scale.shape) == 2 and scale.shape[1] != 1)):
        raise _bad(file, f"{scale.name} has shape {list(scale.shape)} for a weight of shape {list(weight.shape)}: neither "
                         "one scale per tensor nor one per row")


def read_quantization(entries: list[TensorEntry], metadata: dict, file: str) -> Quantization:
    """How the file's weights are quantised, from its header (and its few bytes of comfy_quant JSON).

    Never refuses a format (see Quantization.refusal); raises ModelFileError for an inconsistent file.
    """
    names = {e.name: e for e in entries}
    marked = _read_metadata(file, metadata)
    from_tensors = _read_comfy_quant(file, entries)
    formats: dict[str, str] = {}
    for layer, fmt in {**marked, **from_tensors}.items():
        resolved = _resolve(layer, names)
        if resolved is None:
            raise _bad(file, f"layer {layer} is marked {fmt} but the file has no {layer}.weight")
        formats[resolved] = fmt

    markers = [e for e in entries if e.name == MARKER or e.name.endswith("." + MARKER)]
    scaled_fp8_type = None
    if markers:
        scaled_fp8_type = markers[0].dtype if markers[0].dtype in FP8_DTYPES else torch.float8_e4m3fn
    scale_key = {}  # weight name -> scale tensor name
    for e in entries:
        if e.name.endswith(".scale_weight"):  # scaled_fp8 (with or without its marker)
            layer = e.name[: -len(".scale_weight")]
            if f"{layer}.weight" not in names:
                raise _bad(file, f"{e.name} scales a weight the file does not have")
            if layer not in formats:
                fp8 = names[f"{layer}.weight"].dtype
                formats[layer] = next((f for f, d in FP8_FORMATS.items() if d == fp8),
                                      "float8_e5m2" if scaled_fp8_type == torch.float8_e5m2 else "float8_e4m3fn")
            scale_key[f"{layer}.weight"] = e.name
    for layer, fmt in formats.items():
        weight = names[f"{layer}.weight"]
        if fmt not in FP8_FORMATS:
            continue
        if weight.dtype != FP8_FORMATS[fmt]:
            raise _bad(file, f"layer {layer} is marked {fmt} but its weight is stored as {weight.dtype}")
        if f"{layer}.weight" not in scale_key:
            if f"{layer}.weight_scale" not in names:
                raise _bad(file, f"layer {layer} is marked {fmt} but has no {layer}.weight_scale")
            scale_key[f"{layer}.weight"] = f"{layer}.weight_scale"

    for e in entries:  # integer weights nobody described: some other tool's quantisation
        if e.name.endswith(".weight") and e.dtype in (torch.int8, torch.uint8) and e.name[: -len(".weight")] not in formats:
            formats[e.name[: -len(".weight")]] = "int8"

    extras = {e.name for e in markers}
    for e in entries:
        if e.name.endswith(_LAYER_EXTRAS):
            extras.add(e.name)
    scales = {}
    for weight, scale in scale_key.items():
        _check_scale(file, names[weight], names[scale])
        scales[weight] = names[scale]
    unrunnable_weights = {f"{layer}.weight" for layer, fmt in formats.items() if fmt not in FP8_FORMATS}
    fp8_weights = frozenset(e.name for e in entries if e.dtype in FP8_DTYPES and e.name not in extras
                            and e.name not in unrunnable_weights)

    if from_tensors:
        style = "comfy_quant"
    elif marked:
        style = f"comfy_quant (in the header's {METADATA_KEY})"
    elif markers or scale_key:
        style = "scaled_fp8"
    elif formats:
        style = "int8"
    elif fp8_weights:
        style = "fp8"
    else:
        style = None
    return Quantization(style, formats, scales, fp8_weights, frozenset(extras))


# ------------------------------------------------------------------ loading


def load_dequantized(
    entries: list[TensorEntry], quant: Quantization, device, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], int]:
    """Read `entries` (model tensors of the file, extras left out) onto `device` in `dtype`, fp8 ones dequantised.

    Returns the state dict and the bytes read. The safetensors reader streams the fp8 bytes as they
    are (one byte per weight: half the transfer of bf16); each fp8 weight is then widened on the
    device, in float32 for the multiply by its scale (as ComfyUI does), and stored in `dtype`. The
    peak is the dequantised model plus one float32 copy of its largest weight.
    """
    if not quant.fp8_weights:  # an ordinary file: the reader alone
        return load_entries(entries, device, dtype), sum(e.nbytes for e in entries)
    sd = load_entries(entries, device, dtype)
    scale_entries = [quant.scales[e.name] for e in entries if e.name in quant.scales]
    scales = load_entries(scale_entries, device)  # no dtype: fp32 scales stay fp32
    nbytes = sum(e.nbytes for e in entries) + sum(e.nbytes for e in scale_entries)
    done = 0
    for e in entries:
        if e.name not in quant.fp8_weights:
            continue
        w = sd[e.name].to(torch.float32)
        scale = quant.scales.get(e.name)
        if scale is not None:
            s = scales[scale.name].to(torch.float32)
            w.mul_(s.reshape(()) if s.numel() == 1 else s.reshape(-1, *([1] * (w.ndim - 1))))
        sd[e.name] = w.to(dtype)
        done += 1
    if done:
        saved = _size(quant.fp8_bytes_saved(entries, torch.empty((), dtype=dtype).element_size()))
        log.info("%d fp8 weights dequantised to %s on load (kept in fp8 they would take %s less)",
                 done, str(dtype).replace("torch.", ""), saved)
    return sd, nbytes
