"""fp8 (fast) mode on the CPU: the policy, the refusals, and (simulated) the mode itself with LoRA switching.

A CPU has no fp8 tensor cores, so the engine refuses the mode here. torchao's float8 tensors still compute on a
CPU (torch 2.15), so the `fp8_on_cpu` fixture tells both the engine's capability check and torchao's own that this
CPU is an fp8 GPU: the conversion, the LoRA bookkeeping and the numbers then run for real on the tiny model. The GPU
suite (tests/gpu/test_fp8.py) runs the same on real fp8 hardware.
"""

from __future__ import annotations

import json
import shutil
import weakref

import pytest
import torch

from devtools import lora_formats
from devtools.model_builder import TINY, TINY_TRANSFORMER_CONFIG
from zimage_turbo.engine import api
from zimage_turbo.engine.errors import Fp8UnsupportedError, InvalidSettingError, LoraKeyError
from zimage_turbo.engine.files.model_files import COMPONENTS, DiffusersFolder, SplitFiles
from zimage_turbo.engine.lora import LoraSpec
from zimage_turbo.engine.model_config import TRANSFORMER_CONFIG
from zimage_turbo.engine.sampling import fp8_mode
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

CPU = torch.device("cpu")
REQ = GenerationRequest("a red fox, 狐狸, soft light", width=64, height=64, steps=3, seed=3)
# Every block matrix the kernels can take: on the tiny model (2 main blocks) the default keeps both main blocks.
EVERYTHING = fp8_mode.Fp8Policy(name="test_all", keep_first=0, keep_last=0, refiners=True, modulation=True)


def meta_transformer(**overrides):
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        return ZImageTransformer2DModel(**dict(TINY_TRANSFORMER_CONFIG, **overrides))


# ------------------------------------------------------------------ policy


def test_default_policy_on_the_tiny_architecture():
    # 6 main blocks; dim 96 (3 heads of 32) so the FFN (256 wide) fits the fp8 kernels' multiples of 16.
    model = meta_transformer(n_layers=6, dim=96, n_heads=3, n_kv_heads=3)
    chosen = fp8_mode.plan(model, fp8_mode.POLICIES["default"])
    parts = fp8_mode.BLOCK_PARTS
    assert set(chosen.fp8) == {f"layers.{i}.{p}" for i in range(1, 5) for p in parts}
    kept = dict(chosen.kept)
    assert {kept[f"layers.0.{p}"] for p in parts} == {"first blocks"}
    assert {kept[f"layers.5.{p}"] for p in parts} == {"last blocks"}
    assert {kept[f"{r}.0.{p}"] for r in ("noise_refiner", "context_refiner") for p in parts} == {"refiner block"}
    assert {kept[f"layers.{i}.adaLN_modulation.0"] for i in range(6)} == {"adaLN modulation"}
    for outside in ("all_x_embedder.2-1", "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2",
                    "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1"):
        assert kept[outside] == "outside the blocks (embedders, final layer)"
    assert "4 of" not in chosen.summary() and chosen.summary().startswith("policy default: 28 of ")
    assert json.loads(json.dumps(chosen.to_dict()))["fp8_layers"] == 28


def test_layers_the_fp8_kernels_cannot_take_stay_bf16():
    model = meta_transformer(n_layers=3)  # dim 64: the FFN is 170 wide
    chosen = fp8_mode.plan(model, EVERYTHING)
    kept = dict(chosen.kept)
    assert kept["layers.1.feed_forward.w1"] == "sizes not multiples of 16"
    assert "layers.1.attention.to_q" in chosen.fp8 and "noise_refiner.0.adaLN_modulation.0" in chosen.fp8
    assert "cap_embedder.1" in kept  # outside the blocks, whatever the policy


def test_true_size_default_and_conservative_policies():
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**TRANSFORMER_CONFIG)
    default = fp8_mode.plan(model, fp8_mode.POLICIES["default"])
    assert len(default.fp8) == 28 * 7  # blocks 1..28, q/k/v/out and the three FFN matrices
    assert 0.75 < default.fp8_weights / default.all_weights < 0.85
    conservative = fp8_mode.plan(model, fp8_mode.POLICIES["conservative"])
    assert len(conservative.fp8) == 14 * 7 and "layers.15.attention.to_q" not in conservative.fp8


