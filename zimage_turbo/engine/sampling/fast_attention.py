"""Z-Image attention with the rotary embedding in real arithmetic, so torch.compile can fuse it.

diffusers applies RoPE by viewing q/k as complex numbers and multiplying by complex
frequencies; inductor cannot generate code for complex operators and falls back to
separate eager kernels (about 8 ms per step at 1024² on an H200). Here the frequencies
leave the rope embedder as (cos, sin) pairs and the rotation is written with real
multiplies and adds: the same arithmetic in float32, now fusable with the q/k norms.
Everything else (projections, LoRA-wrapped or not, norms, SDPA, output) is unchanged.

Only the compiled path uses it. Run eagerly, the real-arithmetic rotation is slower than diffusers' complex one
(H100, 1024², bf16: 172.5 vs 154.8 ms a step: more separate elementwise kernels), and eager steps are what a first
image after a start and every image during the background compile run. So the rope embedder gives (cos, sin) pairs
only to a thread running the compiled code (acceleration.compiled_calls), and the processor hands complex
frequencies to diffusers' own processor: the eager path is exactly diffusers' model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import acceleration  # (acceleration imports this module too: only its functions are used, at call time)

BLOCK_CLASS = "ZImageTransformerBlock"


class _RealRope:
    """Wraps the transformer's rope embedder: returns float32 [..., 64, 2] (cos, sin) instead of complex64."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, ids):
        freqs = self.inner(ids)  # outside the compiled blocks: always run eagerly
        return torch.view_as_real(freqs) if acceleration.running_compiled() else freqs

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] rotated by freqs [B, S, D/2, 2] (cos, sin), computed in float32 like the complex version."""
    xf = x.float().unflatten(-1, (-1, 2))
    xr, xi = xf[..., 0], xf[..., 1]
    cos, sin = freqs[..., 0].unsqueeze(2), freqs[..., 1].unsqueeze(2)
    out = torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class RealRopeAttnProcessor:
    def __init__(self, eager_processor):
        self.eager = eager_processor  # diffusers' own, for complex frequencies (the eager path)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        if freqs_cis is not None and freqs_cis.is_complex():
            return self.eager(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask
        ).transpose(1, 2)
        out = attn.to_out[0](out.flatten(2, 3).to(query.dtype))
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


def install(transformer: nn.Module) -> None:
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    if isinstance(transformer.rope_embedder, _RealRope):
        return
    transformer.rope_embedder = _RealRope(transformer.rope_embedder)
    for m in transformer.modules():
        if type(m).__name__ == BLOCK_CLASS:
            m.attention.set_processor(RealRopeAttnProcessor(ZSingleStreamAttnProcessor()))


def uninstall(transformer: nn.Module) -> None:
    from diffusers.models.transformers.transformer_z_image import (
        ZSingleStreamAttnProcessor,
    )

    if not isinstance(transformer.rope_embedder, _RealRope):
        return
    transformer.rope_embedder = transformer.rope_embedder.inner
    for m in transformer.modules():
        if type(m).__name__ == BLOCK_CLASS:
            m.attention.set_processor(ZSingleStreamAttnProcessor())
