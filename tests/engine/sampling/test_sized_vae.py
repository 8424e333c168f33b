"""The VAE decoder compiled for one latent shape (sized_vae.py): same image as the decoder for any size, used only
for the shape it was compiled for, and only on the compiled path."""

from __future__ import annotations

import torch

from zimage_turbo.engine.files.model_files import DiffusersFolder
from zimage_turbo.engine.sampling import acceleration
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

CPU = torch.device("cpu")


def test_compiled_for_one_shape_decodes_as_the_decoder_does(tiny, fresh_engine):
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32, "resident", "off")
    sized = pipe.sized_vae
    assert sized.supported()
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = pipe.vae.decode(z, return_dict=False)[0]
        assert not sized.usable(z)
        assert sized.compile_for(z)
        assert sized.usable(z) and not sized.usable(torch.randn(2, 16, 8, 8)) and not sized.usable(torch.randn(1, 16, 8, 16))
        got = sized.decode(z)
    torch.testing.assert_close(got.contiguous(), ref, rtol=1e-4, atol=1e-4)
    # the shared decoder keeps its layout and its weights (the copy is channels-last)
    assert all(p.is_contiguous() for p in pipe.vae.decoder.parameters())
    assert sized._copy is not pipe.vae.decoder

    # In a generation: only on the compiled path, and the probe says which decoder ran.
    req = GenerationRequest("a fox", width=64, height=64, steps=2, seed=5)
    eager = pipe.generate(req)
    assert eager.report.vae_path == "eager" and "(eager)" in eager.report.to_text()
    pipe.compile_mode = "on"
    with torch.inference_mode():
        pipe._apply_compile()
    with acceleration.compiled_calls(True), acceleration.tracing_context(), torch.inference_mode():
        image, fallback, path = pipe._decode(z)
    assert path == "compiled for this size" and not fallback
    torch.testing.assert_close(image.contiguous(), ref, rtol=1e-4, atol=1e-4)
    with acceleration.compiled_calls(True), acceleration.tracing_context(), torch.inference_mode():
        _, _, other = pipe._decode(torch.randn(1, 16, 8, 10))
    assert other == "compiled"
    with torch.inference_mode():
        pipe.compile_mode = "off"
        pipe._apply_compile()


def test_not_used_where_diffusers_would_run_more_than_the_decoder(tiny, fresh_engine):
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32, "resident", "off")
    pipe.vae.use_tiling = True
    try:
        z = torch.randn(1, 16, 8, 8)
        assert not pipe.sized_vae.supported() and not pipe.sized_vae.compile_for(z) and not pipe.sized_vae.usable(z)
    finally:
        pipe.vae.use_tiling = False
