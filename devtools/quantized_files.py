"""Writing model files in ComfyUI's quantised-layer formats, for tests and bug reports without real weights.

Takes a split file of the tiny (or any) model, usually its text encoder, and writes it the way
Comfy-Org's smaller variants are written (the formats are described in engine/files/quantized.py):

  write_fp8_mixed(src, out)      `qwen_3_4b_fp8_mixed`-style: per-layer `comfy_quant` JSON tensors,
                                 fp8 weights with per-tensor fp32 `weight_scale`; embeddings, norms and
                                 the blocks in `keep_blocks` stay in the source precision
  write_fp8_mixed(..., json_in_header=True)
                                 the same with the JSON in the header's `_quantization_metadata`
  write_scaled_fp8(src, out)     the older layout: a `scaled_fp8` marker, `scale_weight`, `scale_input`
  write_plain_fp8(src, out)      fp8 weights without scales (a plain cast, as community files have)
  write_nvfp4_sample(src, out)   NVFP4 layers, shaped as ComfyUI stores them, for the refusal path
  write_cast(src, out, dtype)    the same file in another dtype (e.g. the bf16 source of the above)

fp8 quantisation is ComfyUI's (comfy/quant_ops.py TensorCoreFP8Layout.quantize): one scale per tensor,
scale = amax / finfo(fp8).max, stored = weight / scale rounded to fp8 (here in float32, clamped).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_TYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
# Linear weights of a block: Qwen3's `model.layers.N.self_attn/mlp.*`, Z-Image's `layers.N.attention/feed_forward.*`
# (any prefix). Embeddings, norms, modulation and the layers outside the blocks stay in the source precision.
_BLOCK_LINEAR = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp|attention|feed_forward)\.[^.]+\.weight$")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # the magnitudes an fp4 (e2m1) value can take


def _linear_layers(sd: dict[str, torch.Tensor], keep_blocks=()) -> list[str]:
    """Layer names (without `.weight`) of the block linears to quantise, blocks in `keep_blocks` left out."""
    out = []
    for name, t in sd.items():
        m = _BLOCK_LINEAR.search(name)
        if m and t.ndim == 2 and int(m.group(1)) not in keep_blocks:
            out.append(name[: -len(".weight")])
    return out


def quantize_fp8(weight: torch.Tensor, fmt: str = "float8_e4m3fn") -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scalar scale) with weight ≈ fp8.float() * scale."""
    dtype = FP8_TYPES[fmt]
    top = torch.finfo(dtype).max
    w = weight.to(torch.float32)
    scale = (w.abs().amax() / top).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-top, top).to(dtype), scale.reshape(())


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What a loader must make of a quantize_fp8 result (ComfyUI: weight.float() * scale)."""
    return q.to(torch.float32) * scale.to(torch.float32)


def _json_tensor(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def _save(sd: dict[str, torch.Tensor], out: Path, metadata: dict | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out), metadata={"format": "pt", **(metadata or {})})
    return out


def write_cast(src: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    sd = load_file(str(src))
    return _save({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, out)


def write_fp8_mixed(src: Path, out: Path, fmt: str = "float8_e4m3fn", keep_blocks=(0,), json_in_header: bool = False,
                    input_scale: bool = False) -> Path:
    """ComfyUI's current per-layer format; the blocks in `keep_blocks` (default the first) stay in full precision."""
    sd = load_file(str(src))
    layers = _linear_layers(sd, keep_blocks)
    confs = {}
    for layer in layers:
        sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"] = quantize_fp8(sd[f"{layer}.weight"], fmt)
        if input_scale:
            sd[f"{layer}.input_scale"] = torch.tensor(1.0)
        confs[layer] = {"format": fmt}
    if json_in_header:
        return _save(sd, out, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": confs})})
    sd.update({f"{layer}.comfy_quant": _json_tensor(conf) for layer, conf in confs.items()})
    return _save(sd, out)


def write_scaled_fp8(src: Path, out: Path, marker_prefix: str = "", fmt: str = "float8_e4m3fn", keep_blocks=()) -> Path:
    """ComfyUI's older layout: `<prefix>scaled_fp8` marker, `<layer>.scale_weight`, `<layer>.scale_input`."""
    sd = load_file(str(src))
    for layer in _linear_layers(sd, keep_blocks):
        sd[f"{layer}.weight"], sd[f"{layer}.scale_weight"] = quantize_fp8(sd[f"{layer}.weight"], fmt)
        sd[f"{layer}.scale_input"] = torch.tensor(1.0)
    sd[f"{marker_prefix}scaled_fp8"] = torch.empty(0, dtype=FP8_TYPES[fmt])
    return _save(sd, out)


def write_plain_fp8(src: Path, out: Path, fmt: str = "float8_e4m3fn") -> Path:
    """Linear weights cast to fp8 with no scale (values must fit fp8's range, as small weights do)."""
    sd = load_file(str(src))
    for layer in _linear_layers(sd):
        sd[f"{layer}.weight"] = sd[f"{layer}.weight"].to(FP8_TYPES[fmt])
    return _save(sd, out)


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def quantize_nvfp4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """NVFP4 tensors of one layer, shaped as ComfyUI stores them: `weight` uint8 (rows, cols/2), two e2m1
    codes a byte (low nibble first); `weight_scale` fp8 block scales, one per 16 values, padded to
    (rows rounded up to 128, blocks rounded up to 4); `weight_scale_2` fp32 per-tensor scale. The block
    scales are written row-major, not in the swizzled order of cuBLAS: the file exists to be refused."""
    w = weight.to(torch.float32)
    rows, cols = w.shape
    if cols % 16:
        raise ValueError(f"nvfp4 needs columns in multiples of 16, not {cols}")
    blocks = w.reshape(rows, cols // 16, 16)
    global_scale = (w.abs().amax() / (6.0 * 448.0)).clamp(min=1e-12)
    block_scale = (blocks.abs().amax(-1) / 6.0 / global_scale).clamp(max=448.0).to(torch.float8_e4m3fn)
    scaled = blocks / (block_scale.to(torch.float32) * global_scale).clamp(min=1e-12)[..., None]
    codes = (scaled.abs()[..., None] - E2M1).abs().argmin(-1) | ((scaled < 0).to(torch.int64) << 3)
    codes = codes.reshape(rows, cols).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    padded = torch.zeros(_pad(rows, 128), _pad(cols // 16, 4), dtype=torch.float8_e4m3fn)
    padded[:rows, : cols // 16] = block_scale
    return {"weight": packed, "weight_scale": padded, "weight_scale_2": global_scale.reshape(())}


def write_nvfp4_sample(src: Path, out: Path, keep_blocks=(0,)) -> Path:
    """`qwen_3_4b_fp4_mixed`-style: NVFP4 block linears with `comfy_quant` {"format": "nvfp4"} (those whose
    width is a multiple of 16; the others, and the blocks in `keep_blocks`, stay in full precision)."""
    sd = load_file(str(src))
    for layer in _linear_layers(sd, keep_blocks):
        if sd[f"{layer}.weight"].shape[1] % 16:
            continue  # no whole 16-value blocks: such a layer stays in full precision
        for suffix, t in quantize_nvfp4(sd[f"{layer}.weight"]).items():
            sd[f"{layer}.{suffix}"] = t
        sd[f"{layer}.comfy_quant"] = _json_tensor({"format": "nvfp4"})
    return _save(sd, out)


def write_text_encoder_variants(text_encoder_file: Path, folder: Path, stem: str) -> dict[str, Path]:
    """The tiny text encoder as Comfy-Org's variants (names after theirs), from a bf16 copy of it."""
    folder = Path(folder)
    bf16 = write_cast(text_encoder_file, folder / f"{stem}_bf16.safetensors")
    return {
        "bf16": bf16,
        "fp8_mixed": write_fp8_mixed(bf16, folder / f"{stem}_fp8_mixed.safetensors"),
        "scaled_fp8": write_scaled_fp8(bf16, folder / f"{stem}_fp8_scaled.safetensors"),
        "fp4_mixed": write_nvfp4_sample(bf16, folder / f"{stem}_fp4_mixed.safetensors"),
    }
