"""`python -m zimage_turbo check`: what a file is and whether the engine would use it, from the command line."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_turbo.engine.files import check
from devtools.original_layout import transformer_to_original
from zimage_turbo.engine.__main__ import main
from zimage_turbo.engine.files.check import check_file, reference_from, released_reference, transformer_layers
from zimage_turbo.engine.errors import ZImageError
from zimage_turbo.engine.lora import linear_modules
from devtools.model_builder import LORA_FORMATS, TINY
from zimage_turbo.engine.model_config import TRANSFORMER_CONFIG

REPO = Path(__file__).resolve().parents[3]
FORMAT_NAMES = {
    "diffusers": "diffusers/peft",
    "kohya_fused": "kohya/ComfyUI (fused qkv)",
    "kohya_split": "kohya/ComfyUI (split q/k/v)",
    "kohya_underscore": "kohya (underscore names)",
    "diffsynth": "DiffSynth (bare keys)",
}


@pytest.fixture(scope="module")
def tiny_ref(tiny):
    return reference_from(tiny["built"].transformer_file)


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = main(["check", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def header_only_file(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> Path:
    """A valid safetensors file with these (dtype, shape) tensors whose data is a sparse hole (no disk used)."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def meta_transformer(cfg):
    from diffusers import ZImageTransformer2DModel

    from zimage_turbo.engine.files.model_files import params_on_meta

    with params_on_meta():
        return ZImageTransformer2DModel(**cfg)


# ------------------------------------------------------------------ LoRAs


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_each_lora_format_matches_every_layer_of_the_tiny_model(tiny, tiny_ref, fmt):
    path, expected = tiny["loras"][fmt]
    result = check_file(path, tiny_ref)
    assert result.kind == "lora" and result.usable and result.error is None
    info = result.info
    assert info.format == FORMAT_NAMES[fmt]
    assert info.ranks == [4]
    assert info.alphas == ([2.0] if fmt.startswith("kohya") else [])
    fused = fmt in ("kohya_fused", "kohya_underscore")
    assert info.layers_named == info.layers_found == (10 if fused else 14)
    assert info.model_layers_changed == len(expected) == 14
    assert info.coverage == "attention q/k/v/out and feed-forward of all 2 main blocks"
    text = "\n".join(result.lines())
    assert f"matches {info.layers_named} of {info.layers_named} layers it names" in text
    assert "zit_tiny.safetensors (dim 64, 2 layers)" in text


def test_partial_lora_coverage_names_the_blocks(tiny, tiny_ref, tmp_path):
    sd = load_file(str(tiny["loras"]["diffusers"][0]))
    part = {k: v for k, v in sd.items() if k.startswith("transformer.layers.1.attention.to_")}
    save_file(part, str(tmp_path / "partial.safetensors"))
    result = check_file(tmp_path / "partial.safetensors", tiny_ref)
    assert result.usable and result.info.coverage == "attention q/k/v/out of 1 of 2 (1) main blocks"


def test_foreign_lora_is_refused_with_its_keys_named(tiny, tiny_ref):
    result = check_file(tiny["foreign_lora"], tiny_ref)
    assert result.kind == "lora" and not result.usable
    assert result.info.layers_found == 0 and result.info.layers_named == 2
    assert "fit no layer" in result.error
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in result.error
    assert "lora_unet_mid_block_attentions_0_proj_out" in result.error


def test_tiny_lora_against_the_released_size_is_refused_as_a_size_mismatch(tiny):
    result = check_file(tiny["loras"]["kohya_fused"][0])  # default: the released transformer
    assert result.kind == "lora" and not result.usable
    assert "different model size" in result.error and "3840->3840" in result.error and "64->64" in result.error
    text = "\n".join(result.lines())
    assert "sized for a transformer of dim 64" in text
    assert "the released Z-Image-Turbo transformer (dim 3840, 30 layers)" in text


def test_an_adapter_kind_the_engine_does_not_apply_is_refused_by_name(tmp_path, tiny_ref):
    path = tmp_path / "oft.safetensors"
    save_file({"lycoris_layers_0_attention_to_q.oft_blocks": torch.zeros(4, 16, 16)}, str(path))
    result = check_file(path, tiny_ref)
    assert result.kind == "lora" and not result.usable and "OFT adapter" in result.error and result.info.format == "OFT"


# ------------------------------------------------------------ model files


def test_model_files_are_classified(tiny, tiny_ref):
    built = tiny["built"]
    tr = check_file(built.transformer_file, tiny_ref)
    assert tr.kind == "transformer" and tr.usable
    assert (tr.info.layout, tr.info.dim, tr.info.n_layers, tr.info.released_size) == ("original", 64, 2, False)
    assert tr.info.parameters == sum(p.numel() for p in meta_transformer(TINY.transformer).parameters())
    assert "another size" in "\n".join(tr.lines())

    te = check_file(built.text_encoder_file, tiny_ref)
    assert te.kind == "text_encoder" and te.usable
    assert (te.info.family, te.info.layers, te.info.hidden, te.info.qwen3_4b) == ("Qwen3", 3, 32, False)
    released = check_file(built.text_encoder_file)  # the released transformer takes 2560-wide text features
    assert not released.usable and "2560" in released.error

    vae = check_file(built.vae_file, tiny_ref)
    assert vae.kind == "vae" and vae.usable and vae.info.latent_channels == 16 and vae.info.flux_vae

    folder = check_file(built.diffusers_dir, tiny_ref)
    assert folder.kind == "diffusers_folder" and folder.usable
    parts = folder.info.components
    assert {k: r.kind for k, r in parts.items()} == {"transformer": "transformer", "text_encoder": "text_encoder",
                                                      "vae": "vae"}
    assert parts["transformer"].info.layout == "diffusers" and parts["vae"].info.layout == "diffusers"


