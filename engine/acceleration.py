"""torch.compile for the transformer's repeated blocks (regional compilation).

Compiling the 34 identical blocks once (they share one compiled graph) fuses the
element-wise work around the matrix products (RMSNorms, modulation, RoPE, gating)
without compiling the whole model. Shapes are dynamic, so a new prompt length or
image size does not recompile; LoRA slots keep strengths in tensors, so switching
styles does not recompile either. First use pays the compile (reported by the probe).
"""

from __future__ import annotations

from torch import nn

BLOCK_CLASS = "ZImageTransformerBlock"
COMPILE_MODES = ("auto", "on", "off")


def wants_compile(mode: str, device_type: str) -> bool:
    if mode not in COMPILE_MODES:
        from .errors import InvalidSettingError

        raise InvalidSettingError(f"unknown compile setting {mode!r}: use auto, on or off.")
    return mode == "on" or (mode == "auto" and device_type == "cuda")


def blocks(transformer: nn.Module) -> list[nn.Module]:
    return [m for m in transformer.modules() if type(m).__name__ == BLOCK_CLASS]


def is_compiled(transformer: nn.Module) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in blocks(transformer))


def set_compiled(transformer: nn.Module, on: bool) -> None:
    for block in blocks(transformer):
        if on and getattr(block, "_compiled_call_impl", None) is None:
            block.compile(dynamic=True, fullgraph=False)
        elif not on:
            block._compiled_call_impl = None
