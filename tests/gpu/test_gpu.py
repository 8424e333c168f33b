"""GPU suite: `pytest -m gpu` on a machine with CUDA (skipped elsewhere).

Uses the tiny model, and the true-size random model too when ZIMAGE_FULL_ROOT points at
the folder bench/build_model.py wrote (memory budgets are only meaningful at true size).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from zimage_turbo.engine.probing import device_stats
from zimage_turbo.engine.files.model_files import DiffusersFolder, SplitFiles
from zimage_turbo.engine.lora import LoraSpec
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GIB = 1024**3
REQ = GenerationRequest("a red fox, 狐狸, soft light", width=64, height=64, seed=3)


@pytest.fixture()
def cuda0():
    return torch.device("cuda:0")


def all_tensors(pipe):
    for m in (pipe.transformer, pipe.text_encoder, pipe.vae):
        yield from m.named_parameters()
        yield from m.named_buffers()


def test_pinning_puts_every_weight_on_the_device(tiny, fresh_engine, cuda0):
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), cuda0, torch.bfloat16, "resident", "off")
    wrong = [n for n, t in all_tensors(pipe) if t.device != cuda0]
    assert wrong == []
    res = pipe.generate(REQ)
    assert torch.isfinite(res.images).all() and res.images.device.type == "cpu"


def test_probe_has_nvml_figures_of_this_gpu(tiny, fresh_engine, cuda0):
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), cuda0, torch.bfloat16, "resident", "off")
    rep = pipe.generate(REQ).report
    nv = rep.nvml_during
    assert nv["available"], nv
    assert nv["total_bytes"] > 8 * GIB and 0 < nv["used_bytes"] <= nv["total_bytes"]
    assert 0 <= nv["utilization_pct"] <= 100 and 10 < nv["temperature_c"] < 100
    assert torch.cuda.get_device_name(cuda0).split()[-1] in nv["name"]
    assert rep.torch_memory["peak_allocated_bytes"] > 0
    assert len(rep.step_s) == 8 and all(s > 0 for s in rep.step_s)
    assert "utilization" in rep.to_text()


def test_fp16_finite_on_gpu(tiny, fresh_engine, cuda0):
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), cuda0, torch.float16, "resident", "off")
    out = pipe.generate(REQ).images
    ref = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), cuda0, torch.float32, "resident", "off").generate(REQ).images
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.05


def test_gpu_image_matches_cpu_image(tiny, fresh_engine, cuda0):
    src = DiffusersFolder(tiny["built"].diffusers_dir)
    gpu = get_pipeline(src, cuda0, torch.float32, "resident", "off").generate(REQ).images
    cpu = get_pipeline(src, torch.device("cpu"), torch.float32).generate(REQ).images
    assert (gpu - cpu).abs().max() < 2e-3  # same noise (drawn on the CPU), same math


@pytest.mark.parametrize("memory", ["offload_text_encoder", "low_vram"])
def test_memory_modes_give_the_resident_image(tiny, fresh_engine, cuda0, memory):
    src = DiffusersFolder(tiny["built"].diffusers_dir)
    resident = get_pipeline(src, cuda0, torch.float32, "resident", "off").generate(REQ).images
    pipe = get_pipeline(src, cuda0, torch.float32, memory, "off")
    out = pipe.generate(GenerationRequest(REQ.prompt + " again", width=64, height=64, seed=3)).images
    out = pipe.generate(REQ).images
    torch.testing.assert_close(out, resident, rtol=0, atol=1e-5)
    for layer in pipe.text_encoder.layers:  # between runs the text encoder waits in pinned host memory
        for p in layer.parameters():
            assert p.device.type == "cpu" and p.is_pinned()
    table = pipe.text_encoder.embed_tokens.weight  # looked up on the host in offload modes
    assert table.device.type == "cpu" and table.is_pinned()
    streamed = [p for blk in pipe.transformer.layers for p in blk.parameters()]
    if memory == "low_vram":
        assert all(p.device.type == "cpu" and p.is_pinned() for p in streamed)
    else:
        assert all(p.device == cuda0 for p in streamed)
    # back to resident: everything returns to the device
    back = get_pipeline(src, cuda0, torch.float32, "resident", "off")
    back.generate(REQ)
    assert [n for n, t in all_tensors(back) if t.device != cuda0] == []


def test_compiled_equals_eager_and_lora_switches_do_not_recompile(tiny, fresh_engine, cuda0):
    from torch._dynamo.utils import counters

    src = DiffusersFolder(tiny["built"].diffusers_dir)
    path = tiny["loras"]["kohya_fused"][0]
    eager = get_pipeline(src, cuda0, torch.float32, "resident", "off")
    ref_base = eager.generate(REQ).images
    ref_lora = eager.generate(REQ, [LoraSpec(path, 0.5)]).images
    pipe = get_pipeline(src, cuda0, torch.float32, "resident", "on")
    base = pipe.generate(REQ, []).images  # "on": waits for the warm-up
    assert pipe.last_report.compiled and pipe.last_report.compile_path.startswith("compiled")
    # fp32 on the GPU: fused kernels round differently from eager ones, far below one 8-bit level (4e-3)
    torch.testing.assert_close(base, ref_base, rtol=0, atol=2e-3)
    styled = pipe.generate(REQ, [LoraSpec(path, 0.5)])
    assert styled.report.lora_path == "merged"
    torch.testing.assert_close(styled.images, ref_lora, rtol=0, atol=2e-3)
    graphs = counters["stats"]["unique_graphs"]
    rep = pipe.generate(REQ, [LoraSpec(path, 1.0)]).report  # strength change
    # new prompt lengths (padded and not), sizes (square or not, padded image tokens or not)
    for i, (w, h, words) in enumerate([(96, 64, 5), (64, 96, 31), (240, 240, 12), (1008, 1008, 44), (64, 64, 70)]):
        text = " ".join(["a lighthouse on a cliff 灯塔"] * words)
        pipe.generate(GenerationRequest(text, width=w, height=h, seed=i), [LoraSpec(path, 1.0)] if i % 2 else [])
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
    assert rep.lora_s < 0.05 and not rep.base_reloaded
    assert torch.equal(pipe.generate(REQ, []).images, base)


def test_background_compile_and_adapter_variant_on_gpu(tiny, fresh_engine, cuda0):
    """auto on a GPU: eager images at once, compiled ones after the warm-up; an adapter variant likewise."""
    src = DiffusersFolder(tiny["built"].diffusers_dir)
    path = tiny["loras"]["diffusers"][0]
    pipe = get_pipeline(src, cuda0, torch.bfloat16, "resident", "auto")
    first = pipe.generate(REQ)
    assert first.report.compile_path == "eager (compiling in the background)"
    assert pipe.wait_warm(600) and pipe.generate(REQ).report.compile_path == "compiled"
    pipe.tstate.lora.mode = "adapters"
    styled = pipe.generate(REQ, [LoraSpec(path, 0.8)])
    assert styled.report.lora_path == "adapters"
    assert styled.report.compile_path == "eager (compiling in the background)"
    assert pipe.wait_warm(600)
    again = pipe.generate(REQ, [LoraSpec(path, 0.8)])
    assert again.report.compile_path == "compiled", pipe.compile_status()
    assert (again.images - styled.images).abs().mean() < 0.01  # compiled vs eager bf16: rounding only


def test_low_vram_never_merges(tiny, fresh_engine, cuda0):
    src = DiffusersFolder(tiny["built"].diffusers_dir)
    path = tiny["loras"]["diffusers"][0]
    pipe = get_pipeline(src, cuda0, torch.bfloat16, "resident", "off")
    base = pipe.generate(REQ).images
    resident = pipe.generate(REQ, [LoraSpec(path, 0.8)])
    assert resident.report.lora_path == "merged"
    low = pipe.generate(REQ, [LoraSpec(path, 0.8)], memory="low_vram")
    assert low.report.lora_path == "adapters" and "streams" in low.report.lora_why_adapters
    # bf16: merged weights are rounded once more than the adapter path; the same style, not the same bits
    assert (low.images - resident.images).abs().mean() < 0.01
    assert torch.equal(pipe.generate(REQ, memory="resident").images, base)


FULL = os.environ.get("ZIMAGE_FULL_ROOT")


@pytest.mark.skipif(not FULL, reason="set ZIMAGE_FULL_ROOT to the true-size model folder (bench/build_model.py)")
@pytest.mark.parametrize("memory,budget_gib", [("resident", 22.0), ("offload_text_encoder", 15.0)])
def test_true_size_memory_budgets(fresh_engine, cuda0, memory, budget_gib):
    root = Path(FULL)
    src = SplitFiles(root / "diffusion_models" / "z_image_turbo_bf16.safetensors",
                     root / "text_encoders" / "qwen_3_4b.safetensors", root / "vae" / "ae.safetensors",
                     root / "qwen_tokenizer")
    pipe = get_pipeline(src, cuda0, torch.bfloat16, memory, "off")  # compiling changes nothing here but time
    big = GenerationRequest("a lighthouse at dusk, 灯塔", width=1024, height=1024, seed=1)
    pipe.generate(big)
    device_stats.reset_peak(cuda0)
    rep = pipe.generate(GenerationRequest("another prompt, 新的提示", width=1024, height=1024, seed=2)).report
    assert rep.torch_memory["peak_allocated_bytes"] / GIB <= budget_gib


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (nvidia-h200-x2)")


@TWO_GPUS
def test_pinned_to_the_second_gpu_every_cuda_call_names_it(tiny, fresh_engine, monkeypatch):
    """A pipeline on cuda:1 in a process whose current device is 0 (ComfyUI's default)."""
    cuda1 = torch.device("cuda:1")
    torch.cuda.set_device(0)
    recorded = []
    real_record = torch.cuda.Event.record

    def spy(self, stream=None):
        recorded.append((stream or torch.cuda.current_stream()).device)
        return real_record(self, stream)

    monkeypatch.setattr(torch.cuda.Event, "record", spy)
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), cuda1, torch.bfloat16, "resident", "off")
    rep = pipe.generate(REQ).report
    assert [n for n, t in all_tensors(pipe) if t.device != cuda1] == []
    assert recorded and set(recorded) == {cuda1}  # every step event on the pipeline's own GPU
    assert torch.cuda.current_device() == 0  # ComfyUI's current device is left as it was
    assert rep.device == "cuda:1" and rep.nvml_during["available"]
    assert torch.cuda.get_device_name(cuda1).split()[-1] in rep.nvml_during["name"]


