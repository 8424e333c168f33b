"""Our compiled regions get room for every kind of block they serve, and a region that torch gives up on is
reported, not called "compiled" (found on an H100: fp8 mode, seven sizes, then a LoRA: 207 ms a step, "compiled").

Dynamo's real machinery runs here with its "eager" backend (no inductor: seconds, not minutes)."""

from __future__ import annotations

import torch

from zimage_turbo.engine.sampling import acceleration


def _function_in(filename: str):
    """A function whose code says it lives in `filename` (dynamo's limit warning names that file)."""
    scope: dict = {}
    exec(compile("def block(x):\n    return x * 2 + 1\n", filename, "exec"), scope)
    return scope["block"]


def _variants(fn, count: int) -> None:
    # Each dtype is a guard failure, hence a new graph, as a new kind of block instance is for our regions.
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.int16,
              torch.int8, torch.uint8, torch.complex64, torch.complex128, torch.bool]
    for dtype in dtypes[:count]:
        fn(torch.ones(3, dtype=dtype))


def test_a_region_compiles_more_kinds_than_dynamos_default_allows():
    torch._dynamo.reset()
    import torch._dynamo.config as dynamo_config

    default = dynamo_config.recompile_limit
    kinds = default + 3  # more kinds than the default, as fp8 mode with sizes, batches and a LoRA has
    assert kinds <= acceleration.RECOMPILE_LIMIT
    hits = acceleration.recompile_limit_hits()
    fn = torch.compile(_function_in("transformer_z_image.py"), backend="eager", dynamic=True,
                       **acceleration._recompile_limit_kwargs())
    _variants(fn, kinds)
    assert acceleration.recompile_limit_hits() == hits  # every kind got its graph: none gave up


def test_a_region_torch_gives_up_on_is_counted_and_named(monkeypatch):
    # The count is the process's (every later compiled image's probe carries the note): put it back afterwards.
    monkeypatch.setattr(acceleration._limit_watch, "hits", acceleration._limit_watch.hits)
    monkeypatch.setattr(acceleration._limit_watch, "last", acceleration._limit_watch.last)
    torch._dynamo.reset()
    acceleration._recompile_limit_kwargs()  # installs the watch
    hits = acceleration.recompile_limit_hits()
    ours = torch.compile(_function_in("/x/diffusers/models/transformers/transformer_z_image.py"), backend="eager",
                         dynamic=True, recompile_limit=2)
    _variants(ours, 4)  # dynamo gives up after 2 graphs and logs its warning
    assert acceleration.recompile_limit_hits() > hits
    note = acceleration.recompile_limit_note()
    assert "recompile limit" in note and "transformer_z_image" in note and "eagerly" in note

    hits = acceleration.recompile_limit_hits()
    theirs = torch.compile(_function_in("/x/someone_elses_model.py"), backend="eager", dynamic=True, recompile_limit=2)
    _variants(theirs, 4)
    assert acceleration.recompile_limit_hits() == hits  # another model's limit is not ours to report
