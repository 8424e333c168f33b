"""The file checker on every LoRA layout the engine reads (devtools/lora_formats.py), and on Comfy-Org's distill patch."""

from __future__ import annotations

import pytest

from devtools import lora_formats
from devtools.model_builder import TINY
from zimage_turbo.engine.__main__ import main
from zimage_turbo.engine.files.check import biased_layers, check_file, reference_from
from zimage_turbo.engine.lora import biased_modules
from zimage_turbo.engine.model_config import TRANSFORMER_CONFIG

# layout -> what the checker calls its format
FORMATS = {
    "diffusers": "diffusers/peft",
    "kohya_fused": "kohya/ComfyUI (fused qkv)",
    "kohya_split": "kohya/ComfyUI (split q/k/v)",
    "kohya_underscore": "kohya (underscore names)",
    "kohya_underscore_split": "kohya (underscore names)",
    "onetrainer": "kohya (underscore names)",
    "lycoris_lora": "kohya (underscore names)",
    "diffsynth": "DiffSynth (bare keys)",
    "diffsynth_plain": "DiffSynth (bare keys)",
    "ai_toolkit": "ai-toolkit (diffusion_model. + diffusers names)",
    "comfy_distill_patch": "Comfy-Org/DiffSynth (diffusion_model. + lora_A.default)",
    "dot_names": "dot names (Anime-Z style)",
    "lokr_full": "LyCORIS LoKr, ai-toolkit (diffusion_model. + diffusers names)",
    "lokr_w2_factored": "LyCORIS LoKr, ai-toolkit (diffusion_model. + diffusers names)",
    "lokr_factored": "LyCORIS LoKr, ai-toolkit (diffusion_model. + diffusers names)",
    "lokr_uneven_ranks": "LyCORIS LoKr, ai-toolkit (diffusion_model. + diffusers names)",
    "lokr_no_alpha": "LyCORIS LoKr, ai-toolkit (diffusion_model. + diffusers names)",
    "lokr_tucker": "LyCORIS LoKr, kohya (underscore names)",
    "lokr_fused_qkv": "LyCORIS LoKr, kohya (underscore names)",
    "loha": "LyCORIS LoHa, kohya (underscore names)",
    "loha_tucker": "LyCORIS LoHa, kohya (underscore names)",
    "diff": "full-weight diff, kohya/ComfyUI (fused qkv)",
    "lora_with_diff_b": "kohya/ComfyUI (split q/k/v) + bias diffs",
}


@pytest.fixture(scope="module")
def tiny_ref(tiny):
    return reference_from(tiny["built"].transformer_file)


def test_every_layout_has_a_format_name():
    assert set(FORMATS) == set(lora_formats.LAYOUTS)


@pytest.mark.parametrize("layout", lora_formats.LAYOUTS)
def test_every_layout_is_usable_and_named(tmp_path, tiny_ref, layout):
    rank = 2 if layout.startswith("lokr") else 4
    built = lora_formats.build_lora(tmp_path / f"{layout}.safetensors", TINY.transformer, layout, rank=rank, seed=7,
                                    metadata={"modelspec.trigger_phrase": "zit glow"})
    result = check_file(built.path, tiny_ref)
    assert result.kind == "lora" and result.usable and result.error is None, result.error
    assert result.info.format == FORMATS[layout]
    assert result.info.model_layers_changed == len(built.layers)
    assert result.info.trigger_words == ["zit glow"]
    text = "\n".join(result.lines())
    assert "trigger words: zit glow (from modelspec.trigger_phrase)" in text
    whole_matrix = layout in lora_formats.DENSE_LAYOUTS
    assert ("whole-matrix changes, merged into the weights" in text) == whole_matrix


def test_an_alpha_kept_in_diffusers_metadata_is_shown(tmp_path, tiny_ref):
    built = lora_formats.build_lora(tmp_path / "d.safetensors", TINY.transformer, "diffusers", rank=4, alpha=8.0)
    result = check_file(built.path, tiny_ref)
    assert result.info.alphas == [8.0]
    assert "rank 4; alpha 8 in lora_adapter_metadata (scale alpha/rank = 2)" in "\n".join(result.lines())


def test_the_checkers_biased_layers_are_the_models(tiny):
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(**TINY.transformer)
    assert biased_layers(TINY.transformer) == biased_modules(model)


def test_a_bias_diff_for_a_layer_without_bias_is_refused(tmp_path, tiny_ref):
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "bad_bias.safetensors"
    save_file({"diffusion_model.layers.0.feed_forward.w2.diff_b": torch.zeros(64)}, str(path))
    result = check_file(path, tiny_ref)
    assert not result.usable and "a layer without a bias" in result.error


def test_comfy_orgs_distill_patch_layout_at_true_size(tmp_path, capsys):
    """Comfy-Org's z_image_turbo_distill_patch_lora_bf16.safetensors is 158,826,336 bytes (its Hugging Face LFS
    pointer): this layout at rank 32 on the released transformer is exactly that size, so the key names, dtypes and
    shapes are the published file's (a different name, dtype, rank or layer set would change the size)."""
    path = tmp_path / "z_image_turbo_distill_patch_lora_bf16.safetensors"
    built = lora_formats.build_lora(path, TRANSFORMER_CONFIG, "comfy_distill_patch", rank=lora_formats.DISTILL_PATCH_RANK,
                                    zeros=True)
    assert path.stat().st_size == lora_formats.DISTILL_PATCH_BYTES
    assert len(built.layers) == 238 and len(built.keys) == 476
    result = check_file(path)  # against the released Z-Image-Turbo
    assert result.usable and result.info.format == FORMATS["comfy_distill_patch"]
    assert result.info.ranks == [32] and result.info.alphas == [] and result.info.model_layers_changed == 238
    assert result.info.coverage == ("attention q/k/v/out and feed-forward of all 30 main blocks; attention q/k/v/out "
                                    "and feed-forward of all 2 noise-refiner blocks; attention q/k/v/out and "
                                    "feed-forward of all 2 context-refiner blocks")
    assert main(["check", str(path)]) == 0
    assert "LoRA: usable" in capsys.readouterr().out
