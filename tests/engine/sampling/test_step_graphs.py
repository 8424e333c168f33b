"""CUDA graphs for the step (step_graphs.py): when a graph may be replayed, and when it must not.

A CPU cannot capture a CUDA graph: here the capture is stood in by a recording replay of the same callable, so
the bookkeeping (which call captures, which replays, which key a weight change makes) is tested; tests/gpu/
test_step_graphs.py captures real graphs and compares their images with the normal path's, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from zimage_turbo.engine.sampling import step_graphs
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline
from zimage_turbo.engine.files.model_files import DiffusersFolder


class _FakeGraph:
    """Stands in for a captured graph: 'replays' the callable it was made from on its static buffers."""

    def __init__(self, model, x, t, embeds):
        self.model, self.x, self.t, self.embeds = model, x, t, embeds
        self.out = model(x, t, embeds)
        self.replays = 0

    def run(self, x, t, embeds):
        self.replays += 1
        self.x.copy_(x)
        self.t.copy_(t)
        for b, e in zip(self.embeds, embeds):
            b.copy_(e)
        return self.model(self.x, self.t, self.embeds)


def _fake_capture(self, key, model, x, t, embeds):
    g = _FakeGraph(model, x.clone(), t.clone(), [e.clone() for e in embeds])
    self.graphs[key] = g
    self.captures += 1
    while len(self.graphs) > self.max_graphs:
        self.graphs.popitem(last=False)
    return g


def _inputs(side=4, tokens=3):
    return torch.randn(1, 2, side, side), torch.full((1,), 0.5), [torch.randn(tokens, 5)]


def test_a_key_runs_normally_then_is_captured_then_replayed(monkeypatch):
    monkeypatch.setattr(step_graphs.StepGraphs, "_capture", _fake_capture)
    calls = []

    def model(x, t, embeds):
        calls.append(x.shape)
        return x * t.view(-1, 1, 1, 1) + embeds[0].sum()

    graphs = step_graphs.StepGraphs(torch.device("cpu"), max_graphs=2)
    run = graphs.runner(model, ("base", 1))
    x, t, e = _inputs()
    first = run(x, t, e)
    assert graphs.captures == 0 and not run.used  # the first call of a key is a normal call
    second = run(x, t, e)
    assert graphs.captures == 1 and run.used and torch.equal(first, second)
    x2 = torch.randn_like(x)
    third = run(x2, t, e)  # new values, same shapes: the graph's buffers take them
    assert graphs.captures == 1 and torch.equal(third, model(x2, t, e))
    # another prompt length is another key: normal first, then its own graph
    xb, tb, eb = _inputs(tokens=7)
    run(xb, tb, eb)
    assert graphs.captures == 1
    run(xb, tb, eb)
    assert graphs.captures == 2 and len(graphs.graphs) == 2
    # a third shape evicts the least recently used graph (the first)
    xc, tc, ec = _inputs(side=8)
    run(xc, tc, ec)
    run(xc, tc, ec)
    assert len(graphs.graphs) == 2 and graphs.captures == 3
    run(x, t, e)  # its graph went: captured again (the key was seen)
    assert graphs.captures == 4


def test_another_weights_variant_never_replays_an_old_graph(monkeypatch):
    monkeypatch.setattr(step_graphs.StepGraphs, "_capture", _fake_capture)
    graphs = step_graphs.StepGraphs(torch.device("cpu"))
    model = lambda x, t, e: x + 1  # noqa: E731
    x, t, e = _inputs()
    a = graphs.runner(model, ("base", 111))
    a(x, t, e)
    a(x, t, e)
    b = graphs.runner(model, ("base", 222))  # the fingerprint changed: a new key
    b(x, t, e)
    assert not b.used and graphs.captures == 1


def test_a_failed_capture_falls_back_and_is_not_tried_again(monkeypatch):
    tries = []

    def failing(self, key, model, x, t, embeds):
        tries.append(key)
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(step_graphs.StepGraphs, "_capture", failing)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    graphs = step_graphs.StepGraphs(torch.device("cpu"))
    run = graphs.runner(lambda x, t, e: x * 2, "v")
    x, t, e = _inputs()
    for _ in range(4):
        assert torch.equal(run(x, t, e), x * 2)
    assert len(tries) == 1 and not run.used
    assert run.note.startswith("capture failed (RuntimeError: operation not permitted") and "more" not in run.note


def test_the_fingerprint_follows_storage_and_the_module_tree_not_values():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    fp = step_graphs.weights_fingerprint(m)
    with torch.no_grad():
        m[0].weight.add_(1.0)  # a LoRA merged in place: the graph reads the new values, same key
    assert step_graphs.weights_fingerprint(m) == fp
    m[0].weight.data = m[0].weight.data.clone()  # moved (a memory mode, a precision change): new key
    fp2 = step_graphs.weights_fingerprint(m)
    assert fp2 != fp
    m[1] = nn.Linear(4, 4)  # a layer swapped (PEFT wrappers in or out of the tree): new key
    assert step_graphs.weights_fingerprint(m) != fp2


def test_why_not(monkeypatch, tiny, fresh_engine):
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), torch.device("cpu"), torch.float32, "resident", "off")
    graphs = step_graphs.StepGraphs(torch.device("cpu"))
    assert graphs.why_not(pipe, compiled=True) == "CUDA only"
    out = pipe.generate(GenerationRequest("a fox", width=64, height=64, steps=2))
    assert out.report.cuda_graphs == "off (CUDA only)"
    assert "CUDA graphs off (CUDA only)" in out.report.to_text()
    monkeypatch.setattr(pipe, "device", torch.device("cuda:0"))  # only the checks' order is exercised here
    monkeypatch.setenv(step_graphs.ENV, "0")
    assert graphs.why_not(pipe, compiled=True) == f"off ({step_graphs.ENV}=0)"
    monkeypatch.setenv(step_graphs.ENV, "1")
    assert graphs.why_not(pipe, compiled=False) == "the compiled path only"
    assert graphs.why_not(pipe, compiled=True) == ""
    pipe.warmup.running = True
    assert graphs.why_not(pipe, compiled=True) == "not while the background compile runs"
    pipe.warmup.running = False
