"""torch.compile where it pays: the transformer's repeated blocks, the text encoder's layers, the VAE decoder.

Regional compilation: each repeated block type is compiled once and reused by all its
instances (34 transformer blocks, 35 text-encoder layers). The transformer blocks first
get an attention processor that applies RoPE in real arithmetic (fast_attention.py),
because inductor cannot fuse complex numbers. Shapes are dynamic, so a new prompt length
or image size does not recompile; LoRA slots keep strengths in tensors, so switching
styles does not recompile either. The first run pays the compile (the probe reports it).
Streamed modules (offload modes) are never compiled: their weights move between calls.
"""

from __future__ import annotations

import contextlib

from torch import nn

from . import fast_attention

TRANSFORMER_BLOCK = "ZImageTransformerBlock"
COMPILE_MODES = ("auto", "on", "off")


def wants_compile(mode: str, device_type: str) -> bool:
    if mode not in COMPILE_MODES:
        from .errors import InvalidSettingError

        raise InvalidSettingError(f"unknown compile setting {mode!r}: use auto, on or off.")
    return mode == "on" or (mode == "auto" and device_type == "cuda")


def _regions(module: nn.Module, class_suffix: str) -> list[nn.Module]:
    return [m for m in module.modules() if type(m).__name__.endswith(class_suffix)]


def _set(regions: list[nn.Module], on: bool) -> None:
    for r in regions:
        if on and getattr(r, "_compiled_call_impl", None) is None:
            r.compile(dynamic=True, fullgraph=False)
        elif not on:
            r._compiled_call_impl = None


def is_compiled(module: nn.Module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def set_transformer(transformer: nn.Module, on: bool) -> None:
    if on:
        fast_attention.install(transformer)
    _set(_regions(transformer, TRANSFORMER_BLOCK), on)
    if not on:
        fast_attention.uninstall(transformer)


def set_text_encoder(text_encoder: nn.Module, on: bool) -> None:
    _set(_regions(text_encoder, "DecoderLayer"), on)


def set_vae(vae: nn.Module, on: bool) -> None:
    _set([vae.decoder], on)


def tracing_context():
    """Settings for the traces our modules make (they happen lazily, inside generate()).

    Without this, dynamo's "duck sizing" assumes dimensions that were equal at the first trace
    stay equal: after a square image, the first non-square one recompiles the VAE decoder.
    Scoped to our calls, so other compiled models in the process keep their own settings.
    """
    try:
        from torch.fx.experimental import _config as fx_config

        return fx_config.patch(use_duck_shape=False)
    except (ImportError, AttributeError):
        return contextlib.nullcontext()
