import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools import model_builder
from zimage_turbo.engine.errors import LoraKeyError
from zimage_turbo.engine.files.model_files import COMPONENTS, DiffusersFolder
from zimage_turbo.engine.lora import LORA_FILES, LoraSpec
from devtools.model_builder import LORA_FORMATS, TINY
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

CPU = torch.device("cpu")
REQ = GenerationRequest("a portrait, soft light", width=48, height=48, seed=21)


def merged_copy(tiny, tmp_path, loras) -> DiffusersFolder:
    """A copy of the tiny diffusers folder with W + s * (alpha / rank) * B @ A merged into the weights by hand."""
    folder = tmp_path / "merged"
    shutil.copytree(tiny["built"].diffusers_dir, folder)
    wfile = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(wfile))
    for expected, strength in loras:
        for module, (down, up, alpha) in expected.items():
            key = f"{module}.weight"
            sd[key] = (sd[key].double() + strength * (alpha / down.shape[0]) * (up.double() @ down.double())).float()
    save_file(sd, str(wfile))
    return DiffusersFolder(folder)


@pytest.fixture()
def pipe(tiny, fresh_engine):
    return get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32)


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_each_format_equals_hand_merged_weights(tiny, tmp_path, pipe, fmt):
    path, expected = tiny["loras"][fmt]
    ours = pipe.generate(REQ, [LoraSpec(path, 0.8)]).images
    merged = get_pipeline(merged_copy(tiny, tmp_path, [(expected, 0.8)]), CPU, torch.float32).generate(REQ).images
    base = pipe.generate(REQ).images
    assert (ours - base).abs().max() > 1e-2  # the LoRA really changes the image
    torch.testing.assert_close(ours, merged, rtol=0, atol=2e-5)


@pytest.mark.parametrize("strength", [-0.7, 1.6])
def test_negative_and_large_strengths(tiny, tmp_path, pipe, strength):
    path, expected = tiny["loras"]["kohya_fused"]
    ours = pipe.generate(REQ, [LoraSpec(path, strength)]).images
    merged = get_pipeline(merged_copy(tiny, tmp_path, [(expected, strength)]), CPU, torch.float32).generate(REQ).images
    torch.testing.assert_close(ours, merged, rtol=0, atol=2e-5)


def test_two_stacked_loras_equal_both_merged(tiny, tmp_path, pipe):
    (p1, e1), (p2, e2) = tiny["loras"]["diffusers"], tiny["loras"]["kohya_split"]
    ours = pipe.generate(REQ, [LoraSpec(p1, 0.5), LoraSpec(p2, -0.4)]).images
    merged = get_pipeline(merged_copy(tiny, tmp_path, [(e1, 0.5), (e2, -0.4)]), CPU, torch.float32).generate(REQ).images
    torch.testing.assert_close(ours, merged, rtol=0, atol=2e-5)


def test_switching_never_reloads_and_removing_all_is_bit_identical(tiny, pipe):
    never = pipe.generate(REQ).images
    loads, reads = COMPONENTS.loads, LORA_FILES.reads
    path = tiny["loras"]["kohya_fused"][0]
    a = pipe.generate(REQ, [LoraSpec(path, 0.5)])
    b = pipe.generate(REQ, [LoraSpec(path, 0.9)])
    off = pipe.generate(REQ, [LoraSpec(path, 0.9, enabled=False)])
    a2 = pipe.generate(REQ, [LoraSpec(path, 0.5)])
    none = pipe.generate(REQ, [])
    assert COMPONENTS.loads == loads  # the base model was never read again
    assert LORA_FILES.reads == reads + 1  # the LoRA file was read once
    assert (a.images - b.images).abs().max() > 1e-3
    assert torch.equal(a.images, a2.images)
    assert torch.equal(off.images, never) and torch.equal(none.images, never)
    assert not a2.report.base_reloaded and a2.report.lora_s < 0.5
    pipe.tstate.lora.remove_all()
    assert torch.equal(pipe.generate(REQ).images, never)


def test_foreign_lora_is_refused_with_its_keys_named(tiny, pipe):
    with pytest.raises(LoraKeyError, match="fit no layer .* lora_unet_down_blocks_0_attentions_0_proj_in"):
        pipe.generate(REQ, [LoraSpec(tiny["foreign_lora"], 1.0)])


def test_partly_fitting_lora_is_refused_and_nothing_applied(tiny, tmp_path, pipe):
    path, _ = tiny["loras"]["diffusers"]
    sd = load_file(str(path))
    sd["transformer.layers.0.attention.to_qq.lora_A.weight"] = torch.zeros(4, 64)
    bad = tmp_path / "partial.safetensors"
    save_file(sd, str(bad))
    base = pipe.generate(REQ).images
    with pytest.raises(LoraKeyError, match="1 of .* keys fit no layer.*to_qq"):
        pipe.generate(REQ, [LoraSpec(bad, 1.0)])
    assert torch.equal(pipe.generate(REQ).images, base)


def test_lora_for_another_model_size_is_refused(tmp_path, pipe):
    bigger = dict(TINY.transformer, dim=96, n_heads=3)
    path = tmp_path / "big.safetensors"
    model_builder.build_random_lora(path, bigger, "diffusers", rank=4)
    with pytest.raises(LoraKeyError, match="different model size"):
        pipe.generate(REQ, [LoraSpec(path, 1.0)])


def test_dora_is_refused_by_name(tmp_path, pipe):
    path = tmp_path / "dora.safetensors"
    save_file({"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(64, 4),
               "transformer.layers.0.attention.to_q.lora_magnitude_vector": torch.ones(64)}, str(path))
    with pytest.raises(LoraKeyError, match="DoRA adapter .*lora_magnitude_vector.*LyCORIS LoKr and LoHa"):
        pipe.generate(REQ, [LoraSpec(path, 1.0)])


def test_missing_lora_file(tmp_path, pipe):
    with pytest.raises(Exception, match="not found"):
        pipe.generate(REQ, [LoraSpec(tmp_path / "gone.safetensors", 1.0)])
