"""Bad numbers never become a black image reported as success; stacks mean one thing."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_turbo.engine.errors import InvalidSettingError, LoraKeyError, NonFiniteError
from zimage_turbo.engine.files.model_files import DiffusersFolder
from zimage_turbo.engine.lora import LoraSpec, combine_stack
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

CPU = torch.device("cpu")
REQ = GenerationRequest("a portrait, soft light", width=48, height=48, seed=21)


@pytest.fixture()
def pipe(tiny, fresh_engine):
    return get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32)


@pytest.mark.parametrize("strength", [math.nan, math.inf, -math.inf, 1e30, -25.0])
def test_unusable_strengths_are_refused_before_anything_runs(tiny, pipe, strength):
    path = tiny["loras"]["diffusers"][0]
    with pytest.raises(InvalidSettingError, match="strength"):
        pipe.generate(REQ, [LoraSpec(path, strength)])
    assert pipe.tstate.lora.current == ()  # nothing was applied


@pytest.mark.parametrize("field,value", [("shift", math.nan), ("shift", math.inf), ("shift", 0.0), ("cfg", math.nan),
                                         ("cfg", math.inf), ("cfg", -1.0)])
def test_non_finite_sampler_settings_are_refused(field, value):
    with pytest.raises(InvalidSettingError, match=field):
        GenerationRequest("x", **{field: value}).validate()


def _poisoned(tiny, tmp_path, name, value, every=False):
    """The diffusers-format tiny LoRA with its first (or every) B matrix set to `value`."""
    path, _ = tiny["loras"]["diffusers"]
    sd = load_file(str(path))
    keys = [k for k in sd if "lora_B" in k]
    for k in keys if every else keys[:1]:
        sd[k] = torch.full_like(sd[k], value)
    key = keys[0]
    out = tmp_path / name
    save_file(sd, str(out))
    return out, key


def test_lora_file_holding_nan_weights_is_refused_naming_the_tensor(tiny, tmp_path, pipe):
    bad, key = _poisoned(tiny, tmp_path, "nan_weights.safetensors", math.nan)
    with pytest.raises(LoraKeyError, match=f"NaN or infinite values .*{key}.*download it again"):
        pipe.generate(REQ, [LoraSpec(bad, 1.0)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_one_non_finite_value_anywhere_in_a_half_precision_file_is_found(tiny, tmp_path, dtype, value):
    """The reader's check is one float32 sum per tensor; a single bad element of any float type must show."""
    from zimage_turbo.engine.lora.lora_files import parse_lora

    path, _ = tiny["loras"]["diffusers"]
    sd = {k: t.to(dtype) for k, t in load_file(str(path)).items()}
    key = sorted(k for k in sd if "lora_A" in k)[-1]
    t = sd[key].clone()
    t.view(-1)[t.numel() // 2 + 1] = value
    sd[key] = t
    bad = tmp_path / "one_bad_value.safetensors"
    save_file(sd, str(bad))
    modules = _modules(tiny)
    with pytest.raises(LoraKeyError, match=f"1 tensor\\(s\\) hold NaN or infinite values \\(e.g. {key}\\)"):
        parse_lora(bad, modules)


def test_finite_values_whose_sum_overflows_are_not_taken_for_infinities(tiny, tmp_path):
    from zimage_turbo.engine.lora.lora_files import parse_lora

    path, _ = tiny["loras"]["diffusers"]
    sd = {k: t.to(torch.bfloat16) for k, t in load_file(str(path)).items()}
    key = sorted(k for k in sd if "lora_B" in k)[0]
    sd[key] = torch.full_like(sd[key], 3.0e38)  # finite in bf16; their float32 sum is not
    assert not torch.isfinite(sd[key].sum(dtype=torch.float32))
    big = tmp_path / "big_but_finite.safetensors"
    save_file(sd, str(big))
    parsed = parse_lora(big, _modules(tiny))  # read, not refused (using it is another matter: see the next test)
    assert any(t.low_rank is not None and torch.equal(t.low_rank.up, sd[key]) for t in parsed.targets.values())


def test_a_bf16_file_is_kept_in_bf16_and_applies_as_its_float32_copy(tiny, tmp_path, pipe):
    """Pairs stay in the file's precision on the host (the device converts them, exactly)."""
    from zimage_turbo.engine.lora.lora_files import parse_lora

    path, _ = tiny["loras"]["diffusers"]
    sd16 = {k: t.to(torch.bfloat16) for k, t in load_file(str(path)).items()}
    as16, as32 = tmp_path / "pair_bf16.safetensors", tmp_path / "pair_fp32.safetensors"
    save_file(sd16, str(as16))
    save_file({k: t.float() for k, t in sd16.items()}, str(as32))  # the same values, in float32
    parsed = parse_lora(as16, _modules(tiny))
    assert {t.low_rank.down.dtype for t in parsed.targets.values()} == {torch.bfloat16}
    assert torch.equal(pipe.generate(REQ, [LoraSpec(as16, 0.9)]).images, pipe.generate(REQ, [LoraSpec(as32, 0.9)]).images)


def _modules(tiny):
    from zimage_turbo.engine.lora.lora_files import linear_modules

    return linear_modules(get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32).transformer)