def test_policy_from_the_environment(monkeypatch):
    assert fp8_mode.policy_from_env() == fp8_mode.POLICIES["default"]
    monkeypatch.setenv(fp8_mode.POLICY_ENV, "conservative")
    assert fp8_mode.policy_from_env().keep_last == 15
    monkeypatch.setenv(fp8_mode.POLICY_ENV, "fastest please")
    with pytest.raises(InvalidSettingError, match="unknown fp8 policy 'fastest please': use one of default"):
        fp8_mode.policy_from_env()


# ---------------------------------------------------------------- refusals


def test_refused_on_the_cpu_before_anything_loads(tiny, fresh_engine):
    with pytest.raises(Fp8UnsupportedError) as info:
        api.resolve_precision(api.FP8_CHOICE, CPU)
    msg = str(info.value)
    assert "fp8 tensor cores" in msg and "the CPU" in msg and "Choose dtype bf16" in msg
    assert isinstance(info.value, api.ZImageError)  # a user's setting, reported as such by the nodes
    loads = COMPONENTS.loads
    with pytest.raises(Fp8UnsupportedError, match="the CPU"):
        api.load(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.bfloat16, fp8=fp8_mode.POLICIES["default"])
    assert COMPONENTS.loads == loads and api.loaded() == []
    assert api.resolve_precision("bf16", CPU) == (torch.bfloat16, None)


def test_refused_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(fp8_mode, "device_capability", lambda device: (8, 0))  # an A100
    with pytest.raises(Fp8UnsupportedError) as info:
        api.resolve_precision(api.FP8_CHOICE, torch.device("cuda:0"))
    assert "compute capability 8.9 or newer" in str(info.value)
    assert "cuda:0" in str(info.value) and "compute capability 8.0, without fp8 tensor cores" in str(info.value)
    monkeypatch.setattr(fp8_mode, "device_capability", lambda device: (8, 9))  # an L4 / RTX 4090
    monkeypatch.setattr(fp8_mode, "torchao_version", lambda: "0.17.0")
    assert api.resolve_precision(api.FP8_CHOICE, torch.device("cuda:0"))[0] == torch.bfloat16


def test_refused_without_torchao_and_with_low_vram(monkeypatch):
    monkeypatch.setattr(fp8_mode, "device_capability", lambda device: (9, 0))
    with pytest.raises(Fp8UnsupportedError, match="low_vram streams bf16 blocks"):
        fp8_mode.check_supported(CPU, torch.bfloat16, "low_vram")
    monkeypatch.setitem(__import__("sys").modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(Fp8UnsupportedError, match=r"pip install torchao.*or choose dtype bf16"):
        fp8_mode.check_supported(CPU, torch.bfloat16, "resident")


# ------------------------------------------- the mode itself, simulated on the CPU


@pytest.fixture()
def fp8_on_cpu(monkeypatch):
    """This CPU passes for an fp8 GPU: the engine's check and torchao's own (float8 math itself runs on a CPU)."""
    try:
        import torchao.quantization.quant_api as quant_api
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"torchao is not importable here ({type(exc).__name__}): the conversion itself needs it")
    if not hasattr(quant_api, "_check_hardware_support"):
        pytest.skip("this torchao checks the hardware elsewhere: cannot simulate fp8 on the CPU")
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *a, **k: None)
    monkeypatch.setattr(fp8_mode, "device_capability", lambda device: (9, 0))


def src(tiny):
    return DiffusersFolder(tiny["built"].diffusers_dir)


def fp8_weights(pipe):
    return {n: (q.clone(), s.clone(), q, s) for n, (q, s) in fp8_mode.fp8_state(pipe.transformer).items()}


