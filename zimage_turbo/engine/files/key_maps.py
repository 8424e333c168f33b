"""Key names: ComfyUI / original Z-Image files -> the diffusers and transformers modules the engine runs.

The renames are diffusers' own single-file converters, the ones `from_single_file` uses, applied to
the state dict our streaming reader (safetensors_io) has already put on the device:
  * transformer: `convert_z_image_transformer_checkpoint_to_diffusers` (original names with one fused
    `attention.qkv` per block -> to_q/to_k/to_v, `attention.out` -> `to_out.0`, ...);
  * VAE (Flux `ae.safetensors`, LDM names): `convert_ldm_vae_checkpoint`.
Both only move dict entries and take views (the qkv chunks, the [:, :, 0, 0] of the 1x1 attention
convs): no tensor is copied. They need real or meta tensors, not our lazy TensorEntry records, so the
reader loads first and the converter renames after; on meta tensors the same functions give the
checker names and shapes without reading any data.

Text encoder: neither diffusers nor transformers has a converter for ComfyUI's Qwen3 file (it is a
plain `Qwen3ForCausalLM` checkpoint: `model.` prefix and an `lm_head`). transformers strips that
prefix itself inside `from_pretrained`, which we do not use (it cannot stream straight to the device
nor skip the unused last layer), so the two-line prefix rule below stays ours.
"""

from __future__ import annotations

import functools

import torch

# diffusers' converter strips only "model.diffusion_model." (full checkpoints); ComfyUI's own saves
# also use "diffusion_model.". We strip both before handing the dict over.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Module names that are already diffusers names and that diffusers' substring renames would rename
# again ("x_embedder." is inside "all_x_embedder.", "final_layer." inside "all_final_layer.").
_ALREADY_DIFFUSERS = ("all_x_embedder", "all_final_layer")
_QKV_ORDER = (".attention.to_q", ".attention.to_k", ".attention.to_v")


def strip_transformer_prefix(name: str) -> str:
    for p in TRANSFORMER_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def transformer_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ComfyUI/original transformer state dict (any prefix) in diffusers names, by diffusers' converter.

    The fused qkv becomes three views of it; `norm_final.weight` (in some exports, unused) is dropped by
    the converter. Keys it does not know pass through unchanged (the loader then names them). `sd` is
    left as it was.
    """
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    return convert_z_image_transformer_checkpoint_to_diffusers({strip_transformer_prefix(k): v for k, v in sd.items()})


@functools.lru_cache(maxsize=8192)
def _module_to_diffusers(module: str) -> tuple[str, ...]:
    if module.split(".", 1)[0] in _ALREADY_DIFFUSERS:
        return (module,)
    probe = {f"{module}.weight": torch.empty((3, 1), device="meta")}  # 3 rows: a fused qkv splits in three
    names = [k[: -len(".weight")] for k in transformer_to_diffusers(probe)]
    if len(names) == 3:
        names.sort(key=lambda n: next((i for i, s in enumerate(_QKV_ORDER) if n.endswith(s)), 3))
    return tuple(names)


def transformer_module_to_diffusers(module: str) -> list[str]:
    """Map an original module path (no prefix) to its diffusers module path(s), by diffusers' converter.

    A fused qkv maps to three modules, in q, k, v order (its output rows split in three).
    A path that is already in diffusers naming maps to itself.
    """
    return list(_module_to_diffusers(module))


def vae_to_diffusers(sd: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """An original (Flux `ae.safetensors`, LDM-named) VAE state dict in diffusers names, by diffusers' converter.

    The converter silently leaves out keys it does not know; those are put back unchanged so that the
    loader names them as unexpected instead of loading a file that is not what it seems.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = {"down_block_types": ["DownEncoderBlock2D"] * num_blocks, "up_block_types": ["UpDecoderBlock2D"] * num_blocks}
    out = convert_ldm_vae_checkpoint(sd, config)
    # Every tensor the converter used is in `out` as itself or as a view of it (a 1x1 conv sliced to a
    # Linear weight): same memory, same start. Identity of Python objects is no test here (`._base`
    # gives a fresh wrapper each time, whose id can be reused), so memory addresses are compared.
    used = {_start(v) for v in out.values()}
    for key, tensor in sd.items():
        if _start(tensor) not in used:
            out[key] = tensor
    return out


def _start(t: torch.Tensor) -> tuple[int, int, int]:
    """Where `t`'s data begins: (its storage's address, its offset in it, its device index)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.device.index or 0


def text_encoder_file_name_to_model(name: str) -> str | None:
    """`model.layers.0...` -> `layers.0...`; the LM head is not part of Qwen3Model (see the module doc)."""
    if name.startswith("lm_head."):
        return None
    return name[len("model.") :] if name.startswith("model.") else name
