import os
import shutil

import pytest
import torch

from zimage_turbo.engine.errors import InvalidSettingError, ModelFileError
from zimage_turbo.engine.files.model_files import COMPONENTS, DiffusersFolder, SplitFiles, load_components, resolve_device, resolve_dtype

CPU = torch.device("cpu")


def split_source(built):
    return SplitFiles(built.transformer_file, built.text_encoder_file, built.vae_file, built.tokenizer_dir)


def test_both_layouts_load_identical_weights(tiny, fresh_engine):
    built = tiny["built"]
    a = load_components(DiffusersFolder(built.diffusers_dir), CPU, torch.float32, False)
    b = load_components(split_source(built), CPU, torch.float32, False)
    for part in ("transformer", "text_encoder", "vae"):
        sa, sb = getattr(a, part).module.state_dict(), getattr(b, part).module.state_dict()
        assert sa.keys() == sb.keys(), part
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part


def test_every_part_is_read_before_the_model_classes_are_needed(tiny, fresh_engine, monkeypatch):
    """The reading overlaps the head start's import of the model classes: all three parts are read, then
    `classes_ready` is called (where the import is waited for), then the modules are built."""
    from zimage_turbo.engine.files import model_files, quantized

    events = []
    read = quantized.load_dequantized
    monkeypatch.setattr(quantized, "load_dequantized", lambda *a, **k: (events.append("read"), read(*a, **k))[1])
    for name in ("_build_transformer", "_build_text_encoder", "_build_vae"):
        build = getattr(model_files, name)
        monkeypatch.setattr(model_files, name, lambda *a, _b=build, _n=name, **k: (events.append(_n), _b(*a, **k))[1])
    comps = load_components(split_source(tiny["built"]), CPU, torch.float32, False,
                            classes_ready=lambda: events.append("classes"))
    assert events == ["read", "read", "read", "classes", "_build_transformer", "_build_text_encoder", "_build_vae"]
    # The load times still include the reading.
    assert all(getattr(comps, p).load_seconds > 0 for p in ("transformer", "text_encoder", "vae"))
    assert set(comps.fresh_loads) == {"transformer", "text_encoder", "vae"}
    # All cached: nothing is read again, and the classes are still asked for (they are imported already).
    events.clear()
    load_components(split_source(tiny["built"]), CPU, torch.float32, False, classes_ready=lambda: events.append("classes"))
    assert events == ["classes"]


def test_both_layouts_generate_the_same_image(tiny, fresh_engine):
    """Same weights is not enough: settings that are not in the weights (norm groups, rope) must agree too."""
    from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

    built = tiny["built"]
    req = GenerationRequest("灯塔, a lighthouse at dawn", width=48, height=32, seed=5)
    a = get_pipeline(DiffusersFolder(built.diffusers_dir), CPU, torch.float32).generate(req).images
    b = get_pipeline(split_source(built), CPU, torch.float32).generate(req).images
    assert torch.equal(a, b)


