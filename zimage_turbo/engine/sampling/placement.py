"""Where every weight lives: the one place that decides it (issue: placement was decided in three modules).

A memory mode becomes a WeightPlan (plan_for): where the text encoder is read to at load time,
which block stacks stream from host memory, whether LoRAs may be merged into the weights.
apply_plan() then puts the weights there; model loading and the pipeline only ask the plan.

Streaming (the text-encoder-offload and low-VRAM modes): the weights of each streamed block live
in page-locked host memory. Just before a block runs, its weights are on the device (copied on a
side stream, one block ahead of the computation); right after, the device copies are dropped.
Only two blocks' weights are on the device at any time. Everything that is not a repeated block
(embeddings, norms, final layer) stays resident: it is small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidSettingError

MEMORY_MODES = ("resident", "offload_text_encoder", "low_vram")


def check_memory_mode(memory: str) -> None:
    if memory not in MEMORY_MODES:
        raise InvalidSettingError(f"unknown memory mode {memory!r}: use one of {', '.join(MEMORY_MODES)}.")


@dataclass(frozen=True)
class WeightPlan:
    """Where the weights of one pipeline live for one memory mode (on the CPU everything is host memory)."""

    memory: str
    on_gpu: bool

    @property
    def text_encoder_loads_to_host(self) -> bool:
        """Read the text encoder into pinned host memory (it will stream) instead of the device."""
        return self.on_gpu and self.memory != "resident"

    @property
    def stream_text_encoder(self) -> bool:
        return self.on_gpu and self.memory in ("offload_text_encoder", "low_vram")

    @property
    def stream_transformer(self) -> bool:
        return self.on_gpu and self.memory == "low_vram"

    @property
    def lora_may_merge(self) -> bool:
        # Streamed blocks swap their weights between host and device: no LoRA is merged into them.
        return not self.stream_transformer


def plan_for(device: torch.device, memory: str) -> WeightPlan:
    check_memory_mode(memory)
    return WeightPlan(memory, device.type == "cuda")


def apply_plan(plan: WeightPlan, device: torch.device, transformer: nn.Module, transformer_state,
               text_encoder: nn.Module, text_encoder_state) -> None:
    """Put the weights where `plan` wants them. The states hold each model's BlockStreamer (or None)."""
    if not plan.on_gpu:
        return
    for st, blocks_of, module, want, wrap, host in (
        (text_encoder_state, text_encoder_blocks, text_encoder, plan.stream_text_encoder, False, ("embed_tokens",)),
        (transformer_state, transformer_blocks, transformer, plan.stream_transformer, True, ()),
    ):
        if want and st.streamer is None:
            st.streamer = BlockStreamer(blocks_of(module), device, wrap=wrap)
        elif not want and st.streamer is not None:
            st.streamer.remove(back_to_device=True)
            st.streamer = None
        # Everything outside the streamed blocks: on the device (a text encoder loaded into host
        # memory for an offload mode, now wanted resident, comes back too).
        place_outside_blocks(module, blocks_of(module) if want else [], device, host if want else ())
    torch.cuda.empty_cache()


def drop_streamers(*states) -> None:
    """Stop streaming (before a release): the streamed weights stay where they are, in host memory."""
    for st in states:
        if st.streamer is not None:
            st.streamer.remove(back_to_device=False)
            st.streamer = None


class BlockStreamer:
    """wrap: after the last block, prefetch the first (the transformer runs its blocks once per step;
    the text encoder once per prompt, so there it would only park a block on the device)."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, wrap: bool = True):
        self.blocks = blocks
        self.device = device
        self.wrap = wrap
        self.copy_stream = torch.cuda.Stream(device)
        # Held by Parameter object, not by name: LoRA adapter slots injected later wrap a Linear (its weight
        # becomes "...to_q.base_layer.weight") but keep the same Parameter (seen on the GPU: a low_vram pipeline
        # whose first LoRA built slots failed with KeyError 'attention.to_q.weight'). Parameters added after
        # this (the slots' own) are not streamed: they stay where they were made, on the compute device.
        self.host: list[list[tuple[nn.Parameter, torch.Tensor]]] = []
        self.ready: dict[int, torch.cuda.Event] = {}
        self.handles = []
        for i, block in enumerate(blocks):
            host = []
            for p in block.parameters():
                h = p.data if p.data.device.type == "cpu" else p.data.to("cpu")
                h = h if h.is_pinned() else h.pin_memory()
                p.data = h
                host.append((p, h))
            self.host.append(host)
            self.handles.append(block.register_forward_pre_hook(self._before(i)))
            self.handles.append(block.register_forward_hook(self._after(i)))

    def _prefetch(self, i: int) -> None:
        if i in self.ready or i >= len(self.blocks):
            return
        with torch.cuda.stream(self.copy_stream):
            for p, h in self.host[i]:
                p.data = h.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self.ready[i] = ev

    def _before(self, i: int):
        def hook(module, args):
            self._prefetch(i)
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self.ready.pop(i))
            for p, _ in self.host[i]:
                p.data.record_stream(compute)  # keep the memory until this stream is done with it
            if i + 1 < len(self.blocks) or self.wrap:
                self._prefetch((i + 1) % len(self.blocks))
            return None

        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            for p, h in self.host[i]:
                p.data = h
            return None

        return hook

    def remove(self, back_to_device: bool) -> None:
        """Stop streaming; with back_to_device the weights become resident again."""
        for h in self.handles:
            h.remove()
        self.handles = []
        torch.cuda.synchronize(self.device)
        self.ready.clear()
        for host in self.host:
            for p, h in host:
                p.data = h.to(self.device) if back_to_device else h
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