@TWO_GPUS
@pytest.mark.skipif(not FULL, reason="set ZIMAGE_FULL_ROOT to the true-size model folder (bench/build_model.py)")
def test_true_size_step_times_on_the_second_gpu_match_the_first(fresh_engine):
    """The issue seen on two H200s: on cuda:1 step 0 read 90 ms where it takes 143 ms."""
    root = Path(FULL)
    src = SplitFiles(root / "diffusion_models" / "z_image_turbo_bf16.safetensors",
                     root / "text_encoders" / "qwen_3_4b.safetensors", root / "vae" / "ae.safetensors",
                     root / "qwen_tokenizer")
    big = GenerationRequest("a lighthouse at dusk, 灯塔", width=1024, height=1024, seed=1)
    torch.cuda.set_device(0)
    steps = {}
    for dev in ("cuda:0", "cuda:1"):
        pipe = get_pipeline(src, torch.device(dev), torch.bfloat16, "resident", "off")
        pipe.generate(big)
        rep = pipe.generate(big).report
        steps[dev] = rep.step_s
        # The events bracket the real work: the steps add up to the wall time of the denoise loop.
        assert sum(rep.step_s) == pytest.approx(rep.denoise_s, rel=0.1)
        from zimage_turbo.engine.sampling import pipeline as engine_pipeline

        engine_pipeline.release_all()
    for a, b in zip(steps["cuda:0"], steps["cuda:1"]):
        assert b == pytest.approx(a, rel=0.15)
