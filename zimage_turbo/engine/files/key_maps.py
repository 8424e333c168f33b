"""Key names: ComfyUI / original Z-Image files <-> diffusers modules.

ComfyUI's split files keep the original names: the transformer has one fused
`attention.qkv` per block and `attention.out`, `q_norm`, `final_layer`, ...; the
VAE (Flux `ae.safetensors`) uses the original `down.N.block.M` layout with 1x1
conv attention; the text encoder is a Qwen3 causal LM with a `model.` prefix.
The engine runs diffusers classes, so everything is renamed on the way in (and,
for the tiny-model builder, on the way out).
"""

from __future__ import annotations

import re

import torch

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# (original fragment, diffusers fragment): plain renames, applied in this order.
_TRANSFORMER_RENAMES = (
    ("final_layer.", "all_final_layer.2-1."),
    ("x_embedder.", "all_x_embedder.2-1."),
    (".attention.out.", ".attention.to_out.0."),
    (".attention.k_norm.", ".attention.norm_k."),
    (".attention.q_norm.", ".attention.norm_q."),
)
_QKV = ".attention.qkv"
_SPLIT_QKV = (".attention.to_q", ".attention.to_k", ".attention.to_v")


def strip_transformer_prefix(name: str) -> str:
    for p in TRANSFORMER_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def transformer_module_to_diffusers(module: str) -> list[str]:
    """Map an original module path (no prefix) to its diffusers module path(s).

    A fused qkv maps to three modules, in q, k, v order (its output rows split in three).
    A path that is already in diffusers naming maps to itself.
    """
    if module.endswith(_QKV):
        base = module[: -len(_QKV)]
        return [base + s for s in _SPLIT_QKV]
    name = module + "."
    for old, new in _TRANSFORMER_RENAMES:
        if name.startswith(old) or old.startswith(".") and old in name:
            name = name.replace(old, new, 1)
    return [name[:-1]]


def transformer_original_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ComfyUI/original transformer state dict to diffusers keys (qkv split by views)."""
    out = {}
    for key, tensor in sd.items():
        key = strip_transformer_prefix(key)
        if key == "norm_final.weight":  # present in some exports, unused by the model
            continue
        module, _, leaf = key.rpartition(".")
        if not module:  # top-level parameters (x_pad_token, cap_pad_token)
            out[key] = tensor
            continue
        targets = transformer_module_to_diffusers(module)
        if len(targets) == 3:
            for target, part in zip(targets, tensor.chunk(3, dim=0)):
                out[f"{target}.{leaf}"] = part
        else:
            out[f"{targets[0]}.{leaf}"] = tensor
    return out


def transformer_diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of transformer_original_to_diffusers: fuses q, k, v back into qkv."""
    out = {}
    for key, tensor in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            leaf = key.rsplit(".", 1)[1]
            base = key.split(".attention.to_q.")[0]
            parts = [sd[f"{base}{s}.{leaf}"] for s in _SPLIT_QKV]
            out[f"{base}{_QKV}.{leaf}"] = torch.cat(parts, dim=0)
            continue
        name = key
        for old, new in _TRANSFORMER_RENAMES:
            if name.startswith(new) or new.startswith(".") and new in name:
                name = name.replace(new, old, 1)
        out[name] = tensor
    # Original exports carry a final norm weight the model never uses (diffusers drops it too);
    # ComfyUI's loader expects it, so our test files have it.
    final = sd.get("all_final_layer.2-1.linear.weight")
    if final is not None:
        out["norm_final.weight"] = torch.ones(final.shape[1], dtype=final.dtype, device=final.device)
    return out


# ---- VAE: diffusers AutoencoderKL <-> original (Flux ae.safetensors) ----

_VAE_RULES = (
    # (diffusers regex, original template)
    (r"^(encoder|decoder)\.conv_norm_out\.(.*)$", r"\1.norm_out.\2"),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.(.*)$", r"encoder.down.\1.block.\2.nin_shortcut.\3"),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", r"encoder.down.\1.block.\2.\3"),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$", r"encoder.down.\1.downsample.conv.\2"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.(.*)$", r"\1.mid.attn_1.norm.\2"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_q\.(.*)$", r"\1.mid.attn_1.q.\2"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_k\.(.*)$", r"\1.mid.attn_1.k.\2"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_v\.(.*)$", r"\1.mid.attn_1.v.\2"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.(.*)$", r"\1.mid.attn_1.proj_out.\2"),
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.conv_shortcut\.(.*)$", None),  # never present
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", "MID_RESNET"),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.(.*)$", "UP_SHORTCUT"),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", "UP_RESNET"),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$", "UP_SAMPLE"),
)
_VAE_ATTN_PROJ = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def vae_diffusers_name_to_original(name: str, num_up_blocks: int) -> str:
    for pattern, template in _VAE_RULES:
        m = re.match(pattern, name)
        if not m:
            continue
        if template == "MID_RESNET":
            return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        if template == "UP_SHORTCUT":
            return f"decoder.up.{num_up_blocks - 1 - int(m.group(1))}.block.{m.group(2)}.nin_shortcut.{m.group(3)}"
        if template == "UP_RESNET":
            return f"decoder.up.{num_up_blocks - 1 - int(m.group(1))}.block.{m.group(2)}.{m.group(3)}"
        if template == "UP_SAMPLE":
            return f"decoder.up.{num_up_blocks - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        return m.expand(template)
    return name  # conv_in, conv_out, quant convs keep their names


def vae_original_to_diffusers(sd: dict[str, torch.Tensor], diffusers_keys: list[str], num_up_blocks: int) -> dict[str, torch.Tensor]:
    """Rename an original VAE state dict; `diffusers_keys` are the model's own keys (to invert the rules)."""
    lookup = {vae_diffusers_name_to_original(k, num_up_blocks): k for k in diffusers_keys}
    out = {}
    for key, tensor in sd.items():
        target = lookup.get(key)
        if target is None:
            out[key] = tensor  # left as is: load_state_dict then names it as unexpected
            continue
        if _VAE_ATTN_PROJ.search(key) and tensor.ndim == 4:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # 1x1 conv -> linear
        out[target] = tensor
    return out


def vae_diffusers_to_original(sd: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in sd.items():
        name = vae_diffusers_name_to_original(key, num_up_blocks)
        if _VAE_ATTN_PROJ.search(name) and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[name] = tensor
    return out


# ---- Text encoder: Qwen3 causal-LM files <-> transformers.Qwen3Model ----


def text_encoder_file_name_to_model(name: str) -> str | None:
    """`model.layers.0...` -> `layers.0...`; the LM head is not part of Qwen3Model."""
    if name.startswith("lm_head."):
        return None
    return name[len("model.") :] if name.startswith("model.") else name
