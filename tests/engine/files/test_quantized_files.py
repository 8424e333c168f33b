"""ComfyUI's quantised-layer files (issue 10): fp8 variants load, dequantised on load; the rest is refused.

The tiny model's text encoder and transformer are written by devtools/quantized_files.py in each
format ComfyUI uses (comfy_quant tensors or header JSON, scaled_fp8, plain fp8, nvfp4) from a bf16
copy, and loaded by the engine like any split file.

Tolerance of an fp8 load against its bf16 source (TOLERANCE): fp8 e4m3 keeps 3 mantissa bits, so each
quantised weight is off by at most 2^-4 (6.25 %) of itself, about 2-3 % RMS; the error of a layer's
output has that relative size, and the embeddings, norms and the first block kept in bf16 keep it from
compounding. Measured on the tiny text encoder (seeds 0-2, the pipeline's prompt embedding): 1.1-1.2 %
(fp8_mixed, first block in bf16), 1.5-1.9 % (scaled_fp8, every block in fp8). The bound, 5 % relative
L2 error, leaves room for other seeds while a scale applied wrongly is far outside it (measured: scales
zeroed 26 %, doubled 84 %, left out 1.6e10): test_a_wrong_scale_fails_the_tolerance shows the test can fail. e5m2 (2 mantissa bits:
12.5 % per weight) and plain fp8 without scales (small weights fall into fp8's subnormals) measured
2.0-2.5 % and get twice the bound. The fp8 transformer's image differs from its bf16 source's by
0.14-0.24 %.
"""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools import quantized_files as qf
from zimage_turbo.engine.errors import ModelFileError
from zimage_turbo.engine.files import key_maps, quantized
from zimage_turbo.engine.files.check import check_file, reference_from
from zimage_turbo.engine.files.model_files import SplitFiles, load_components
from zimage_turbo.engine.model_config import TEXT_ENCODER_CONFIG
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

CPU = torch.device("cpu")
TOLERANCE = 0.05
PROMPT = "灯塔, a lighthouse at dawn, film grain"
IDS = torch.tensor([[1, 5, 9, 300, 2, 17, 44, 151, 12, 7]])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def split(built, te=None, transformer=None) -> SplitFiles:
    return SplitFiles(transformer or built.transformer_file, te or built.text_encoder_file, built.vae_file,
                      built.tokenizer_dir)


def encode(built, te) -> torch.Tensor:
    """The prompt embedding the engine's pipeline makes with this text encoder file (fp32 compute)."""
    return get_pipeline(split(built, te=te), CPU, torch.float32).encode(PROMPT)[0]


def text_encoder_state(built, te) -> dict[str, torch.Tensor]:
    return load_components(split(built, te=te), CPU, torch.float32, False).text_encoder.module.state_dict()


