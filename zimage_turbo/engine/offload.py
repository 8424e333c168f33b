"""Streaming blocks from pinned host memory: the text-encoder-offload and low-VRAM modes.

The weights of each streamed block live in page-locked host memory. Just before a
block runs, its weights are on the device (copied on a side stream, one block ahead
of the computation); right after, the device copies are dropped. Only two blocks'
weights are on the device at any time. Everything that is not a repeated block
(embeddings, norms, final layer) stays resident: it is small.
"""

from __future__ import annotations

import torch
from torch import nn


class BlockStreamer:
    """wrap: after the last block, prefetch the first (the transformer runs its blocks once per step;
    the text encoder once per prompt, so there it would only park a block on the device)."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, wrap: bool = True):
        self.blocks = blocks
        self.device = device
        self.wrap = wrap
        self.copy_stream = torch.cuda.Stream(device)
        self.host: list[dict[str, torch.Tensor]] = []
        self.ready: dict[int, torch.cuda.Event] = {}
        self.handles = []
        for i, block in enumerate(blocks):
            host = {}
            for name, p in block.named_parameters():
                h = p.data if p.data.device.type == "cpu" else p.data.to("cpu")
                host[name] = h if h.is_pinned() else h.pin_memory()
                p.data = host[name]
            self.host.append(host)
            self.handles.append(block.register_forward_pre_hook(self._before(i)))
            self.handles.append(block.register_forward_hook(self._after(i)))

    def _prefetch(self, i: int) -> None:
        if i in self.ready or i >= len(self.blocks):
            return
        with torch.cuda.stream(self.copy_stream):
            params = dict(self.blocks[i].named_parameters())
            for name, h in self.host[i].items():
                params[name].data = h.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self.ready[i] = ev

    def _before(self, i: int):
        def hook(module, args):
            self._prefetch(i)
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self.ready.pop(i))
            for p in module.parameters():
                p.data.record_stream(compute)  # keep the memory until this stream is done with it
            if i + 1 < len(self.blocks) or self.wrap:
                self._prefetch((i + 1) % len(self.blocks))
            return None

        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            params = dict(module.named_parameters())
            for name, h in self.host[i].items():
                params[name].data = h
            return None

        return hook

    def remove(self, back_to_device: bool) -> None:
        """Stop streaming; with back_to_device the weights become resident again."""
        for h in self.handles:
            h.remove()
        self.handles = []
        torch.cuda.synchronize(self.device)
        self.ready.clear()
        for block, host in zip(self.blocks, self.host):
            params = dict(block.named_parameters())
            for name, h in host.items():
                params[name].data = h.to(self.device) if back_to_device else h
        self.host = []


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """Blocks in the order the forward runs them."""
    return list(transformer.noise_refiner) + list(transformer.context_refiner) + list(transformer.layers)


def text_encoder_blocks(text_encoder: nn.Module) -> list[nn.Module]:
    return list(text_encoder.layers)


def place_outside_blocks(module: nn.Module, blocks: list[nn.Module], device: torch.device,
                         host: tuple[str, ...] = ()) -> None:
    """Parameters that are not in a streamed block: on the device, except those named in `host`
    (kept in pinned host memory, e.g. the text encoder's 0.7 GiB embedding table, looked up on the CPU)."""
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    for name, p in module.named_parameters():
        if id(p) in in_blocks:
            continue
        if any(name.startswith(h) for h in host):
            if p.device.type != "cpu" or not p.is_pinned():
                p.data = p.data.to("cpu").pin_memory()
        elif p.device != device:
            p.data = p.data.to(device)