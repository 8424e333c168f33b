"""Where a step's and a decode's time goes, and what CUDA graphs would be worth (issue 11's bf16 distance).

Used by bench/fp8_cost.py's `anatomy` section on a warm, compiled pipeline:
  profile   kernels of an 8-step generate minus those of a 4-step one (same size, same prompt: the embedding
            is cached, so only the steps differ) / 4 = one step's kernels, by kind: GEMM, attention, inductor's
            fused kernels (norms, modulation, gating, RoPE inside the compiled blocks), other eager kernels (the
            glue outside the compiled blocks), copies; the 4-step run minus its 4 steps = text encode + decode.
            The GPU's busy time per step against the step's wall time (CUDA events) is the idle time, the most
            that removing launch gaps (CUDA graphs) could win.
  graphs    the denoiser call of one step captured once in a torch.cuda.CUDAGraph and replayed, against the
            same call made normally; outputs compared.
  vae       the decoder as the pipeline runs it (dynamic shapes), and channels-last eager and compiled from a copy
            for this one size (static shapes: inductor's layout choices differ; a compile per size), and where its
            kernels go.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

KINDS = ("gemm", "attention", "conv", "triton_fused", "copy", "other")


def kernel_kind(name: str) -> str:
    n = name.lower()
    if "memcpy" in n or "memset" in n or n.startswith("copy") or "copy_kernel" in n:
        return "copy"
    if n.startswith("triton_") or n.startswith("triton"):
        return "triton_fused"
    if any(k in n for k in ("fmha", "flash", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")):
        return "attention"
    if any(k in n for k in ("conv", "fprop", "implicit_convolve", "winograd", "dgrad", "wgrad")):
        return "conv"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "kernel2", "addmm",
                            "aten::mm", "aten::bmm", "aten::linear")):
        return "gemm"
    return "other"


def _kernel_events(prof, cuda: bool):
    from torch.autograd import DeviceType

    events = prof.events()
    if cuda:
        return [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == DeviceType.CUDA]
    # CPU smoke runs: top-level aten ops stand in for kernels (the harness, not a measurement)
    return [(e.name, e.cpu_time_total) for e in events if e.name.startswith("aten::") and e.cpu_parent is None]


def _profile(pipe, req, cuda: bool) -> tuple[dict, dict, float]:
    """(ms per kind, ms per kernel name, wall ms of the steps from the report) for one generate."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        result = pipe.generate(req)
        if cuda:
            torch.cuda.synchronize()
    kinds = dict.fromkeys(KINDS, 0.0)
    names: dict[str, float] = {}
    for name, us in _kernel_events(prof, cuda):
        kinds[kernel_kind(name)] += us / 1000
        names[name] = names.get(name, 0.0) + us / 1000
    return kinds, names, sum(result.report.step_s) * 1000


def profile_steps(pipe, make_request, cuda: bool, steps=(8, 4)) -> dict:
    """One step's kernels by kind, from the difference of two runs that differ only in their step count."""
    hi, lo = steps
    prompt = "a lighthouse on a cliff at dawn, waves on the rocks, soft light, take anatomy"
    pipe.generate(make_request(prompt=prompt, steps=hi))  # warm: same prompt (cached embedding), same size
    k_hi, n_hi, wall_hi = _profile(pipe, make_request(prompt=prompt, steps=hi), cuda)
    k_lo, n_lo, wall_lo = _profile(pipe, make_request(prompt=prompt, steps=lo), cuda)
    per_step = {k: (k_hi[k] - k_lo[k]) / (hi - lo) for k in KINDS}
    busy = sum(per_step.values())
    wall = (wall_hi - wall_lo) / (hi - lo)  # the steps' CUDA-event time (also under the profiler)
    outside = {k: k_lo[k] - lo * per_step[k] for k in KINDS}  # text encode + VAE decode (+ the final check)
    top = sorted(((n, (n_hi.get(n, 0.0) - n_lo.get(n, 0.0)) / (hi - lo)) for n in n_hi), key=lambda x: -x[1])[:20]
    return {"per_step_ms": per_step, "busy_ms_per_step": busy, "step_wall_ms": wall,
            "idle_ms_per_step": wall - busy, "outside_steps_ms": outside,
            "top_kernels_per_step": [{"name": n[:120], "kind": kernel_kind(n), "ms": ms} for n, ms in top],
            "how": f"kernels of a {hi}-step minus a {lo}-step generate, divided by {hi - lo}"}


def _ms_by_kind(prof, cuda: bool) -> tuple[dict, int]:
    """({kind: ms} over KINDS, number of kernels) of a profile."""
    kinds = dict.fromkeys(KINDS, 0.0)
    n = 0
    for name, us in _kernel_events(prof, cuda):
        kinds[kernel_kind(name)] += us / 1000
        n += 1
    return kinds, n