def test_split_file_names_match_diffusers_single_file_converters(tiny, fresh_engine):
    """An independent check of our key mapping: diffusers' own converters read our split files the same way."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel

    built = tiny["built"]
    ours = load_components(split_source(built), CPU, torch.float32, False)
    ref_t = ZImageTransformer2DModel.from_single_file(str(built.transformer_file), config=str(built.diffusers_dir),
                                                      subfolder="transformer", torch_dtype=torch.float32)
    ref_v = AutoencoderKL.from_single_file(str(built.vae_file), config=str(built.diffusers_dir), subfolder="vae",
                                           torch_dtype=torch.float32)
    for ref, mine in ((ref_t, ours.transformer.module), (ref_v, ours.vae.module)):
        sr, sm = ref.state_dict(), mine.state_dict()
        assert sr.keys() == sm.keys()
        assert all(torch.equal(sr[k], sm[k]) for k in sr)


def test_real_axes_lens_is_used(tiny, fresh_engine):
    comps = load_components(split_source(tiny["built"]), CPU, torch.float32, False)
    assert list(comps.transformer.module.config.axes_lens) == [1536, 512, 512]


def test_text_encoder_skips_last_layer_but_gives_hidden_states_minus_two(tiny, fresh_engine):
    from transformers import Qwen3Model

    built = tiny["built"]
    comps = load_components(DiffusersFolder(built.diffusers_dir), CPU, torch.float32, False)
    full = Qwen3Model.from_pretrained(str(built.diffusers_dir / "text_encoder"), torch_dtype=torch.float32)
    assert len(comps.text_encoder.module.layers) == len(full.layers) - 1
    ids = torch.tensor([[1, 5, 9, 300, 2]])
    with torch.no_grad():
        ref = full(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        ours = comps.text_encoder.module(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_cache_hit_and_reload_only_what_changed(tiny, tmp_path, fresh_engine):
    built = tiny["built"]
    vae_copy = tmp_path / "ae_copy.safetensors"
    shutil.copy(built.vae_file, vae_copy)
    src = SplitFiles(built.transformer_file, built.text_encoder_file, vae_copy, built.tokenizer_dir)
    first = load_components(src, CPU, torch.float32, False)
    assert set(first.fresh_loads) == {"transformer", "text_encoder", "vae"}
    again = load_components(src, CPU, torch.float32, False)
    assert again.fresh_loads == {} and again.transformer.module is first.transformer.module
    os.utime(vae_copy, ns=(0, os.stat(vae_copy).st_mtime_ns + 10**9))  # "a new file" with the same name
    touched = load_components(src, CPU, torch.float32, False)
    assert set(touched.fresh_loads) == {"vae"}
    assert touched.transformer.module is first.transformer.module
    bf16 = load_components(src, CPU, torch.bfloat16, False)
    assert set(bf16.fresh_loads) == {"transformer", "text_encoder", "vae"}
    assert next(bf16.transformer.module.parameters()).dtype == torch.bfloat16
    assert COMPONENTS.loads >= 7


def test_diffusers_folder_missing_weights_is_named(tiny, tmp_path, fresh_engine):
    folder = tmp_path / "broken"
    shutil.copytree(tiny["built"].diffusers_dir, folder)
    for f in (folder / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelFileError, match="no .safetensors weights found for the transformer"):
        load_components(DiffusersFolder(folder), CPU, torch.float32, False)


def test_diffusers_folder_with_only_pickle_weights_is_refused(tiny, tmp_path, fresh_engine):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny["built"].diffusers_dir, folder)
    for f in (folder / "vae").glob("*.safetensors"):
        f.unlink()
    torch.save({"x": torch.zeros(1)}, folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFileError, match="pickle"):
        load_components(DiffusersFolder(folder), CPU, torch.float32, False)


def test_wrong_file_in_a_slot_is_explained(tiny, fresh_engine):
    built = tiny["built"]
    src = SplitFiles(built.vae_file, built.text_encoder_file, built.vae_file, built.tokenizer_dir)
    with pytest.raises(ModelFileError, match="not a Z-Image diffusion model"):
        load_components(src, CPU, torch.float32, False)
    src = SplitFiles(built.transformer_file, built.vae_file, built.vae_file, built.tokenizer_dir)
    with pytest.raises(ModelFileError, match="not a Qwen3 text encoder"):
        load_components(src, CPU, torch.float32, False)


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == CPU
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        assert resolve_dtype("auto", CPU) == torch.bfloat16
        with pytest.raises(InvalidSettingError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    with pytest.raises(InvalidSettingError, match="unknown device"):
        resolve_device("tpu:0")
    with pytest.raises(InvalidSettingError, match="unknown dtype"):
        resolve_dtype("int4", CPU)
    assert resolve_dtype("fp16", CPU) == torch.float16
