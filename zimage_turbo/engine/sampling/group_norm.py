"""The VAE decoder's GroupNorm, in a form the compiler turns into a well-occupied reduction.

A GroupNorm's statistics are one sum per (image, group): 32 sums for a batch of one, each over millions of values
at the decoder's full-resolution stages (128 channels x 1024 x 1024 / 32 groups = 4.2 M). Compiled with dynamic
shapes, inductor cannot see that the rows are long and gives each of the 32 rows one thread block: 32 of an H200's
132 SMs busy, and the decoder's fused GroupNorm+SiLU kernels took 21.6 of its 45 ms (bench/step_anatomy.py, H200,
1024²) where their memory traffic (~11 GB) needs ~2.5 ms. Here, on the compiled path only, the statistics are taken
in two levels: first over each row of the last axis (B x C x H rows of W values: every SM busy), then the per-row
means and variances are combined per group (exact: equal counts, variance = mean of variances + variance of means,
in float32). The eager path keeps torch's own kernel (the class only changes what dynamo traces).
"""

from __future__ import annotations

import torch
from torch import nn


def two_level_group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps) for x of [B, C, *spatial] (at least one spatial axis)."""
    b, c = x.shape[0], x.shape[1]
    rows = x.float().reshape(b, groups, -1, x.shape[-1])  # [B, G, C/G * rest, last]
    var_r, mean_r = torch.var_mean(rows, dim=-1, correction=0)
    mean = mean_r.mean(dim=-1)
    var = var_r.mean(dim=-1) + (mean_r - mean.unsqueeze(-1)).square().mean(dim=-1)
    y = (rows - mean[..., None, None]) * torch.rsqrt(var + eps)[..., None, None]
    shape = (1, c) + (1,) * (x.dim() - 2)
    y = y.reshape(x.shape)
    if weight is not None:
        y = y * weight.float().reshape(shape)
    if bias is not None:
        y = y + bias.float().reshape(shape)
    return y.to(x.dtype)


class TwoLevelGroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose traced (compiled) form takes its statistics in two levels (see the module's note)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() or x.dim() < 3:
            return super().forward(x)
        return two_level_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def install(module: nn.Module) -> int:
    """Every nn.GroupNorm under `module` traces as TwoLevelGroupNorm (same parameters, same state dict)."""
    n = 0
    for m in module.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = TwoLevelGroupNorm
            n += 1
    return n


def uninstall(module: nn.Module) -> None:
    for m in module.modules():
        if type(m) is TwoLevelGroupNorm:
            m.__class__ = nn.GroupNorm
