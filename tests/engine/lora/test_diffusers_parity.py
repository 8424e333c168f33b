"""Where diffusers reads a LoRA layout (ZImageLoraLoaderMixin: its Z-Image / kohya / LoKr conversions in
diffusers.loaders.lora_conversion_utils, then PEFT), our merged weights equal what diffusers fuses.

diffusers is used as a user would: ZImagePipeline.load_lora_weights(file) then fuse_lora(lora_scale).
The layouts diffusers does not read, or reads only partly, are pinned too, so a diffusers release that
starts reading them turns up here as a failing test to turn into a parity test.
"""

from __future__ import annotations

import pytest
import torch

from devtools import lora_formats
from devtools.model_builder import TINY
from zimage_turbo.engine.lora import LoraManager, LoraSpec

STRENGTH = 0.8
# Layouts whose every layer diffusers applies.
PARITY = ("diffusers", "kohya_split", "kohya_underscore", "kohya_underscore_split", "diffsynth", "ai_toolkit",
          "comfy_distill_patch", "dot_names", "lokr_full", "lokr_w2_factored", "lokr_factored", "lokr_no_alpha")
# Layouts diffusers 0.42 refuses with an error (we read them: see test_lora_formats.py).
DIFFUSERS_REFUSES = ("onetrainer", "lycoris_lora", "lokr_tucker", "lokr_uneven_ranks", "lokr_fused_qkv", "loha",
                     "loha_tucker", "diff", "lora_with_diff_b")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for i, name in enumerate(lora_formats.LAYOUTS):
        rank = 2 if name.startswith("lokr") else 4  # PEFT re-derives LoKr splits: rank 2 splits every tiny layer
        out[name] = lora_formats.build_lora(root / f"{name}.safetensors", TINY.transformer, name, rank=rank, alpha=3.0,
                                            seed=300 + i)
    return out


def base_weights(model) -> dict[str, torch.Tensor]:
    # PEFT wraps each Linear: its own weight is then named ...base_layer.weight.
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
            if ".lora_" not in n and ".lokr_" not in n}


def diffusers_fused(tiny, path) -> dict[str, torch.Tensor]:
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(tiny["built"].diffusers_dir))
    pipe.load_lora_weights(str(path), adapter_name="under_test")
    pipe.fuse_lora(lora_scale=STRENGTH, adapter_names=["under_test"])
    return base_weights(pipe.transformer)


def ours_merged(tiny, path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel.from_pretrained(str(tiny["built"].diffusers_dir / "transformer"))
    before = base_weights(model)
    manager = LoraManager(model)
    manager.mode = "merge"
    manager.apply([LoraSpec(path, STRENGTH)])
    return before, base_weights(model)


def changed(before, after) -> set[str]:
    return {k for k in after if not torch.equal(after[k], before[k])}


@pytest.mark.parametrize("layout", PARITY)
def test_our_merge_equals_diffusers(tiny, files, layout):
    before, ours = ours_merged(tiny, files[layout].path)
    theirs = diffusers_fused(tiny, files[layout].path)
    assert changed(before, ours) == changed(before, theirs) and changed(before, ours)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)


def test_fused_qkv_kohya_file_diffusers_leaves_q_k_v_unchanged(tiny, files):
    """diffusion_model.<block>.attention.qkv.lora_down: diffusers applies out and the feed-forward only (no error)."""
    path = files["kohya_fused"].path
    before, ours = ours_merged(tiny, path)
    theirs = diffusers_fused(tiny, path)
    qkv = {k for k in changed(before, ours) if any(f".attention.to_{p}." in k for p in "qkv")}
    assert len(qkv) == 3 * TINY.transformer["n_layers"]
    assert changed(before, theirs) == changed(before, ours) - qkv  # diffusers silently skips the fused keys
    for k in changed(before, theirs):
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)


def test_bare_keys_without_default_diffusers_applies_nothing(tiny, files):
    """layers.0.attention.to_q.lora_A.weight (no prefix): diffusers loads it without error and changes nothing."""
    path = files["diffsynth_plain"].path
    before, ours = ours_merged(tiny, path)
    assert len(changed(before, ours)) == len(files["diffsynth_plain"].layers)
    assert changed(before, diffusers_fused(tiny, path)) == set()


@pytest.mark.parametrize("layout", DIFFUSERS_REFUSES)
def test_layouts_diffusers_refuses(tiny, files, layout):
    before, ours = ours_merged(tiny, files[layout].path)
    assert changed(before, ours)
    with pytest.raises(Exception):  # noqa: B017 -- diffusers raises ValueError, RuntimeError or PEFT's own errors
        diffusers_fused(tiny, files[layout].path)
