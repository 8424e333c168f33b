"""The two ways an active LoRA stack runs: merged into the weights (no cost per step) and as adapters."""

import pytest
import torch

from zimage_turbo.engine.lora import apply as lora_mod
from zimage_turbo.engine.errors import InvalidSettingError
from zimage_turbo.engine.files.model_files import DiffusersFolder
from zimage_turbo.engine.lora import LoraSpec
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline, release_all

CPU = torch.device("cpu")
REQ = GenerationRequest("a portrait, soft light", width=48, height=48, seed=21)


def new_pipe(tiny, mode):
    release_all()
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32)
    pipe.tstate.lora.mode = mode
    return pipe


def base_weights(pipe):
    # PEFT wraps each Linear: its weight is then named ...base_layer.weight
    return {n.replace(".base_layer", ""): p.detach().clone()
            for n, p in pipe.transformer.named_parameters() if ".lora_" not in n}


def test_merged_equals_adapters_and_all_off_restores_every_weight_bit_for_bit(tiny, fresh_engine):
    (p1, _), (p2, _) = tiny["loras"]["diffusers"], tiny["loras"]["kohya_split"]
    stack = [LoraSpec(p1, 0.7), LoraSpec(p2, -0.4)]
    adapters = new_pipe(tiny, "adapters")
    ref_base = adapters.generate(REQ).images
    ref = adapters.generate(REQ, stack)
    assert ref.report.lora_path == "adapters"

    pipe = new_pipe(tiny, "auto")  # a CPU with free memory merges
    before = base_weights(pipe)
    assert torch.equal(pipe.generate(REQ).images, ref_base)
    out = pipe.generate(REQ, stack)
    assert out.report.lora_path == "merged" and "no cost per step" in out.report.to_text()
    # merged: the model's structure is untouched (no adapter layer injected), so nothing recompiles
    assert not [n for n, _ in pipe.transformer.named_modules() if "lora_" in n]
    assert (out.images - ref_base).abs().max() > 1e-2
    torch.testing.assert_close(out.images, ref.images, rtol=0, atol=2e-5)
    changed = [n for n, t in base_weights(pipe).items() if not torch.equal(t, before[n])]
    assert changed  # the stack really sits in the base weights now

    # strength change, switch to one file, then everything off
    pipe.generate(REQ, [LoraSpec(p1, 1.3), LoraSpec(p2, -0.4)])
    pipe.generate(REQ, [LoraSpec(p2, 0.9)])
    off = pipe.generate(REQ, [LoraSpec(p1, 0.7, enabled=False)])
    assert off.report.lora_path == ""
    assert torch.equal(off.images, ref_base)
    assert all(torch.equal(t, before[n]) for n, t in base_weights(pipe).items())


def structure(module):
    return [(n, type(m).__name__) for n, m in module.named_modules()]


def test_adapters_all_off_puts_the_pre_lora_module_tree_back_and_on_again_is_a_swap(tiny, fresh_engine):
    """A compiled transformer traces the module tree: with every LoRA off it must be the tree compiled before any
    LoRA (else a second graph of the same computation, fused differently, changes the bits: seen in fp8 mode on
    an H100). The PEFT layers are kept aside: the next LoRA on reuses them, slots and files included."""
    (p1, _), (p2, _) = tiny["loras"]["diffusers"], tiny["loras"]["kohya_split"]
    pipe = new_pipe(tiny, "adapters")
    tree = structure(pipe.transformer)
    base = pipe.generate(REQ).images
    styled = pipe.generate(REQ, [LoraSpec(p1, 0.7), LoraSpec(p2, -0.4)])
    assert styled.report.lora_path == "adapters"
    assert any(".lora_A" in n for n, _ in structure(pipe.transformer))
    manager = pipe.tstate.lora
    rebuilds = manager.rebuilds
    off = pipe.generate(REQ, [])
    assert structure(pipe.transformer) == tree and torch.equal(off.images, base)
    again = pipe.generate(REQ, [LoraSpec(p1, 0.7), LoraSpec(p2, -0.4)])
    assert torch.equal(again.images, styled.images) and manager.rebuilds == rebuilds
    pipe.generate(REQ, [LoraSpec(p2, 0.5)])  # a strength change and one file fewer: still the same slots
    manager.remove_all()
    assert structure(pipe.transformer) == tree and not manager.layers
    assert torch.equal(pipe.generate(REQ).images, base)
    assert torch.equal(pipe.generate(REQ, [LoraSpec(p1, 0.7), LoraSpec(p2, -0.4)]).images, styled.images)


def test_same_stack_same_bits_whatever_ran_before(tiny, fresh_engine):
    (p1, _), (p2, _) = tiny["loras"]["diffusers"], tiny["loras"]["kohya_fused"]
    first = new_pipe(tiny, "merge").generate(REQ, [LoraSpec(p1, 0.6)]).images
    pipe = new_pipe(tiny, "merge")
    for spec in ([LoraSpec(p2, 1.0)], [LoraSpec(p1, 0.2), LoraSpec(p2, 0.5)], [LoraSpec(p1, -1.0)]):
        pipe.generate(REQ, spec)
    assert torch.equal(pipe.generate(REQ, [LoraSpec(p1, 0.6)]).images, first)


def test_not_enough_memory_for_the_copies_runs_adapters_and_says_why(tiny, fresh_engine, monkeypatch):
    path, _ = tiny["loras"]["diffusers"]
    merged = new_pipe(tiny, "merge").generate(REQ, [LoraSpec(path, 0.8)]).images
    pipe = new_pipe(tiny, "auto")
    monkeypatch.setattr(lora_mod, "_free_bytes", lambda device: 1024)
    rep = pipe.generate(REQ, [LoraSpec(path, 0.8)])
    assert rep.report.lora_path == "adapters"
    assert "GiB is free" in rep.report.lora_why_adapters and "GiB is free" in rep.report.to_text()
    assert pipe.lora_variant() == ("adapters", 1)
    torch.testing.assert_close(rep.images, merged, rtol=0, atol=2e-5)
    monkeypatch.setattr(lora_mod, "_free_bytes", lambda device: 1 << 50)
    again = pipe.generate(REQ, [LoraSpec(path, 0.5)])  # memory came back: the next change merges
    assert again.report.lora_path == "merged" and pipe.lora_variant() == "base"


def test_lora_mode_from_the_environment(tiny, fresh_engine, monkeypatch):
    path, _ = tiny["loras"]["diffusers"]
    monkeypatch.setenv(lora_mod.LORA_MODE_ENV, "adapters")
    release_all()
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32)
    assert pipe.generate(REQ, [LoraSpec(path, 0.8)]).report.lora_path == "adapters"
    monkeypatch.setenv(lora_mod.LORA_MODE_ENV, "fast")
    with pytest.raises(InvalidSettingError, match="ZIMAGE_TURBO_LORA_MODE='fast'"):
        lora_mod.lora_mode_from_env()
