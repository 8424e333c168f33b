"""Writing diffusers-named weights under ComfyUI's original key names (for test and demo files).

The engine reads original files with diffusers' own single-file converters (engine/files/key_maps).
diffusers has converters in that direction only, so the way back, which only the tiny-model builder
and the tests need, is written here by hand. It is proven by the tests: a file written with it, read
back through diffusers' converters, gives the original diffusers state dict key for key and bit for bit.
"""

from __future__ import annotations

import re

import torch

# (original fragment, diffusers fragment) of the transformer; prefix-anchored where the fragment has no leading dot.
_TRANSFORMER = (
    ("final_layer.", "all_final_layer.2-1."),
    ("x_embedder.", "all_x_embedder.2-1."),
    (".attention.out.", ".attention.to_out.0."),
    (".attention.k_norm.", ".attention.norm_k."),
    (".attention.q_norm.", ".attention.norm_q."),
)
_SPLIT_QKV = (".attention.to_q", ".attention.to_k", ".attention.to_v")


def transformer_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ZImageTransformer2DModel names -> original names (q, k, v fused into one qkv)."""
    out = {}
    for key, tensor in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            base, leaf = key.split(".attention.to_q.")
            out[f"{base}.attention.qkv.{leaf}"] = torch.cat([sd[f"{base}{s}.{leaf}"] for s in _SPLIT_QKV], dim=0)
            continue
        name = key
        for old, new in _TRANSFORMER:
            if name.startswith(new) or (new.startswith(".") and new in name):
                name = name.replace(new, old, 1)
        out[name] = tensor
    # Original exports carry a final norm weight the model never uses (diffusers drops it);
    # ComfyUI's loader expects it, so our test files have it.
    final = sd.get("all_final_layer.2-1.linear.weight")
    if final is not None:
        out["norm_final.weight"] = torch.ones(final.shape[1], dtype=final.dtype, device=final.device)
    return out


_VAE = (
    # (diffusers regex, original template; UP_* count the up blocks from the other end)
    (r"^(encoder|decoder)\.conv_norm_out\.(.*)$", r"\1.norm_out.\2"),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.(.*)$", r"encoder.down.\1.block.\2.nin_shortcut.\3"),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", r"encoder.down.\1.block.\2.\3"),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$", r"encoder.down.\1.downsample.conv.\2"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.(.*)$", r"\1.mid.attn_1.norm.\2"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_q\.(.*)$", r"\1.mid.attn_1.q.\2"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_k\.(.*)$", r"\1.mid.attn_1.k.\2"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_v\.(.*)$", r"\1.mid.attn_1.v.\2"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.(.*)$", r"\1.mid.attn_1.proj_out.\2"),
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", "MID_RESNET"),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.(.*)$", "UP_SHORTCUT"),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", "UP_RESNET"),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$", "UP_SAMPLE"),
)
_VAE_ATTN_PROJ = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _vae_name(name: str, num_up_blocks: int) -> str:
    for pattern, template in _VAE:
        m = re.match(pattern, name)
        if not m:
            continue
        if template == "MID_RESNET":
            return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        if template.startswith("UP_"):
            up = num_up_blocks - 1 - int(m.group(1))
            if template == "UP_SHORTCUT":
                return f"decoder.up.{up}.block.{m.group(2)}.nin_shortcut.{m.group(3)}"
            if template == "UP_RESNET":
                return f"decoder.up.{up}.block.{m.group(2)}.{m.group(3)}"
            return f"decoder.up.{up}.upsample.conv.{m.group(2)}"
        return m.expand(template)
    return name  # conv_in, conv_out keep their names


def vae_to_original(sd: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> Flux ae.safetensors names (attention projections as 1x1 convs)."""
    out = {}
    for key, tensor in sd.items():
        name = _vae_name(key, num_up_blocks)
        if _VAE_ATTN_PROJ.search(name) and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[name] = tensor
    return out
