"""The VAE decoder compiled for one latent shape, channels-last: 32 ms instead of 46 at 1024² on an H200.

The compiled decoder every image uses is compiled with dynamic shapes (acceleration.py): one compile serves every
size, but inductor cannot then size its GroupNorm/SiLU kernels for the image (21 of the 46 ms,
bench/step_anatomy.py). A compile for one shape, on a channels-last copy of the decoder, decoded in 32.1 ms
(H200, 2026-12-05), and costs ~20 s of compiling. So the background warm-up, which already compiles everything
at the size most images are made at (warmup.WARM_SIDE, batch 1), also compiles this decoder for that shape; every
compiled image of that shape uses it, others the dynamic one. Which decoder an image gets depends only on its
shape, so a compiled image of a given seed is the same in every process (what the inductor settings in
acceleration.py are for), and the probe says which one ran.

The copy is the decoder's own: its weights channels-last (0.1 GiB at true size) while the shared decoder keeps
its layout (its eager path is slower channels-last: 128 vs 87 ms). VAE weights never change (no LoRA touches
them), so the copy never goes stale.
"""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from . import acceleration


class SizedDecoder:
    def __init__(self, vae: nn.Module):
        self.vae = vae
        self.lock = threading.Lock()
        self.ready: set = set()  # (shape, dtype) of latents compiled for
        self._fn = None
        self._copy: nn.Module | None = None

    @staticmethod
    def key(z: torch.Tensor) -> tuple:
        return tuple(z.shape), z.dtype

    def supported(self) -> bool:
        # diffusers runs post_quant_conv before the decoder, and tiles large images: neither is this decoder's job.
        # (Z-Image's autoencoder has no post_quant_conv and is not tiled.)
        return getattr(self.vae, "post_quant_conv", None) is None and not getattr(self.vae, "use_tiling", False)

    def usable(self, z: torch.Tensor) -> bool:
        with self.lock:
            return self.key(z) in self.ready and self.supported()

    def compile_for(self, z: torch.Tensor) -> bool:
        """Compile (on this thread: the warm-up's) the decoder for z's shape; later decode()s of it use it."""
        if not self.supported():
            return False
        self._callable()(z.contiguous(memory_format=torch.channels_last))
        with self.lock:
            self.ready.add(self.key(z))
        return True

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._callable()(z.contiguous(memory_format=torch.channels_last))

    def _callable(self):
        with self.lock:
            if self._fn is None:
                dec = copy.deepcopy(self.vae.decoder)
                dec._compiled_call_impl = None  # the copy is compiled here, not through acceleration's per-thread switch
                self._copy = dec.to(memory_format=torch.channels_last)
                self._fn = torch.compile(self._copy, dynamic=False, options=acceleration._inductor_options(),
                                         **acceleration._recompile_limit_kwargs())
            return self._fn