def text_encode_profile(pipe, cuda: bool, runs: int = 5) -> dict:
    """A new prompt's encoding: wall time vs the GPU's busy time (kernels by kind), i.e. GPU- or host-bound."""
    from torch.profiler import ProfilerActivity, profile

    from zimage_turbo.engine.sampling import acceleration

    sync = (lambda: torch.cuda.synchronize(pipe.device)) if cuda else (lambda: None)
    prompts = [f"a harbour at dusk number {i}, fishing boats, lanterns, 渔船, gentle rain, take encode" for i in range(runs + 2)]
    walls = []
    compiled = acceleration.is_compiled(pipe.text_encoder)
    with torch.inference_mode(), acceleration.tracing_context(), acceleration.compiled_calls(compiled):
        pipe.encode(prompts[0])
        for p in prompts[1:-1]:
            sync()
            t0 = time.perf_counter()
            pipe.encode(p)
            sync()
            walls.append((time.perf_counter() - t0) * 1000)
        with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
            sync()
            t0 = time.perf_counter()
            _, _, tokens, _ = pipe.encode(prompts[-1])
            sync()
            wall_profiled = (time.perf_counter() - t0) * 1000
    kinds, n = _ms_by_kind(prof, cuda)
    busy = sum(kinds.values())
    return {"wall_ms": statistics.median(walls), "wall_all_ms": walls, "tokens": tokens, "compiled": compiled,
            "profiled_wall_ms": wall_profiled, "gpu_busy_ms": busy, "kernels": n, "kernels_ms": kinds,
            "gpu_idle_share": 1 - busy / wall_profiled if wall_profiled else None}


def _event_ms(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def cuda_graph_step(pipe, size: int, runs: int = 10) -> dict:
    """The denoiser call of one 1024² step: normal call vs a captured CUDA graph's replay (ms, outputs compared)."""
    from zimage_turbo.engine.sampling import acceleration

    dev = pipe.device
    emb, *_ = pipe.encode("a cat on a windowsill, morning light, take graphs")
    gen = torch.Generator(device="cpu").manual_seed(5)
    lat = torch.randn((1, 16, size // 8, size // 8), generator=gen).to(dev)
    t_model = torch.full((1,), 0.5, device=dev)
    out: dict = {}
    with torch.inference_mode(), acceleration.tracing_context(), acceleration.compiled_calls(True):
        ref = pipe._model(lat, t_model, [emb])
        normal = _event_ms(lambda: pipe._model(lat, t_model, [emb]), runs)
        out["normal_ms"] = statistics.median(normal)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                pipe._model(lat, t_model, [emb])
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        try:
            with torch.cuda.graph(graph):
                static_out = pipe._model(lat, t_model, [emb])
        except Exception as exc:  # noqa: BLE001 - what stops a capture is the finding
            out["capture_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            torch.cuda.synchronize(dev)
            return out
        out["capture_s"] = time.perf_counter() - t0
        graph.replay()
        torch.cuda.synchronize(dev)
        out["max_abs_diff_vs_normal"] = float((static_out - ref).abs().max())
        out["bit_identical"] = bool(torch.equal(static_out, ref))
        out["graph_ms"] = statistics.median(_event_ms(graph.replay, runs))
        out["saved_ms_per_step"] = out["normal_ms"] - out["graph_ms"]
        out["pool_note"] = "the graph keeps its own memory pool for the activations of this one shape"
        del graph, static_out
    torch.cuda.empty_cache()
    return out


def vae_variants(pipe, size: int, cuda: bool, runs: int = 5) -> dict:
    """Decode times: as the pipeline runs it, and channels-last eager / compiled (from a copy); kernels by kind."""
    from torch.profiler import ProfilerActivity, profile

    from zimage_turbo.engine.sampling import acceleration

    dev = pipe.device
    vae = pipe.vae
    lat = torch.randn((1, 16, size // 8, size // 8), device=dev, dtype=vae.dtype)
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(runs):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append((time.perf_counter() - t0) * 1000)
        return statistics.median(ts)

    out: dict = {}
    with torch.inference_mode(), acceleration.tracing_context():
        with acceleration.compiled_calls(True):
            out["as_run_ms"] = timed(lambda: vae.decode(lat, return_dict=False))
            with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
                vae.decode(lat, return_dict=False)
                sync()
        out["as_run_kernels_ms"] = _ms_by_kind(prof, cuda)[0]
        with acceleration.compiled_calls(False):
            out["eager_ms"] = timed(lambda: vae.decode(lat, return_dict=False))
        dec = copy.deepcopy(vae.decoder).to(memory_format=torch.channels_last)
        dec._compiled_call_impl = None
        x = (lat * 1.0).contiguous(memory_format=torch.channels_last)
        out["channels_last_eager_ms"] = timed(lambda: dec(x))
        if cuda:
            t0 = time.perf_counter()
            cdec = torch.compile(dec, dynamic=False)
            cdec(x)
            sync()
            out["channels_last_compile_s"] = time.perf_counter() - t0
            out["channels_last_compiled_ms"] = timed(lambda: cdec(x))
            ref = vae.decoder(lat)
            got = cdec(x)
            out["channels_last_max_abs_diff"] = float((got.float() - ref.float()).abs().max())
            cdec = None  # noqa: F841 - its graphs and buffers go now
        dec = None  # noqa: F841
    return out
