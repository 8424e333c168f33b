"""CUDA graphs for the denoiser call of a step: the same kernels, launched as one graph.

A compiled step at 1024² leaves the GPU idle 3-4 ms between kernels while Python, dynamo's guards and the
launches catch up (H100/H200, bench/step_anatomy.py); replaying a captured graph of the denoiser call measured
2.2-3.6 ms a step faster and bit-identical. torch.compile's own "reduce-overhead" mode would do this per compiled
region, but our regions are many small graphs with dynamic shapes (one capture per block call and size), and its
graphs would be captured by whichever thread compiles; one capture of the whole denoiser call is simpler to
reason about, and its validity is checked here, per generation, not assumed.

A graph replays fixed memory addresses and fixed control flow, so a captured graph is only used while:
  * the shapes match: latents, timestep and each prompt embedding (one graph per key, a few kept);
  * the weights are the ones captured: every parameter's and buffer's storage address and every module of the
    transformer's tree are part of the key (LoRAs merged in place keep their addresses and need no new graph;
    PEFT slots put into or taken out of the tree, a precision change, weights moved by a memory mode all do);
  * what the Python code decides is the same: the LoRA variant (which adapter slots run) is part of the key;
    strengths live in tensors written in place, which a replay reads.
Graphs run only on the compiled path of a resident (not streamed) model on CUDA, and not while the background
compile runs (its thread launches work that a capture must not see). A key is captured at its second call (the
first runs normally, so everything lazy is made outside the capture); a failed capture leaves the normal path for
that key and says why in the probe. ZIMAGE_TURBO_CUDA_GRAPHS=0 turns the graphs off.

All graphs of a pipeline share one memory pool: they never run at once, and each call copies its output out
before the next replay can reuse the pool's memory.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

log = logging.getLogger("zimage_turbo")

ENV = "ZIMAGE_TURBO_CUDA_GRAPHS"
MAX_GRAPHS = 6  # shapes x LoRA variants kept; the least recently used goes first


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def _storage_addresses(t: torch.Tensor) -> tuple:
    """Where a tensor's data lives: its address, or its inner tensors' for a wrapper subclass (torchao fp8)."""
    try:
        return (t.data_ptr(),)
    except (RuntimeError, NotImplementedError):
        pass
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return (id(t),)
    names, _ = flatten()
    out: tuple = ()
    for name in names:
        out += _storage_addresses(getattr(t, name))
    return out


def weights_fingerprint(module: nn.Module) -> int:
    """A number that changes when a module of the tree or the storage behind any weight changes.

    Run once per generation while the GPU waits (~1-3 ms for the true-size transformer): the private dicts are read
    directly, named_modules()/parameters() generators cost twice as much.
    """
    parts = []
    for m in module.modules():
        parts.append(id(m))
        for group in (m._parameters, m._buffers):
            for t in group.values():
                if t is not None:
                    parts.append(_storage_addresses(t))
    return hash(tuple(parts))


def _shape_key(x: torch.Tensor, t: torch.Tensor, embeds: list[torch.Tensor]) -> tuple:
    return (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, tuple((tuple(e.shape), e.dtype) for e in embeds))


class _Graph:
    def __init__(self, graph, x, t, embeds, out):
        self.graph, self.x, self.t, self.embeds, self.out = graph, x, t, embeds, out

    def run(self, x, t, embeds) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        for buf, e in zip(self.embeds, embeds):
            buf.copy_(e)
        self.graph.replay()
        return self.out.clone()  # the shared pool's memory may serve another graph's replay next


class StepGraphs:
    """The captured denoiser calls of one pipeline (see the module's note)."""

    def __init__(self, device: torch.device, max_graphs: int = MAX_GRAPHS):
        self.device = device
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.seen: set = set()  # keys called once (captured at their second call)
        self.failed: dict[tuple, str] = {}  # key -> why its capture failed (not tried again)
        self.pool = None
        self.captures = 0
        self.replays = 0

    def clear(self) -> None:
        """Forget every graph (their pool's memory goes back to torch's cache)."""
        self.graphs.clear()
        self.seen.clear()
        self.pool = None

    def why_not(self, pipe, compiled: bool) -> str:
        """"" when this generation may use graphs, else why not (for the probe)."""
        if pipe.device.type != "cuda":
            return "CUDA only"
        if not enabled_by_env():
            return f"off ({ENV}=0)"
        if not compiled:
            return "the compiled path only"
        if pipe.tstate.streamer is not None:
            return "not with a streamed transformer"
        if pipe.warmup.running:
            return "not while the background compile runs"
        return ""

    def runner(self, model: Callable, variant) -> "_Runner":
        """A callable like `model(x, t, embeds)` for one generation whose weights are identified by `variant`."""
        return _Runner(self, model, variant)

    def _capture(self, key, model, x, t, embeds) -> _Graph:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        xs, ts, es = x.clone(), t.clone(), [e.clone() for e in embeds]
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a ComfyUI preview, another pipeline) do not spoil the capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = model(xs, ts, es)
        g = _Graph(graph, xs, ts, es, out)
        self.graphs[key] = g
        self.captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return g


class _Runner:
    def __init__(self, graphs: StepGraphs, model: Callable, variant):
        self.g = graphs
        self.model = model
        self.variant = variant
        self.used = False  # a graph was replayed in this generation
        self.note = ""  # why a capture failed, for the probe

    def __call__(self, x: torch.Tensor, t: torch.Tensor, embeds: list[torch.Tensor]) -> torch.Tensor:
        g = self.g
        key = (_shape_key(x, t, embeds), self.variant)
        graph = g.graphs.get(key)
        if graph is None:
            if key in g.failed:
                self.note = g.failed[key]
                return self.model(x, t, embeds)
            if key not in g.seen:
                if len(g.seen) > 256:  # keys of weights long gone
                    g.seen.clear()
                g.seen.add(key)
                return self.model(x, t, embeds)  # the first call makes whatever is lazy, outside any capture
            try:
                graph = g._capture(key, self.model, x, t, embeds)
            except Exception as exc:  # noqa: BLE001 - a graph is an optimisation: the normal call serves
                g.failed[key] = self.note = f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
                g.graphs.pop(key, None)
                log.warning("zimage_turbo: CUDA graph %s; this shape runs without one", self.note)
                torch.cuda.synchronize(g.device)
                return self.model(x, t, embeds)
        else:
            g.graphs.move_to_end(key)
        g.replays += 1
        self.used = True
        return graph.run(x, t, embeds)
