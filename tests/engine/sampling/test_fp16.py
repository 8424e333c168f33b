"""fp16 must never give NaN/inf: Z-Image activations pass 65504 (fp16's largest value)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_turbo.engine.sampling import fp16_guard
from zimage_turbo.engine.errors import NonFiniteError
from zimage_turbo.engine.files.model_files import DiffusersFolder
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

CPU = torch.device("cpu")
REQ = GenerationRequest("a cat on a sofa", width=32, height=32, seed=1)


def hot_model(tiny, tmp_path, gain: float) -> DiffusersFolder:
    """The tiny model with its feed-forward input weights scaled up, so activations leave the fp16 range."""
    folder = tmp_path / f"hot{gain}"
    shutil.copytree(tiny["built"].diffusers_dir, folder)
    f = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    for key in list(sd):
        if key.startswith("layers.") and (key.endswith("feed_forward.w1.weight") or key.endswith("feed_forward.w3.weight")):
            sd[key] = sd[key] * gain
    save_file(sd, str(f))
    return DiffusersFolder(folder)


def largest_gated_activation(pipe) -> float:
    seen = []
    hooks = [blk.feed_forward.w2.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max().item()))
             for blk in pipe.transformer.layers]
    try:
        pipe.generate(REQ)
    finally:
        for h in hooks:
            h.remove()
    return max(seen)


# Clamping changes the few overflowing activations a little; the image stays within a few percent.
@pytest.mark.parametrize("gain,tolerance", [(250.0, 0.03), (400.0, 0.06)])
def test_fp16_stays_finite_and_close_to_fp32(tiny, tmp_path, fresh_engine, gain, tolerance):
    source = hot_model(tiny, tmp_path, gain)
    p32 = get_pipeline(source, CPU, torch.float32)
    assert largest_gated_activation(p32) > 65504 * 2  # the test really drives activations past fp16
    ref = p32.generate(REQ).images

    p16 = get_pipeline(source, CPU, torch.float16)
    out = p16.generate(REQ).images
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < tolerance
    assert (out - ref).abs().mean().item() < tolerance / 5

    # Without the guards the same fp16 model breaks: the guards are what keeps it finite. And a broken
    # generation is an error naming fp16, never a black image.
    fp16_guard.remove_guards(p16.tstate.guards)
    try:
        with pytest.raises(NonFiniteError, match="fp16 precision"):
            p16.generate(REQ)
    finally:
        p16.tstate.guards = fp16_guard.install_transformer_guards(p16.transformer)


def test_guards_only_in_fp16(tiny, fresh_engine):
    src = DiffusersFolder(tiny["built"].diffusers_dir)
    assert get_pipeline(src, CPU, torch.float32).tstate.guards == []
    assert get_pipeline(src, CPU, torch.bfloat16).tstate.guards == []
    assert len(get_pipeline(src, CPU, torch.float16).tstate.guards) > 0
