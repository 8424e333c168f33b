"""Checkpoint key names come from diffusers' single-file converters (issue 9.6), on our streaming reader's tensors."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools import original_layout
from zimage_turbo.engine.errors import ModelFileError
from zimage_turbo.engine.files import key_maps
from zimage_turbo.engine.files.model_files import SplitFiles, load_components, params_on_meta, vae_config_from_weights
from zimage_turbo.engine.model_config import TRANSFORMER_CONFIG, VAE_CONFIG

CPU = torch.device("cpu")


def split(built, transformer=None, vae=None) -> SplitFiles:
    return SplitFiles(transformer or built.transformer_file, built.text_encoder_file, vae or built.vae_file,
                      built.tokenizer_dir)


def assert_same(ours: dict, ref: dict) -> None:
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k].shape == ref[k].shape and torch.equal(ours[k], ref[k]), k


def test_our_load_equals_diffusers_converters_key_for_key(tiny, fresh_engine):
    """What the engine loads from ComfyUI's split files is exactly what diffusers' converters make of them."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        convert_z_image_transformer_checkpoint_to_diffusers,
    )

    built = tiny["built"]
    ours = load_components(split(built), CPU, torch.float32, False)
    ref_t = convert_z_image_transformer_checkpoint_to_diffusers(load_file(str(built.transformer_file)))
    assert_same(ours.transformer.module.state_dict(), ref_t)
    vae_config = ours.vae.module.config
    ref_v = convert_ldm_vae_checkpoint(load_file(str(built.vae_file)), vae_config)
    assert_same(ours.vae.module.state_dict(), ref_v)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_prefixed_transformer_files_load_the_same(tiny, tmp_path, prefix, fresh_engine):
    """diffusers strips only "model.diffusion_model."; ComfyUI also saves "diffusion_model.": both load."""
    built = tiny["built"]
    path = tmp_path / "prefixed.safetensors"
    save_file({prefix + k: v for k, v in load_file(str(built.transformer_file)).items()}, str(path))
    plain = load_components(split(built), CPU, torch.float32, False).transformer.module.state_dict()
    prefixed = load_components(split(built, transformer=path), CPU, torch.float32, False).transformer.module.state_dict()
    assert_same(prefixed, plain)


def test_a_vae_key_diffusers_would_drop_is_refused(tiny, tmp_path, fresh_engine):
    """diffusers' VAE converter leaves out keys it does not know; the loader names them instead of ignoring them."""
    built = tiny["built"]
    sd = load_file(str(built.vae_file))
    sd["decoder.conv_extra.weight"] = torch.zeros(32, 32, 1, 1)
    save_file(sd, str(tmp_path / "odd_ae.safetensors"))
    with pytest.raises(ModelFileError, match=r"1 unknown weights \(e\.g\. decoder\.conv_extra\.weight\)"):
        load_components(split(built, vae=tmp_path / "odd_ae.safetensors"), CPU, torch.float32, False)


def test_module_names_come_from_diffusers_converter():
    m = key_maps.transformer_module_to_diffusers
    assert m("layers.3.attention.qkv") == [f"layers.3.attention.to_{x}" for x in "qkv"]
    assert m("noise_refiner.0.attention.out") == ["noise_refiner.0.attention.to_out.0"]
    assert m("final_layer.adaLN_modulation.1") == ["all_final_layer.2-1.adaLN_modulation.1"]
    assert m("x_embedder") == ["all_x_embedder.2-1"]
    # Names already in diffusers form are left alone (diffusers' substring renames would rename them again).
    for name in ("all_final_layer.2-1.linear", "all_x_embedder.2-1", "layers.0.attention.to_q", "cap_embedder.1"):
        assert m(name) == [name]


def _meta_state(factory) -> dict[str, torch.Tensor]:
    with params_on_meta():
        model = factory()
    return {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}


def test_the_test_file_writer_round_trips_through_diffusers_converters(tiny):
    """devtools.original_layout (the one hand-written direction: diffusers has none) is the converters' inverse:
    at tiny size bit for bit, at the released size key for key and shape for shape."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel

    built = tiny["built"]
    diffusers_t = load_file(str(built.diffusers_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert_same(key_maps.transformer_to_diffusers(original_layout.transformer_to_original(diffusers_t)), diffusers_t)
    diffusers_v = load_file(str(built.diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    n = len(vae_config_from_weights({k: tuple(v.shape) for k, v in load_file(str(built.vae_file)).items()},
                                    "ae")["block_out_channels"])
    assert_same(key_maps.vae_to_diffusers(original_layout.vae_to_original(diffusers_v, n), n), diffusers_v)

    for factory, to_original, to_diffusers in (
        (lambda: ZImageTransformer2DModel(**TRANSFORMER_CONFIG), original_layout.transformer_to_original,
         key_maps.transformer_to_diffusers),
        (lambda: AutoencoderKL(**VAE_CONFIG), lambda sd: original_layout.vae_to_original(sd, 4),
         lambda sd: key_maps.vae_to_diffusers(sd, 4)),
    ):
        full = _meta_state(factory)
        back = to_diffusers(to_original(full))
        assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in full.items()}


@pytest.mark.parametrize("one_buffer", [False, True])
def test_the_vae_converter_keeps_exactly_the_keys_it_did_not_use(one_buffer):
    """On a GPU the reader hands out views of one device buffer: every file key the converter used
    (the 1x1-conv attention weights as sliced views too) must count as used, and only a foreign key
    comes back as itself. The first version compared ids of `._base` wrappers, which are fresh
    objects for such views: it put the true-size VAE's 8 attention weights back and refused it."""
    from diffusers import AutoencoderKL

    cfg = dict(VAE_CONFIG, block_out_channels=[32, 32, 32, 32], layers_per_block=1)
    diffusers_sd = AutoencoderKL(**cfg).state_dict()
    original = original_layout.vae_to_original(diffusers_sd, 4)
    original["decoder.not_a_vae_key.weight"] = torch.ones(3)
    if one_buffer:  # like the streaming reader's device loads: slices of one flat buffer
        flat = torch.empty(sum(t.numel() for t in original.values()))
        views, at = {}, 0
        for k, t in original.items():
            views[k] = flat[at:at + t.numel()].view(t.shape)
            views[k].copy_(t)
            at += t.numel()
        original = views
    out = key_maps.vae_to_diffusers(original, 4)
    assert sorted(set(out) - set(diffusers_sd)) == ["decoder.not_a_vae_key.weight"]
    assert set(diffusers_sd) <= set(out)
    assert out["decoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)