@pytest.fixture(scope="module")
def te_files(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("te_variants")
    files = qf.write_text_encoder_variants(tiny["built"].text_encoder_file, folder, "tiny_te")
    bf16 = files["bf16"]
    files["fp8_mixed_header_json"] = qf.write_fp8_mixed(bf16, folder / "header_json.safetensors", json_in_header=True)
    files["fp8_e5m2"] = qf.write_fp8_mixed(bf16, folder / "e5m2.safetensors", fmt="float8_e5m2")
    files["plain_fp8"] = qf.write_plain_fp8(bf16, folder / "plain_fp8.safetensors")
    return files


@pytest.fixture(scope="module")
def dit_files(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit_variants")
    bf16 = qf.write_cast(tiny["built"].transformer_file, folder / "zit_bf16.safetensors")
    prefixed = folder / "zit_bf16_prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in load_file(str(bf16)).items()}, str(prefixed))
    return {
        "bf16": bf16,
        "fp8_mixed": qf.write_fp8_mixed(bf16, folder / "zit_fp8_mixed.safetensors", input_scale=True),
        # Metadata names the layers without the file's prefix, as some converters write it.
        "header_json_prefixed": qf.write_fp8_mixed(prefixed, folder / "zit_fp8_header.safetensors", json_in_header=True),
        "scaled_fp8": qf.write_scaled_fp8(prefixed, folder / "zit_fp8_scaled.safetensors", "model.diffusion_model."),
        "nvfp4": qf.write_nvfp4_sample(bf16, folder / "zit_nvfp4.safetensors"),
    }


# ------------------------------------------------------------------ the text encoder


@pytest.mark.parametrize("variant", ["fp8_mixed", "scaled_fp8", "fp8_mixed_header_json"])
def test_fp8_text_encoder_encodes_within_tolerance_of_its_bf16_source(tiny, te_files, variant, fresh_engine):
    built = tiny["built"]
    assert te_files[variant].stat().st_size < te_files["bf16"].stat().st_size  # it really holds fp8 weights
    ref = encode(built, te_files["bf16"])
    got = encode(built, te_files[variant])
    assert got.shape == ref.shape and torch.isfinite(got).all()
    err = rel_err(got, ref)
    assert 0 < err < TOLERANCE, err  # not bit-equal: the fp8 weights were used, not some bf16 copy


def test_fp8_e5m2_and_plain_fp8_load_too(tiny, te_files, fresh_engine):
    built = tiny["built"]
    ref = encode(built, te_files["bf16"])
    assert 0 < rel_err(encode(built, te_files["fp8_e5m2"]), ref) < 2 * TOLERANCE
    assert 0 < rel_err(encode(built, te_files["plain_fp8"]), ref) < 2 * TOLERANCE


def test_dequantisation_is_comfyuis_weight_times_scale(tiny, te_files, fresh_engine):
    """Quantised layers become exactly fp8.float() * weight_scale; the layers kept in bf16 stay bit-equal."""
    built = tiny["built"]
    raw = load_file(str(te_files["fp8_mixed"]))
    source = load_file(str(te_files["bf16"]))
    ours = text_encoder_state(built, te_files["fp8_mixed"])
    quantised = kept = 0
    for name, tensor in ours.items():
        fname = f"model.{name}"
        if f"model.{name[: -len('.weight')]}.comfy_quant" in raw:
            layer = fname[: -len(".weight")]
            assert raw[fname].dtype == torch.float8_e4m3fn
            assert torch.equal(tensor, qf.dequantize_fp8(raw[fname], raw[f"{layer}.weight_scale"])), name
            quantised += 1
        else:
            assert torch.equal(tensor, source[fname].float()), name
            kept += 1
    assert quantised == 7 and kept > 7  # block 1's seven linears (block 2 is never loaded); block 0 kept in bf16


@pytest.mark.parametrize("factor", [0.0, 2.0, "ignored"])
def test_a_wrong_scale_fails_the_tolerance(tiny, te_files, tmp_path, factor, fresh_engine):
    """The tolerance is tight enough to catch a scale that is misapplied: it can fail."""
    sd = load_file(str(te_files["fp8_mixed"]))
    for k in [k for k in sd if k.endswith(".weight_scale")]:
        sd[k] = torch.ones_like(sd[k]) if factor == "ignored" else sd[k] * factor + (1e-30 if factor == 0 else 0)
    save_file(sd, str(tmp_path / "bad_scale.safetensors"))
    built = tiny["built"]
    assert rel_err(encode(built, tmp_path / "bad_scale.safetensors"), encode(built, te_files["bf16"])) > TOLERANCE


def test_nvfp4_text_encoder_is_refused_with_the_file_to_use(tiny, te_files, monkeypatch, fresh_engine):
    monkeypatch.setattr(quantized, "load_dequantized", lambda *a, **k: pytest.fail("tensor data was read"))
    with pytest.raises(ModelFileError) as err:
        load_components(split(tiny["built"], te=te_files["fp4_mixed"]), CPU, torch.float32, False)
    text = str(err.value)
    assert text.startswith("tiny_te_fp4_mixed.safetensors: ")
    assert "nvfp4" in text and "model.layers.1." in text and "on any GPU or on the CPU" in text
    assert "Use qwen_3_4b_fp8_mixed.safetensors" in text and "qwen_3_4b.safetensors" in text


@pytest.mark.parametrize("fmt, says", [("mxfp8", "MXFP8"), ("int4_awq", "unknown quantisation format 'int4_awq'")])
def test_other_formats_are_refused_by_name(tiny, te_files, tmp_path, fmt, says, fresh_engine):
    sd = load_file(str(te_files["fp8_mixed"]))
    for k in [k for k in sd if k.endswith(".comfy_quant")]:
        sd[k] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    save_file(sd, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFileError, match=says) as err:
        load_components(split(tiny["built"], te=tmp_path / "other.safetensors"), CPU, torch.float32, False)
    assert "Use qwen_3_4b_fp8_mixed.safetensors" in str(err.value)


def test_inconsistent_quantisation_entries_are_named(tiny, te_files, tmp_path, fresh_engine):
    good = load_file(str(te_files["fp8_mixed"]))
    layer = "model.layers.1.mlp.down_proj"
    cases = {
        "does not hold JSON text": {f"{layer}.comfy_quant": torch.tensor(list(b"{nope"), dtype=torch.uint8)},
        "no format": {f"{layer}.comfy_quant": torch.tensor(list(b'{"fmt": 1}'), dtype=torch.uint8)},
        "neither one scale per tensor nor one per row": {f"{layer}.weight_scale": torch.ones(3)},
        "its weight is stored as torch.bfloat16": {f"{layer}.weight": good[f"{layer}.weight"].bfloat16()},
    }
    for problem, change in cases.items():
        path = tmp_path / "odd.safetensors"
        save_file({**good, **change}, str(path))
        with pytest.raises(ModelFileError, match=problem) as err:
            load_components(split(tiny["built"], te=path), CPU, torch.float32, False)
        assert "odd.safetensors" in str(err.value) and "download it again" in str(err.value)
    no_scale = {k: v for k, v in good.items() if k != f"{layer}.weight_scale"}
    save_file(no_scale, str(tmp_path / "no_scale.safetensors"))
    with pytest.raises(ModelFileError, match=f"has no {layer}.weight_scale"):
        load_components(split(tiny["built"], te=tmp_path / "no_scale.safetensors"), CPU, torch.float32, False)


# ------------------------------------------------------------------ the diffusion model


def expected_transformer(path) -> dict[str, torch.Tensor]:
    """What an fp8 transformer file must load as: each fp8 weight times its scale, then diffusers' renames."""
    raw = load_file(str(path))
    out = {}
    for k, v in raw.items():
        layer = k[: -len(".weight")]
        if k.endswith((".comfy_quant", ".weight_scale", ".input_scale", ".scale_weight", ".scale_input", "scaled_fp8")):
            continue
        scale = raw.get(f"{layer}.weight_scale", raw.get(f"{layer}.scale_weight"))
        out[k] = qf.dequantize_fp8(v, scale) if v.dtype == torch.float8_e4m3fn else v.float()
    return key_maps.transformer_to_diffusers(out)


@pytest.mark.parametrize("variant", ["fp8_mixed", "header_json_prefixed", "scaled_fp8"])
def test_fp8_diffusion_model_loads_dequantised(tiny, dit_files, variant, fresh_engine):
    """ComfyUI publishes no fp8 Z-Image DiT, but community fp8 checkpoints exist: the same formats load."""
    built = tiny["built"]
    ours = load_components(split(built, transformer=dit_files[variant]), CPU, torch.float32, False)
    sd = ours.transformer.module.state_dict()
    want = expected_transformer(dit_files[variant])
    assert sd.keys() == want.keys()
    assert all(torch.equal(sd[k], want[k]) for k in sd)
    # The fused qkv had one scale: its three parts are dequantised with it.
    raw = load_file(str(dit_files["fp8_mixed"]))
    if variant == "fp8_mixed":
        qkv = qf.dequantize_fp8(raw["layers.1.attention.qkv.weight"], raw["layers.1.attention.qkv.weight_scale"])
        assert torch.equal(sd["layers.1.attention.to_k.weight"], qkv.chunk(3)[1])


def test_fp8_diffusion_model_generates_close_to_its_bf16_source(tiny, dit_files, fresh_engine):
    built = tiny["built"]
    req = GenerationRequest(PROMPT, width=48, height=32, seed=3)
    ref = get_pipeline(split(built, transformer=dit_files["bf16"]), CPU, torch.float32).generate(req).images
    got = get_pipeline(split(built, transformer=dit_files["fp8_mixed"]), CPU, torch.float32).generate(req).images
    assert torch.isfinite(got).all()
    assert 0 < rel_err(got, ref) < TOLERANCE


def test_nvfp4_diffusion_model_is_refused_with_the_file_to_use(tiny, dit_files, fresh_engine):
    with pytest.raises(ModelFileError, match="Use z_image_turbo_bf16.safetensors instead") as err:
        load_components(split(tiny["built"], transformer=dit_files["nvfp4"]), CPU, torch.float32, False)
    assert "zit_nvfp4.safetensors" in str(err.value) and "nvfp4" in str(err.value)


# ------------------------------------------------------------------ the checker


def test_checker_reports_the_format(tiny, te_files, dit_files):
    ref = reference_from(tiny["built"].transformer_file)  # the tiny transformer: the tiny text encoder fits it
    expect = {
        "fp8_mixed": "ComfyUI comfy_quant: float8_e4m3fn in 14 of 22 weight matrices",
        "scaled_fp8": "ComfyUI scaled_fp8: float8_e4m3fn in 21 of 22 weight matrices",
        "fp8_mixed_header_json": "comfy_quant (in the header's _quantization_metadata): float8_e4m3fn in 14",
        "plain_fp8": "ComfyUI fp8: fp8 without scales (cast) in 21",
    }
    for variant, says in expect.items():
        result = check_file(te_files[variant], ref)
        assert result.kind == "text_encoder" and result.usable, result.error
        assert says in result.info.quantized and "dequantised to the loader's dtype on load" in result.info.quantized
        assert any(line.startswith("quantised: ") for line in result.details)
    refused = check_file(te_files["fp4_mixed"], ref)
    assert refused.kind == "text_encoder" and not refused.usable
    assert "nvfp4 in 14 of 22" in refused.info.quantized and "Use qwen_3_4b_fp8_mixed.safetensors" in refused.error
    dit = check_file(dit_files["fp8_mixed"])
    assert dit.kind == "transformer" and dit.usable, dit.error
    assert "float8_e4m3fn" in dit.info.quantized and dit.info.dim == 64
    assert reference_from(dit_files["fp8_mixed"]).layers == ref.layers  # LoRAs can be checked against it
    nv = check_file(dit_files["nvfp4"])
    assert not nv.usable and "Use z_image_turbo_bf16.safetensors" in nv.error
    with pytest.raises(Exception, match="cannot check LoRAs against this file"):
        reference_from(dit_files["nvfp4"])


def test_released_size_fp8_text_encoder_states_the_vram_figure(tmp_path):
    """A Qwen3-4B scaled_fp8 file, header only (sparse: no disk used): the checker's saving for the real size."""
    c = TEXT_ENCODER_CONFIG
    h, inter, heads, kv, hd = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    linears = {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv * hd, h), "self_attn.v_proj": (kv * hd, h),
               "self_attn.o_proj": (h, heads * hd), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
               "mlp.down_proj": (h, inter)}
    tensors = {"model.embed_tokens.weight": ("BF16", (c["vocab_size"], h)), "model.norm.weight": ("BF16", (h,)),
               "scaled_fp8": ("F8_E4M3", (0,))}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": ("BF16", (h,)), p + "post_attention_layernorm.weight": ("BF16", (h,)),
                        p + "self_attn.q_norm.weight": ("BF16", (hd,)), p + "self_attn.k_norm.weight": ("BF16", (hd,))})
        for name, shape in linears.items():
            tensors[f"{p}{name}.weight"] = ("F8_E4M3", shape)
            tensors[f"{p}{name}.scale_weight"] = ("F32", ())
    size = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = size[dtype] * int(torch.tensor(shape).prod().item() if shape else 1)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "qwen_3_4b_fp8_scaled.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    result = check_file(path)
    assert result.usable and result.info.qwen3_4b, result.error
    # 36 layers x 100,925,440 linear weights, one byte each instead of two.
    assert "float8_e4m3fn in 252 of 253 weight matrices" in result.info.quantized
    assert "kept in fp8 they would take 3.38 GiB less than in bf16" in result.info.quantized


def test_integer_weights_without_a_format_are_refused(tiny, te_files, tmp_path, fresh_engine):
    sd = load_file(str(te_files["bf16"]))
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"].to(torch.int8)
    save_file(sd, str(tmp_path / "int8.safetensors"))
    with pytest.raises(ModelFileError, match="int8 .*model.layers.1.mlp.up_proj.*Use qwen_3_4b_fp8_mixed"):
        load_components(split(tiny["built"], te=tmp_path / "int8.safetensors"), CPU, torch.float32, False)