def test_fp8_images_are_finite_and_close_to_bf16(tiny, fresh_engine, fp8_on_cpu):
    bf16 = get_pipeline(src(tiny), CPU, torch.bfloat16, "resident", "off")
    ref = bf16.generate(REQ)
    bf16_bytes = bf16.weight_bytes()
    pipe = get_pipeline(src(tiny), CPU, torch.bfloat16, "resident", "off", fp8=EVERYTHING)
    assert pipe.fp8 == EVERYTHING and fp8_mode.policy_of(pipe.transformer) == EVERYTHING
    layers = fp8_weights(pipe)
    assert len(layers) == len(fp8_mode.plan_of(pipe.transformer).fp8) > 10
    out = pipe.generate(REQ)
    assert torch.isfinite(out.images).all() and torch.isfinite(out.latents).all()
    rel = ((out.latents - ref.latents).norm() / ref.latents.norm()).item()
    assert 0 < rel < 0.15, rel  # fp8 rounding: close to bf16, not equal
    assert (out.images - ref.images).abs().mean() < 0.05
    assert pipe.weight_bytes() < bf16_bytes  # fp8 weights are counted at one byte each
    assert out.report.fp8.startswith("fp8 (fast): policy test_all:") and out.report.fp8 in out.report.to_text()
    assert out.report.dtype == "fp8 (fast)" and ref.report.dtype == "bf16"  # what the probe shows
    assert [s.dtype for s in api.loaded()] == ["fp8 (fast)"]
    assert api.find(src(tiny), CPU, torch.bfloat16, EVERYTHING) is pipe and api.find(src(tiny), CPU, torch.bfloat16) is None
    # The same seed twice: the same bits (fp8 quantisation of the activations is deterministic).
    assert torch.equal(pipe.generate(REQ).images, out.images)


def test_loras_beside_the_fp8_weights_switch_and_all_off_is_bit_identical(tiny, fresh_engine, fp8_on_cpu):
    a, b = tiny["loras"]["diffusers"][0], tiny["loras"]["kohya_split"][0]
    bf16 = get_pipeline(src(tiny), CPU, torch.bfloat16, "resident", "off")
    bf16.tstate.lora.mode = "adapters"  # the same bf16 side product, for reference
    ref_a = bf16.generate(REQ, [LoraSpec(a, 0.8)]).images
    base_ref = bf16.generate(REQ).images
    pipe = get_pipeline(src(tiny), CPU, torch.bfloat16, "resident", "off", fp8=EVERYTHING)
    before = fp8_weights(pipe)
    base = pipe.generate(REQ).images
    styled = pipe.generate(REQ, [LoraSpec(a, 0.8)])
    assert styled.report.lora_path == "adapters" and styled.report.lora_why_adapters == fp8_mode.LORA_WHY
    assert not torch.equal(styled.images, base)
    # The LoRA's change in fp8 mode follows the LoRA's change in bf16 (it is computed in bf16 beside the product).
    d_fp8, d_bf16 = styled.images - base, ref_a - base_ref
    cos = torch.nn.functional.cosine_similarity(d_fp8.flatten(), d_bf16.flatten(), dim=0)
    assert cos > 0.8, cos
    stronger = pipe.generate(REQ, [LoraSpec(a, 1.2)])
    other = pipe.generate(REQ, [LoraSpec(b, 0.8)])
    both = pipe.generate(REQ, [LoraSpec(a, 0.5), LoraSpec(b, -0.4)])
    assert stronger.report.lora_s < 5 and not torch.equal(stronger.images, styled.images)
    assert not torch.equal(other.images, styled.images) and not torch.equal(both.images, other.images)
    off = pipe.generate(REQ, [LoraSpec(a, 0.8, enabled=False)])
    assert off.report.lora_path == "" and torch.equal(off.images, base)
    after = fp8_mode.fp8_state(pipe.transformer)
    assert after.keys() == before.keys()
    for name, (q0, s0, q_ref, s_ref) in before.items():
        q, s = after[name]
        assert q is q_ref and s is s_ref  # never replaced ...
        assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)  # ... never written


def test_whole_matrix_loras_are_refused_in_fp8_mode_with_what_to_do(tiny, fresh_engine, fp8_on_cpu, tmp_path):
    path = tmp_path / "lokr_style.safetensors"
    lora_formats.build_lora(path, TINY.transformer, "lokr_w2_factored")
    pipe = get_pipeline(src(tiny), CPU, torch.bfloat16, "resident", "off", fp8=EVERYTHING)
    base = pipe.generate(REQ).images
    with pytest.raises(LoraKeyError, match=r"lokr_style\.safetensors.*fp8 mode.*choose dtype bf16"):
        pipe.generate(REQ, [LoraSpec(path, 0.8)])
    assert torch.equal(pipe.generate(REQ).images, base)  # nothing was applied