def test_header_derived_layers_are_the_real_modules(tiny, tiny_ref):
    """check.py derives layer names/shapes without building a model: they must equal lora.linear_modules."""
    assert tiny_ref.layers == linear_modules(meta_transformer(TINY.transformer))
    assert reference_from(tiny["built"].diffusers_dir).layers == tiny_ref.layers  # diffusers keys: the same
    assert released_reference().layers == linear_modules(meta_transformer(TRANSFORMER_CONFIG))
    assert transformer_layers(TINY.transformer) == tiny_ref.layers


def test_released_size_transformer_is_read_from_the_header_only(tmp_path, monkeypatch):
    model = meta_transformer(TRANSFORMER_CONFIG)
    original = transformer_to_original(dict(model.state_dict()))
    path = header_only_file(tmp_path / "z_image_turbo_bf16.safetensors",
                            {f"model.diffusion_model.{k}": ("BF16", tuple(v.shape)) for k, v in original.items()})
    assert path.stat().st_size > 12 * 10**9
    monkeypatch.setattr(check, "load_entries", lambda *a, **k: pytest.fail("tensor data was read"))
    result = check_file(path)
    assert result.kind == "transformer" and result.usable, result.error
    info = result.info
    assert (info.dim, info.n_layers, info.n_refiner_layers, info.released_size) == (3840, 30, 2, True)
    assert info.parameters == 6_154_908_736 and info.dtypes == ["bf16"] and info.prefix == "model.diffusion_model."
    assert "the released Z-Image-Turbo size" in "\n".join(result.lines())


def test_refused_model_files_say_why(tiny, tmp_path):
    built = tiny["built"]
    # diffusers-layout transformer outside its folder: the split-file loader cannot read it
    loose = tmp_path / "loose_transformer.safetensors"
    loose.write_bytes((built.diffusers_dir / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes())
    result = check_file(loose)
    assert result.kind == "transformer" and not result.usable and "diffusers folder" in result.error
    # (quantised files: tests/engine/files/test_quantized_files.py)
    sd = load_file(str(built.transformer_file))
    # a shard: one block missing (the first of two, so it is no smaller model)
    save_file({k: v for k, v in sd.items() if not k.startswith("layers.0.")}, str(tmp_path / "cut.safetensors"))
    result = check_file(tmp_path / "cut.safetensors")
    assert result.kind == "transformer" and not result.usable and "incomplete" in result.error


def test_sdxl_vae_is_not_the_flux_vae(tmp_path):
    path = tmp_path / "sdxl_vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
               "encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
               "encoder.conv_out.weight": torch.zeros(8, 8, 3, 3), "quant_conv.weight": torch.zeros(8, 8, 1, 1),
               "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(path))
    result = check_file(path)
    assert result.kind == "vae" and not result.usable and result.info.latent_channels == 4
    assert "not the Flux VAE Z-Image needs" in result.error and "use ae.safetensors" in result.error


# ------------------------------------------------------ bad files, the CLI


def test_bad_files_are_refused_with_exit_code_1(tiny, tmp_path, capsys):
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"w": torch.zeros(2)}, pickled)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny["built"].transformer_file.read_bytes()[:-1000])
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(bytes((i * 197 + 61) % 256 for i in range(4096)))
    missing = tmp_path / "missing.safetensors"
    for path, words in ((pickled, "pickle"), (truncated, "truncated"), (noise, "safetensors"), (missing, "not found")):
        result = check_file(path)
        assert not result.usable and result.kind == "unknown", path.name
        assert result.error.startswith(path.name) and words in result.error, result.error
        rc, out = run_cli(capsys, path)
        assert rc == 1 and "REFUSED" in out and str(tmp_path) not in out  # files are named by base name


def test_exit_codes_and_json(tiny, capsys):
    built, loras = tiny["built"], tiny["loras"]
    good = [loras[f][0] for f in LORA_FORMATS] + [built.transformer_file, built.text_encoder_file, built.vae_file]
    rc, out = run_cli(capsys, *good, "--model", built.transformer_file)
    assert rc == 0 and "REFUSED" not in out

    rc, out = run_cli(capsys, *good, tiny["foreign_lora"], "--model", built.transformer_file, "--json")
    assert rc == 1
    objects = [json.loads(line) for line in out.splitlines()]
    assert [o["file"] for o in objects] == [Path(p).name for p in good] + ["sdxl_style.safetensors"]
    assert [o["kind"] for o in objects] == ["lora"] * 5 + ["transformer", "text_encoder", "vae", "lora"]
    assert [o["usable"] for o in objects] == [True] * 8 + [False]
    assert objects[0]["info"]["ranks"] == [4] and objects[5]["info"]["dim"] == 64
    assert str(tiny["root"]) not in out

    assert run_cli(capsys, loras["diffusers"][0], "--model", built.vae_file)[0] == 2  # --model is no transformer
    assert run_cli(capsys)[0] == 2  # no file
    assert main([]) == 2  # no command
    with pytest.raises(ZImageError):
        reference_from(tiny["foreign_lora"])


def test_python_dash_m_engine_check_runs(tiny):
    """The real entry point, as a user runs it from the node pack's folder."""
    built = tiny["built"]
    cmd = [sys.executable, "-m", "zimage_turbo", "check", str(tiny["loras"]["kohya_fused"][0]), str(tiny["foreign_lora"]),
           "--model", str(built.transformer_file)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "tiny_kohya_fused.safetensors: LoRA: usable" in proc.stdout
    assert "sdxl_style.safetensors: LoRA: REFUSED" in proc.stdout and "fit no layer" in proc.stdout
