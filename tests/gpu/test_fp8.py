"""GPU suite, fp8 (fast) mode: `pytest -m gpu` on a machine with CUDA (skipped elsewhere).

Finite output close to bf16, eager and compiled; the refusal on a GPU without fp8 tensor cores (simulated by
replacing the capability check); LoRA switching beside the fp8 weights with all-off bit-identical; bf16 <-> fp8 on
the same files; and, with ZIMAGE_FULL_ROOT (bench/build_model.py's true-size random model), the memory budgets.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from zimage_turbo.engine import api
from zimage_turbo.engine.files.model_files import COMPONENTS, DiffusersFolder, SplitFiles
from zimage_turbo.engine.lora import LoraSpec
from zimage_turbo.engine.probing import device_stats
from zimage_turbo.engine.sampling import fp8_mode
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GIB = 1024**3
REQ = GenerationRequest("a red fox, 狐狸, soft light", width=64, height=64, seed=3)
# The tiny model has 2 main blocks, both kept by the default policy: quantise every block matrix the kernels take.
EVERYTHING = fp8_mode.Fp8Policy(name="test_all", keep_first=0, keep_last=0, refiners=True, modulation=True)


def _fp8_ready() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    why = fp8_mode.unsupported_reason(torch.device("cuda:0"))
    if why:
        return why
    try:
        fp8_mode.torchao_version()
    except api.Fp8UnsupportedError as exc:
        return str(exc)
    return None


FP8 = pytest.mark.skipif(_fp8_ready() is not None, reason=f"fp8 mode cannot run here: {_fp8_ready()}")


@pytest.fixture()
def cuda0():
    return torch.device("cuda:0")


def src(tiny):
    return DiffusersFolder(tiny["built"].diffusers_dir)


def test_refused_on_a_gpu_without_fp8_tensor_cores(tiny, fresh_engine, cuda0, monkeypatch):
    monkeypatch.setattr(fp8_mode, "device_capability", lambda device: (8, 6))  # an RTX 3090 / A10
    loads = COMPONENTS.loads
    with pytest.raises(api.Fp8UnsupportedError) as info:
        api.resolve_precision(api.FP8_CHOICE, cuda0)
    msg = str(info.value)
    assert "compute capability 8.6, without fp8 tensor cores" in msg and "8.9 or newer" in msg
    assert torch.cuda.get_device_name(cuda0) in msg and "Choose dtype bf16" in msg
    with pytest.raises(api.Fp8UnsupportedError, match="compute capability 8.6"):
        get_pipeline(src(tiny), cuda0, torch.bfloat16, "resident", "off", fp8=EVERYTHING)
    assert COMPONENTS.loads == loads and api.loaded() == []


@FP8
def test_fp8_output_is_finite_and_close_to_bf16_eager_and_compiled(tiny, fresh_engine, cuda0):
    bf16 = get_pipeline(src(tiny), cuda0, torch.bfloat16, "resident", "off")
    ref = bf16.generate(REQ)
    pipe = get_pipeline(src(tiny), cuda0, torch.bfloat16, "resident", "off", fp8=EVERYTHING)
    assert len(fp8_mode.fp8_state(pipe.transformer)) > 10
    eager = pipe.generate(REQ)
    assert torch.isfinite(eager.images).all() and torch.isfinite(eager.latents).all()
    rel = ((eager.latents - ref.latents).norm() / ref.latents.norm()).item()
    assert 0 < rel < 0.15, rel
    assert eager.report.fp8.startswith("fp8 (fast)")
    compiled = pipe.generate(REQ, compile_mode="on")
    assert compiled.report.compile_path.startswith("compiled"), compiled.report.compile_path
    assert torch.isfinite(compiled.images).all()
    assert (compiled.images - eager.images).abs().mean() < 0.01  # fused kernels round differently, nothing more
    # every parameter on the GPU, fp8 ones included
    assert all(p.device == cuda0 for p in pipe.transformer.parameters())


@FP8
def test_fp8_lora_switching_is_fast_and_all_off_is_bit_identical(tiny, fresh_engine, cuda0):
    a, b = tiny["loras"]["diffusers"][0], tiny["loras"]["kohya_fused"][0]
    pipe = get_pipeline(src(tiny), cuda0, torch.bfloat16, "resident", "off", fp8=EVERYTHING)
    before = {n: (q.clone(), s.clone()) for n, (q, s) in fp8_mode.fp8_state(pipe.transformer).items()}
    base = pipe.generate(REQ).images
    styled = pipe.generate(REQ, [LoraSpec(a, 0.8)])
    assert styled.report.lora_path == "adapters" and "fp8" in styled.report.lora_why_adapters
    assert not torch.equal(styled.images, base) and torch.isfinite(styled.images).all()
    switches = []
    for spec in ([LoraSpec(a, 1.1)], [LoraSpec(b, 0.8)], [LoraSpec(a, 0.5), LoraSpec(b, -0.3)], [LoraSpec(a, 0.8)]):
        rep = pipe.generate(REQ, spec).report
        switches.append(rep.lora_s)
        assert rep.lora_path == "adapters"
    assert max(switches[1:]) < 0.25, switches  # files are on the device: a switch copies rank-r factors
    assert torch.equal(pipe.generate(REQ, [LoraSpec(a, 0.8)]).images, styled.images)  # same stack, same bits
    assert torch.equal(pipe.generate(REQ, []).images, base)
    after = fp8_mode.fp8_state(pipe.transformer)
    for name, (q0, s0) in before.items():
        q, s = after[name]
        assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0), name


@FP8
def test_compiled_fp8_all_off_after_loras_is_bit_identical(tiny, fresh_engine, cuda0):
    """The benchmark's case: compiled fp8, a LoRA on (adapter slots are built: a new compiled variant), then all off.
    Same prompt, seed and size: the image must be the one made before any LoRA, bit for bit."""
    a, b = tiny["loras"]["diffusers"][0], tiny["loras"]["kohya_fused"][0]
    pipe = get_pipeline(src(tiny), cuda0, torch.bfloat16, "resident", "on", fp8=EVERYTHING)
    base = pipe.generate(REQ)
    assert base.report.compiled
    with torch.inference_mode():
        emb = pipe.encode(REQ.prompt)[0].clone()
    styled = pipe.generate(REQ, [LoraSpec(a, 0.8)])
    assert styled.report.lora_path == "adapters" and styled.report.compiled
    pipe.generate(REQ, [LoraSpec(b, 0.7)])
    off = pipe.generate(REQ, [])
    assert off.report.compiled
    with torch.inference_mode():
        assert torch.equal(pipe.encode(REQ.prompt)[0], emb)
    diff = (off.latents - base.latents).abs().max().item()
    assert torch.equal(off.latents, base.latents), f"latents differ by up to {diff} ({off.report.compile_path})"
    assert torch.equal(off.images, base.images)


@FP8
def test_a_compiled_bf16_pipeline_turns_fp8_and_back(tiny, fresh_engine, cuda0):
    bf16 = get_pipeline(src(tiny), cuda0, torch.bfloat16, "resident", "on")
    first = bf16.generate(REQ, [LoraSpec(tiny["loras"]["diffusers"][0], 0.8)])  # compiled, a LoRA merged
    base = bf16.generate(REQ).images
    assert first.report.compiled
    fp8 = get_pipeline(src(tiny), cuda0, torch.bfloat16, "resident", "on", fp8=EVERYTHING)
    out = fp8.generate(REQ)
    assert out.report.compile_path.startswith("compiled") and torch.isfinite(out.images).all()
    with pytest.raises(api.InvalidSettingError, match="queue the prompt again"):
        bf16.generate(REQ)
    again = get_pipeline(src(tiny), cuda0, torch.bfloat16, "resident", "on")
    assert fp8_mode.policy_of(again.transformer) is None
    assert (again.generate(REQ).images - base).abs().max() < 1e-2  # read again from the file; compiled again


@FP8
def test_fp8_with_the_text_encoder_offloaded(tiny, fresh_engine, cuda0):
    pipe = get_pipeline(src(tiny), cuda0, torch.bfloat16, "offload_text_encoder", "off", fp8=EVERYTHING)
    out = pipe.generate(REQ)
    assert torch.isfinite(out.images).all()
    assert all(p.device.type == "cpu" for layer in pipe.text_encoder.layers for p in layer.parameters())
    # The fp8 text encoder's plain fp8 weights stream like bf16 ones: the same image as with them resident.
    assert fp8_mode.text_encoder_fp8_layers(pipe.text_encoder) == 7 * len(pipe.text_encoder.layers)
    assert pipe.text_encoder.layers[0].mlp.up_proj.weight.is_pinned()
    pipe.testate.embeddings.clear()  # the prompt is encoded again, by the resident encoder
    resident = pipe.generate(REQ, memory="resident")
    assert not resident.report.embedding_cache_hit
    assert all(p.device == cuda0 for p in pipe.text_encoder.layers.parameters())
    pipe.testate.embeddings.clear()
    assert torch.equal(resident.images, out.images) and torch.equal(pipe.generate(REQ).images, out.images)
    with pytest.raises(api.Fp8UnsupportedError, match="low_vram"):
        pipe.generate(REQ, memory="low_vram")


FULL = os.environ.get("ZIMAGE_FULL_ROOT")


@FP8
@pytest.mark.skipif(not FULL, reason="set ZIMAGE_FULL_ROOT to the true-size model folder (bench/build_model.py)")
# Issue 11's target: resident with fp8 weights within 14 GiB (a 16 GB card). The text encoder's fp8 weights
# (weight-only) bring it there; in bf16 it alone is 7.5 GiB beside the fp8 transformer (16.6 GiB measured).
@pytest.mark.parametrize("memory,budget_gib", [("offload_text_encoder", 14.0), ("resident", 14.0)])
def test_true_size_fp8_memory(fresh_engine, cuda0, memory, budget_gib):
    root = Path(FULL)
    src_full = SplitFiles(root / "diffusion_models" / "z_image_turbo_bf16.safetensors",
                          root / "text_encoders" / "qwen_3_4b.safetensors", root / "vae" / "ae.safetensors",
                          root / "qwen_tokenizer")
    pipe = get_pipeline(src_full, cuda0, torch.bfloat16, memory, "off", fp8=fp8_mode.POLICIES["default"])
    chosen = fp8_mode.plan_of(pipe.transformer)
    assert len(chosen.fp8) == 28 * 7
    transformer_bytes = sum(fp8_mode.tensor_bytes(p) for p in pipe.transformer.parameters())
    assert transformer_bytes < 8e9  # 12.3 GB in bf16
    te_bytes = sum(fp8_mode.tensor_bytes(p) for p in pipe.text_encoder.parameters())
    assert fp8_mode.text_encoder_fp8_layers(pipe.text_encoder) == 7 * 35 and te_bytes < 4.5e9  # 8.0 GB in bf16
    pipe.generate(GenerationRequest("a lighthouse at dusk, 灯塔", width=1024, height=1024, seed=1))
    device_stats.reset_peak(cuda0)
    rep = pipe.generate(GenerationRequest("another prompt, 新的提示", width=1024, height=1024, seed=2)).report
    peak = rep.torch_memory["peak_allocated_bytes"] / GIB
    print(f"fp8 {memory}: peak {peak:.2f} GiB, transformer {transformer_bytes / GIB:.2f} GiB, text encoder "
          f"{te_bytes / GIB:.2f} GiB, {rep.mean_step_s * 1e3:.1f} ms/step, text encode {rep.text_encode_s * 1e3:.1f} ms")
    assert peak <= budget_gib
