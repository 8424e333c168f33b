"""GPU suite, CUDA graphs for the step (step_graphs.py): real captures, compared with the normal path bit for bit.

Each case makes the same image with graphs on and with ZIMAGE_TURBO_CUDA_GRAPHS=0 (the same compiled code called
step by step) and asserts equal bits: a replay that read stale weights, a stale strength or a stale input would
differ. LoRAs merged in place (bf16), strengths changed in adapter slots (fp8), weights moved to new storage,
guidance (batch doubled) and batch 2 are all covered.
"""

from __future__ import annotations

import pytest
import torch

from zimage_turbo.engine.files.model_files import DiffusersFolder
from zimage_turbo.engine.lora import LoraSpec
from zimage_turbo.engine.sampling import step_graphs
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

from .test_fp8 import EVERYTHING, FP8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
REQ = GenerationRequest("a red fox, 狐狸, soft light", width=64, height=64, seed=3)
CUDA0 = torch.device("cuda:0")


def _both(pipe, monkeypatch, req=REQ, loras=()):
    """(with graphs, without graphs) for the same request; the first is made twice so that it replays."""
    monkeypatch.setenv(step_graphs.ENV, "1")
    pipe.generate(req, list(loras))
    on = pipe.generate(req, list(loras))
    monkeypatch.setenv(step_graphs.ENV, "0")
    off = pipe.generate(req, list(loras))
    monkeypatch.setenv(step_graphs.ENV, "1")
    assert off.report.cuda_graphs == f"off ({step_graphs.ENV}=0)"
    return on, off


def _same(on, off):
    assert on.report.cuda_graphs == "replayed", on.report.cuda_graphs
    diff = (on.latents - off.latents).abs().max().item()
    assert torch.equal(on.latents, off.latents), f"latents differ by up to {diff}"
    assert torch.equal(on.images, off.images)


def test_bf16_graphs_give_the_same_bits_with_merged_loras_and_guidance(tiny, fresh_engine, monkeypatch):
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CUDA0, torch.bfloat16, "resident", "on")
    first = pipe.generate(REQ)
    assert first.report.compiled and first.report.cuda_graphs.startswith("not yet"), first.report.cuda_graphs
    _same(*_both(pipe, monkeypatch))
    captures = pipe.step_graphs.captures
    a, b = tiny["loras"]["diffusers"][0], tiny["loras"]["kohya_fused"][0]
    for stack in ([LoraSpec(a, 0.8)], [LoraSpec(a, 0.3)], [LoraSpec(a, 0.6), LoraSpec(b, -0.4)]):
        on, off = _both(pipe, monkeypatch, loras=stack)
        assert on.report.lora_path == "merged"
        _same(on, off)
    assert pipe.step_graphs.captures == captures  # merged in place: the base graph serves every stack
    _same(*_both(pipe, monkeypatch))  # all off again
    cfg = GenerationRequest("a red fox, 狐狸, soft light", width=64, height=80, seed=4, cfg=2.5, batch_size=2,
                            negative_prompt="blurry")
    _same(*_both(pipe, monkeypatch, cfg))


def test_weights_moved_to_new_storage_are_never_read_from_an_old_graph(tiny, fresh_engine, monkeypatch):
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CUDA0, torch.bfloat16, "resident", "on")
    on, _ = _both(pipe, monkeypatch)
    block = pipe.transformer.layers[0]
    w = block.feed_forward.w2.weight
    w.data = (w.data * 1.5).contiguous()  # new storage, new values (what a reload or a precision change does)
    moved_on, moved_off = _both(pipe, monkeypatch)
    _same(moved_on, moved_off)
    assert not torch.equal(moved_on.latents, on.latents)


@FP8
def test_fp8_graphs_follow_adapter_strengths_and_switches(tiny, fresh_engine, monkeypatch):
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CUDA0, torch.bfloat16, "resident", "on",
                        fp8=EVERYTHING)
    base_on, base_off = _both(pipe, monkeypatch)
    _same(base_on, base_off)
    a, b = tiny["loras"]["diffusers"][0], tiny["loras"]["kohya_fused"][0]
    results = []
    for stack in ([LoraSpec(a, 0.8)], [LoraSpec(a, 0.3)], [LoraSpec(b, 0.8)], [LoraSpec(a, 0.5), LoraSpec(b, -0.3)]):
        on, off = _both(pipe, monkeypatch, loras=stack)
        assert on.report.lora_path == "adapters"
        _same(on, off)
        results.append(on.latents)
    assert not torch.equal(results[0], results[1])  # the strength written in place reached the replay
    off_again = pipe.generate(REQ, [])
    assert off_again.report.cuda_graphs == "replayed" and torch.equal(off_again.latents, base_on.latents)