def test_generation_that_overflows_is_an_error_naming_the_lora_not_a_black_image(tiny, tmp_path, pipe):
    huge, _ = _poisoned(tiny, tmp_path, "huge_weights.safetensors", 1e30, every=True)  # finite in the file, overflows in use
    with pytest.raises(NonFiniteError, match="no image is returned.*huge_weights.safetensors at strength 1"):
        pipe.generate(REQ, [LoraSpec(huge, 1.0)])
    assert torch.isfinite(pipe.generate(REQ).images).all()  # the pipeline is fine afterwards


def test_a_lora_on_twice_is_refused_not_added_up(tiny, tmp_path, pipe):
    path = tiny["loras"]["kohya_fused"][0]
    with pytest.raises(InvalidSettingError, match="switched on twice.*0.8 and 0.8.*keep one row"):
        pipe.generate(REQ, [LoraSpec(path, 0.8)] * 200)
    link = tmp_path / "same_file_other_name.safetensors"
    os.symlink(path, link)
    with pytest.raises(InvalidSettingError, match="twice"):
        combine_stack([LoraSpec(path, 0.5)], [LoraSpec(link, 0.3)])
    # A switched-off duplicate is no duplicate: it is not applied at all.
    assert len(combine_stack([LoraSpec(path, 0.5)], [LoraSpec(link, 0.3, enabled=False)])) == 2


def test_same_stack_gives_the_same_bits_whatever_ran_before(tiny, pipe, fresh_engine):
    a, b, c = (tiny["loras"][f][0] for f in ("diffusers", "kohya_split", "diffsynth"))
    stack = [LoraSpec(a, 0.6), LoraSpec(b, -0.4)]
    for history in ([LoraSpec(b, 1.0)], [LoraSpec(c, 0.3), LoraSpec(b, 0.2), LoraSpec(a, 0.1)], [LoraSpec(c, 1.0)],
                    [LoraSpec(b, 0.5), LoraSpec(c, 0.5)]):
        pipe.generate(REQ, history)
    after_history = pipe.generate(REQ, list(reversed(stack))).images
    from zimage_turbo.engine.sampling import pipeline

    pipeline.release_all()
    fresh = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32)
    assert torch.equal(fresh.generate(REQ, stack).images, after_history)


def test_lora_spec_shows_no_server_path(tiny):
    path = tiny["loras"]["diffusers"][0]
    text = str((LoraSpec(path, 0.8),))
    assert path.name in text and str(path.parent) not in text


def test_stack_order_does_not_depend_on_where_the_files_sit_or_their_mtime(tiny, tmp_path, pipe):
    import hashlib
    import shutil

    from zimage_turbo.engine.files.model_files import FileId

    def adapter_name(path):  # what the cache keys a file by: path, size and mtime
        return hashlib.sha1(repr(FileId.of(path)).encode()).hexdigest()

    a, b = (tiny["loras"][f][0] for f in ("diffusers", "kohya_split"))
    here = pipe.generate(REQ, [LoraSpec(a, 0.6), LoraSpec(b, -0.4)]).images
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    copies = [folder / a.name, folder / b.name]
    for src, dst in zip((a, b), copies):
        shutil.copy(src, dst)
    # Pick mtimes for the copies that put their cache identities in the opposite order.
    for t in range(1, 200):
        os.utime(copies[0], ns=(t * 10**15, t * 10**15))
        if (adapter_name(copies[0]) < adapter_name(copies[1])) != (adapter_name(a) < adapter_name(b)):
            break
    else:
        pytest.fail("no mtime flipped the order")
    assert torch.equal(pipe.generate(REQ, [LoraSpec(copies[1], -0.4), LoraSpec(copies[0], 0.6)]).images, here)


def test_a_generation_runs_with_the_settings_it_is_given_not_the_last_callers(tiny, fresh_engine):
    src = DiffusersFolder(tiny["built"].diffusers_dir)
    mine = get_pipeline(src, CPU, torch.float32, "resident", "off")
    theirs = get_pipeline(src, CPU, torch.float32, "low_vram", "off")  # another loader of the same files
    assert mine is theirs  # one pipeline: the weights are loaded once
    assert mine.generate(REQ, memory="resident", compile_mode="off").report.memory_mode == "resident"
    assert theirs.generate(REQ, memory="low_vram").report.memory_mode == "low_vram"
    with pytest.raises(InvalidSettingError, match="memory mode"):
        mine.generate(REQ, memory="everywhere")
