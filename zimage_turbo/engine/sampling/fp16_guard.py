"""Keeps fp16 inference finite.

Z-Image activations reach |x| ~ 6.6e4, past fp16's largest value (65504): plain
fp16 turns them into inf and the image into NaN (black). The outputs that overflow
(attention output, the SiLU gating product, the feed-forward output, and the text
encoder's attention/MLP outputs) are clamped to the fp16 range. Each of them is
followed by an RMSNorm, which is nearly blind to the scale of its input, so the
clamp changes the result very little while keeping it finite.
"""

from __future__ import annotations

import torch
from torch import nn

FP16_MAX = 65504.0


def clamp_fp16(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


def _clamp_output(module, args, output):
    if isinstance(output, torch.Tensor):
        return clamp_fp16(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (clamp_fp16(output[0]),) + tuple(output[1:])
    return output


def _clamp_first_input(module, args):
    return (clamp_fp16(args[0]),) + tuple(args[1:])


def install_transformer_guards(transformer: nn.Module) -> list:
    """Clamp attention output, SiLU-gated hidden state and FFN output of every block."""
    handles = []
    for name, mod in transformer.named_modules():
        cls = type(mod).__name__
        if cls == "ZImageTransformerBlock":
            handles.append(mod.attention.register_forward_hook(_clamp_output))
            handles.append(mod.feed_forward.register_forward_hook(_clamp_output))
            # The gated product silu(w1 x) * w3 x is w2's input: clamp it before w2 sees it.
            # Hooked on the feed-forward's own call to w2 so it survives PEFT wrapping w2.
            handles.append(_guard_w2_input(mod.feed_forward))
    return handles


class _W2InputGuard:
    def __init__(self, ff: nn.Module):
        self.ff = ff
        self.original = ff._forward_silu_gating

    def __call__(self, x1, x3):
        return clamp_fp16(self.original(x1, x3))

    def remove(self):
        self.ff._forward_silu_gating = self.original


def _guard_w2_input(ff: nn.Module):
    if hasattr(ff, "_forward_silu_gating"):
        guard = _W2InputGuard(ff)
        ff._forward_silu_gating = guard
        return guard
    return ff.w2.register_forward_pre_hook(_clamp_first_input)


def install_text_encoder_guards(text_encoder: nn.Module) -> list:
    handles = []
    for name, mod in text_encoder.named_modules():
        if type(mod).__name__.endswith("DecoderLayer"):
            handles.append(mod.self_attn.register_forward_hook(_clamp_output))
            handles.append(mod.mlp.register_forward_hook(_clamp_output))
            handles.append(mod.register_forward_hook(_clamp_output))
    return handles


def remove_guards(handles: list) -> None:
    for h in handles:
        h.remove()
