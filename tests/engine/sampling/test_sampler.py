import pytest
import torch

from zimage_turbo.engine.errors import InvalidSettingError
from zimage_turbo.engine.files.model_files import DiffusersFolder
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

CPU = torch.device("cpu")


@pytest.fixture()
def pipe(tiny, fresh_engine):
    return get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32)


@pytest.fixture(scope="module")
def reference(tiny):
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(str(tiny["built"].diffusers_dir), dtype=torch.float32)


def run_reference(ref, req: GenerationRequest) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref.scheduler = FlowMatchEulerDiscreteScheduler.from_config(ref.scheduler.config, shift=req.shift)
    out = ref(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt if req.cfg > 1 else None,
        width=req.width,
        height=req.height,
        num_inference_steps=req.steps,
        guidance_scale=max(req.cfg - 1.0, 0.0),  # ComfyUI's cfg c is diffusers' guidance c - 1
        num_images_per_prompt=req.batch_size,
        generator=torch.Generator("cpu").manual_seed(req.seed),
        output_type="pt",
    ).images
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize(
    "req",
    [
        GenerationRequest("a red fox in the snow", width=64, height=48, seed=11),
        GenerationRequest("孙珍妮,旗袍,上海外滩,黄昏,胶片颗粒", width=48, height=80, seed=3, batch_size=2),
        GenerationRequest("a cat", negative_prompt="blurry, low quality", width=64, height=64, seed=5, cfg=3.0),
        GenerationRequest("Sugar面部,纯欲甜妹脸部", width=32, height=32, seed=9, steps=4, shift=2.0),
    ],
    ids=["english", "chinese-batch2", "cfg3", "4steps-shift2"],
)
def test_matches_diffusers_zimage_pipeline(pipe, reference, req):
    ours = pipe.generate(req).images
    ref = run_reference(reference, req)
    assert ours.shape == (req.batch_size, req.height, req.width, 3)
    assert ours.std() > 0.01  # a real image, not a constant
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)


def test_same_seed_same_image_other_seed_other_image(pipe):
    req = GenerationRequest("a lighthouse", width=32, height=32, seed=42)
    a = pipe.generate(req).images
    b = pipe.generate(req).images
    c = pipe.generate(GenerationRequest("a lighthouse", width=32, height=32, seed=43)).images
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("w,h", [(1000, 1024), (64, 40), (8, 64), (0, 16)])
def test_size_must_be_a_multiple_of_16(pipe, w, h):
    with pytest.raises(InvalidSettingError, match="multiple of 16"):
        pipe.generate(GenerationRequest("x", width=w, height=h))


def test_other_bad_settings(pipe):
    with pytest.raises(InvalidSettingError, match="steps"):
        pipe.generate(GenerationRequest("x", width=32, height=32, steps=0))
    with pytest.raises(InvalidSettingError, match="batch size"):
        pipe.generate(GenerationRequest("x", width=32, height=32, batch_size=0))
    with pytest.raises(InvalidSettingError, match="cfg"):
        pipe.generate(GenerationRequest("x", width=32, height=32, cfg=-1))


def test_unchanged_prompt_skips_the_text_encoder(pipe):
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = pipe.generate(GenerationRequest("a quiet harbour", width=32, height=32, seed=1))
        second = pipe.generate(GenerationRequest("a quiet harbour", width=32, height=32, seed=2))
        third = pipe.generate(GenerationRequest("a busy harbour", width=32, height=32, seed=2))
    finally:
        hook.remove()
    assert len(calls) == 2
    assert not first.report.embedding_cache_hit and second.report.embedding_cache_hit
    assert not third.report.embedding_cache_hit


def test_progress_per_step_and_interrupt_between_steps(pipe):
    seen = []
    pipe.generate(GenerationRequest("x", width=32, height=32, steps=8), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 8) for i in range(1, 9)]

    class Stop(Exception):
        pass

    checks = []

    def interrupt_at_third():
        checks.append(1)
        if len(checks) == 3:
            raise Stop()

    done = []
    with pytest.raises(Stop):
        pipe.generate(GenerationRequest("x", width=32, height=32, steps=8), on_step=lambda i, n: done.append(i),
                      check_interrupt=interrupt_at_third)
    assert done == [1, 2]  # two steps ran, the third never started
    # the pipeline is still usable afterwards
    assert pipe.generate(GenerationRequest("x", width=32, height=32)).images.shape == (1, 32, 32, 3)


def test_latent_output_decodes_to_the_image(pipe):
    res = pipe.generate(GenerationRequest("a tree", width=48, height=32, seed=4))
    assert res.latents.shape == (1, 16, 4, 6)
    with torch.no_grad():
        img = pipe.vae.decode(res.latents, return_dict=False)[0]
    torch.testing.assert_close((img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), res.images, rtol=0, atol=1e-6)


def test_long_prompt_is_truncated_and_reported(pipe):
    res = pipe.generate(GenerationRequest("word " * 2000, width=32, height=32))
    assert res.report.prompt_truncated and res.report.prompt_tokens == 512
    assert "TRUNCATED" in res.report.to_text()