def test_low_vram_is_refused_for_an_fp8_pipeline(tiny, fresh_engine, fp8_on_cpu):
    with pytest.raises(Fp8UnsupportedError, match="low_vram"):
        get_pipeline(src(tiny), CPU, torch.bfloat16, "low_vram", "off", fp8=EVERYTHING)
    pipe = get_pipeline(src(tiny), CPU, torch.bfloat16, "resident", "off", fp8=EVERYTHING)
    with pytest.raises(Fp8UnsupportedError, match="low_vram"):
        pipe.generate(REQ, memory="low_vram")
    assert pipe.memory == "resident" and torch.isfinite(pipe.generate(REQ).images).all()


def test_bf16_and_fp8_loaders_of_the_same_files_take_turns(tiny, fresh_engine, fp8_on_cpu, tmp_path):
    # A copy of the files: this test counts loads.
    folder = tmp_path / "model"
    shutil.copytree(tiny["built"].diffusers_dir, folder)
    source = DiffusersFolder(folder)
    first = get_pipeline(source, CPU, torch.bfloat16, "resident", "off")
    lora = LoraSpec(tiny["loras"]["diffusers"][0], 0.8)
    first.generate(REQ, [lora])  # a merged LoRA, to be restored first
    first.tstate.lora.mode = "adapters"
    assert first.generate(REQ, [lora]).report.lora_path == "adapters"  # PEFT slots wrap the layers now
    bf16_image = first.generate(REQ).images
    loads = COMPONENTS.loads
    fp8 = get_pipeline(source, CPU, torch.bfloat16, "resident", "off", fp8=EVERYTHING)
    # The transformer is made fp8 from the loaded bf16 weights in place; only the text encoder is read again (its
    # fp8-weight form is a cache entry of its own; the bf16 one, no longer used, is dropped).
    assert COMPONENTS.loads == loads + 1
    assert fp8.transformer is first.transformer and fp8.tstate is not first.tstate
    assert fp8.text_encoder is not first.text_encoder and fp8_mode.text_encoder_fp8_layers(fp8.text_encoder) > 0
    with pytest.raises(InvalidSettingError, match="queue the prompt again"):
        first.generate(REQ)  # retired: its weights are fp8 now
    fp8_image = fp8.generate(REQ).images
    assert not torch.equal(fp8_image, bf16_image)
    styled = fp8.generate(REQ, [lora])  # the slots built in bf16 time now sit beside fp8 layers
    assert styled.report.lora_path == "adapters" and not torch.equal(styled.images, fp8_image)
    assert torch.equal(fp8.generate(REQ).images, fp8_image)
    old_weights = weakref.ref(fp8.transformer)
    del first, fp8
    again = get_pipeline(source, CPU, torch.bfloat16, "resident", "off")
    assert old_weights() is None  # the fp8 weights were freed (before the file was read again)
    assert COMPONENTS.loads == loads + 3  # bf16 again: transformer and text encoder read again (fp8 cannot be undone)
    assert fp8_mode.text_encoder_fp8_layers(again.text_encoder) == 0
    assert fp8_mode.policy_of(again.transformer) is None
    assert torch.equal(again.generate(REQ).images, bf16_image)
    assert [p.dtype for p in api.loaded()] == ["bf16"]
    other = get_pipeline(source, CPU, torch.bfloat16, "resident", "off", fp8=fp8_mode.POLICIES["all_blocks"])
    assert torch.isfinite(other.generate(REQ).images).all()


# ------------------------------------------------------- the text encoder


def test_text_encoder_fp8_linear_rounds_each_row_to_e4m3_and_keeps_zero_rows_exact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight[5] = 0
        lin.weight[7] *= 1000  # rows of very different sizes get scales of their own
    q = fp8_mode.TextEncoderFp8Linear(lin)
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (48, 1) and not q.weight.requires_grad
    w = lin.weight.float()
    deq = q.dequantized(torch.float32)
    assert torch.equal(deq[5], torch.zeros(64))
    rel = ((deq - w).abs() / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)).amax()
    assert 0 < rel <= 2 ** -4 * 1.01, rel  # e4m3 keeps 3 mantissa bits: within half a step of each row's values
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(q(x), torch.nn.functional.linear(x, q.dequantized(torch.bfloat16), lin.bias))
    assert q.dequantized(torch.bfloat16).dtype == torch.bfloat16


