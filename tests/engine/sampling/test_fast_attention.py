"""Our attention processor (RoPE in real arithmetic, for inductor) serves the compiled path only; eagerly the model
is exactly diffusers' own (the real-arithmetic rotation is slower there: H100 1024², 172.5 vs 154.8 ms a step)."""

import torch

from zimage_turbo.engine.files.model_files import DiffusersFolder
from zimage_turbo.engine.sampling import acceleration, fast_attention
from zimage_turbo.engine.sampling.pipeline import get_pipeline

CPU = torch.device("cpu")


def _run(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 16, 8, 6), generator=g)
    emb = torch.randn((7, pipe.transformer.config.cap_feat_dim), generator=g)
    with torch.inference_mode():
        return pipe._model(latents, torch.full((1,), 0.4), [emb])


def test_eager_calls_are_diffusers_own_and_compiled_calls_get_real_frequencies(tiny, fresh_engine, monkeypatch):
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32, "resident", "off")
    plain = _run(pipe)
    seen = []
    real_rotate = fast_attention._rotate
    monkeypatch.setattr(fast_attention, "_rotate", lambda x, f: (seen.append(f.is_complex()), real_rotate(x, f))[1])
    fast_attention.install(pipe.transformer)
    try:
        # Eager (no compiled calls on this thread): diffusers' processor with complex frequencies, bit for bit.
        assert torch.equal(_run(pipe), plain) and seen == []
        # The compiled path's arithmetic (here run uncompiled): real (cos, sin) pairs, the same rotation.
        with acceleration.compiled_calls(True):
            real = _run(pipe)
        assert seen and not any(seen)
        torch.testing.assert_close(real, plain, rtol=0, atol=1e-5)
    finally:
        fast_attention.uninstall(pipe.transformer)
    assert torch.equal(_run(pipe), plain)
