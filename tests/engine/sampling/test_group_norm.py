"""The VAE decoder's two-level GroupNorm (group_norm.py): the same function as torch's, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from zimage_turbo.engine.sampling import acceleration, group_norm


@pytest.mark.parametrize("shape,groups,affine", [((1, 64, 9, 13), 32, True), ((2, 32, 5, 7), 8, False),
                                                 ((1, 64, 40), 32, True), ((3, 16, 2, 3, 4), 4, True)])
def test_two_level_statistics_equal_torchs_group_norm(shape, groups, affine):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1.5  # a mean far from 0: one-pass variance formulas lose digits here
    weight = torch.randn(shape[1], generator=g) if affine else None
    bias = torch.randn(shape[1], generator=g) if affine else None
    ref = F.group_norm(x.double(), groups, None if weight is None else weight.double(),
                       None if bias is None else bias.double(), 1e-6)
    got = group_norm.two_level_group_norm(x, groups, weight, bias, 1e-6)
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    got_b = group_norm.two_level_group_norm(xb, groups, weight, bias, 1e-6)
    ref_b = F.group_norm(xb.float(), groups, weight, bias, 1e-6)
    assert got_b.dtype == torch.bfloat16
    torch.testing.assert_close(got_b.float(), ref_b, rtol=1e-2, atol=2e-2)


def test_installed_on_the_compiled_decoder_only_and_the_eager_path_keeps_torchs_kernel(monkeypatch):
    traced = []
    real = group_norm.two_level_group_norm

    def spy(*args, **kwargs):
        traced.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(group_norm, "two_level_group_norm", spy)
    dec = nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.GroupNorm(8, 32, eps=1e-6), nn.SiLU(), nn.Conv2d(32, 3, 1))
    vae = nn.Module()
    vae.decoder = dec
    x = torch.randn(1, 4, 12, 10)
    with torch.no_grad():
        before = dec(x)
        acceleration.set_vae(vae, True)
        assert type(dec[1]) is group_norm.TwoLevelGroupNorm
        assert torch.equal(dec(x), before)  # eager calls are torch's own GroupNorm, bit for bit
        assert traced == []
        with acceleration.tracing_context(), acceleration.compiled_calls(True):
            compiled = dec(x)
        torch.testing.assert_close(compiled, before, rtol=1e-4, atol=1e-4)
        assert traced and traced[0] == (1, 32, 12, 10)  # the compiled code was traced through the two-level form
        acceleration.set_vae(vae, False)
        assert type(dec[1]) is nn.GroupNorm and set(dec.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias",
                                                                          "3.weight", "3.bias"}