def test_the_fp8_text_encoder_has_fp8_weights_and_encodes_close_to_bf16(tiny, fresh_engine, fp8_on_cpu):
    bf16 = get_pipeline(src(tiny), CPU, torch.bfloat16, "resident", "off")
    ref = bf16.encode(REQ.prompt)[0].clone()
    te_bf16_bytes = sum(fp8_mode.tensor_bytes(t) for t in bf16.text_encoder.parameters())
    pipe = get_pipeline(src(tiny), CPU, torch.bfloat16, "resident", "off", fp8=EVERYTHING)
    n_layers = len(pipe.text_encoder.layers)
    assert fp8_mode.text_encoder_fp8_layers(pipe.text_encoder) == 7 * n_layers
    for layer in pipe.text_encoder.layers:
        assert layer.self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
        assert layer.input_layernorm.weight.dtype == torch.bfloat16  # norms stay
    assert pipe.text_encoder.embed_tokens.weight.dtype == torch.bfloat16  # the embedding table stays
    te_bytes = sum(fp8_mode.tensor_bytes(t) for t in pipe.text_encoder.parameters())
    assert te_bytes < te_bf16_bytes
    out = pipe.generate(REQ)
    assert torch.isfinite(out.images).all()
    assert "text encoder: " in out.report.fp8 and "fp8 e4m3 weights" in out.report.fp8
    got = pipe.encode(REQ.prompt)[0]
    rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    assert 0 < rel < 0.1, rel  # fp8 weights: close to the bf16 encoder's output, not equal


def test_a_policy_without_the_text_encoder_keeps_it_bf16_and_shared(tiny, fresh_engine, fp8_on_cpu):
    bf16 = get_pipeline(src(tiny), CPU, torch.bfloat16, "resident", "off")
    te = bf16.text_encoder
    keep_te = fp8_mode.Fp8Policy(name="test_te_bf16", keep_first=0, keep_last=0, text_encoder=False)
    pipe = get_pipeline(src(tiny), CPU, torch.bfloat16, "resident", "off", fp8=keep_te)
    assert pipe.text_encoder is te and fp8_mode.text_encoder_fp8_layers(te) == 0
    assert "text encoder in bf16" in pipe.generate(REQ).report.fp8
    assert not fp8_mode.POLICIES["conservative"].text_encoder and fp8_mode.POLICIES["default"].text_encoder


def test_an_encoder_shared_with_another_transformers_pipeline_is_kept_across_a_precision_change(
        tiny, fresh_engine, fp8_on_cpu, tmp_path):
    """Two transformer files beside one text encoder file: turning one of them fp8 must not drop the bf16 encoder
    the other's pipeline still uses (the next bf16 loader would read it again and hold it twice)."""
    built = tiny["built"]
    second = tmp_path / "second_transformer.safetensors"
    shutil.copyfile(built.transformer_file, second)
    a_src = SplitFiles(built.transformer_file, built.text_encoder_file, built.vae_file, built.tokenizer_dir)
    b_src = SplitFiles(second, built.text_encoder_file, built.vae_file, built.tokenizer_dir)
    a = get_pipeline(a_src, CPU, torch.bfloat16, "resident", "off")
    b = get_pipeline(b_src, CPU, torch.bfloat16, "resident", "off")
    assert b.text_encoder is a.text_encoder and b.transformer is not a.transformer
    fp8 = get_pipeline(b_src, CPU, torch.bfloat16, "resident", "off", fp8=EVERYTHING)  # b's transformer turns fp8
    assert fp8_mode.text_encoder_fp8_layers(fp8.text_encoder) > 0 and fp8_mode.text_encoder_fp8_layers(a.text_encoder) == 0
    loads = COMPONENTS.loads
    back = get_pipeline(b_src, CPU, torch.bfloat16, "resident", "off")  # bf16 again: its transformer is read again
    assert back.text_encoder is a.text_encoder  # the encoder a still holds, not a second copy
    assert COMPONENTS.loads == loads + 1
    assert torch.isfinite(back.generate(REQ).images).all() and torch.isfinite(a.generate(REQ).images).all()
