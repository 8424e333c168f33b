"""Which files the loader's lists show: Z-Image parts, other models (left out, with the reason), files that cannot
be told; from the safetensors header alone, cached per file version."""

import json
import os
import pickle
import struct
import time

import pytest
import torch

from zimage_turbo.engine.files import check, part_lists
from zimage_turbo.engine.files.part_lists import FOREIGN, PART, SLOTS, UNKNOWN, slot_verdict
from zimage_turbo.engine.lora import lora_files


def header_file(path, shapes: dict, data_bytes: int | None = None, dtype: str = "BF16") -> str:
    """A safetensors file with these tensor shapes, written header first; its data is a hole (sparse, nothing
    allocated), so true-size shapes cost nothing. `data_bytes` below the header's total makes it a cut file."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + (offset if data_bytes is None else data_bytes))
    return str(path)


def verdicts(path) -> dict[str, tuple[str, str]]:
    return {slot: (v.status, v.what) for slot in SLOTS for v in [slot_verdict(path, slot)]}


@pytest.fixture(autouse=True)
def empty_cache():
    part_lists.clear_cache()
    yield
    part_lists.clear_cache()


# ------------------------------------------------------------ Z-Image's own parts


def test_the_tiny_models_parts_are_parts_of_their_own_slot_only(tiny):
    built = tiny["built"]
    for path, slot in ((built.transformer_file, "transformer"), (built.text_encoder_file, "text_encoder"),
                       (built.vae_file, "vae")):
        for other in SLOTS:
            v = slot_verdict(path, other)
            assert v.status == (PART if other == slot else FOREIGN), (path.name, other)
            assert v.listed == (other == slot) and v.is_part == (other == slot)
    v = slot_verdict(built.vae_file, "transformer")
    assert v.reason("ae.safetensors") == ("ae.safetensors is a VAE (it belongs in models/vae), not a Z-Image diffusion "
                                          "model: choose a Z-Image-Turbo diffusion model (z_image_turbo_bf16.safetensors).")
    assert "is a Z-Image diffusion model (it belongs in models/diffusion_models), not the 16-channel Flux VAE" in (
        slot_verdict(built.transformer_file, "vae").reason("x.safetensors"))
    assert slot_verdict(built.transformer_file, "transformer").reason("x") == ""


def test_true_size_parts_are_parts(tmp_path):
    """The released sizes, from shapes alone: Qwen3-4B (2560 wide, q_norm) and the Flux VAE (16 channels)."""
    qwen3_4b = header_file(tmp_path / "qwen_3_4b.safetensors", {
        "model.embed_tokens.weight": (151936, 2560), "model.layers.0.input_layernorm.weight": (2560,),
        "model.layers.0.self_attn.q_proj.weight": (4096, 2560), "model.layers.0.self_attn.q_norm.weight": (128,)})
    flux_ae = header_file(tmp_path / "ae.safetensors", {
        "encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 16, 3, 3)})
    assert slot_verdict(qwen3_4b, "text_encoder").status == PART
    assert slot_verdict(flux_ae, "vae").status == PART  # Flux's VAE *is* Z-Image's


def test_quantised_parts_are_parts(tmp_path):
    """ComfyUI's fp8 files carry extra per-layer tensors (comfy_quant, weight_scale): still parts."""
    path = header_file(tmp_path / "qwen_3_4b_fp8_mixed.safetensors", {
        "model.layers.0.input_layernorm.weight": (2560,), "model.layers.0.self_attn.q_norm.weight": (128,),
        "model.layers.0.self_attn.q_proj.weight": (4096, 2560), "model.layers.0.self_attn.q_proj.comfy_quant": (30,),
        "model.layers.0.self_attn.q_proj.weight_scale": ()}, dtype="F8_E4M3")
    assert slot_verdict(path, "text_encoder").status == PART


# ------------------------------------------------------------ other models: left out, with the reason

FOREIGN_FILES = {
    # name: (tensor shapes, what the verdict says it is)
    "flux1-dev.safetensors": ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "time_in.in_layer.weight": (3072, 256)},
                              "a Flux diffusion model"),
    "sd3.5_large.safetensors": ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (7392, 2432),
                                 "model.diffusion_model.t_embedder.mlp.0.weight": (2432, 256)},
                                "an SD3 diffusion model"),
    "sd_xl_base_1.0.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                                    "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)},
                                   "a Stable Diffusion 1.x/SDXL UNet or checkpoint"),
    "lumina_2_model_bf16.safetensors": ({"layers.0.attention.qkv.weight": (4352, 2304),
                                         "layers.0.attention.out.weight": (2304, 2304),
                                         "noise_refiner.0.attention.qkv.weight": (4352, 2304),
                                         "cap_embedder.1.weight": (2304, 2304)},
                                        "a Lumina 2 diffusion model (grouped key/value heads"),
    "wan2.1_t2v_1.3B.safetensors": ({"blocks.0.self_attn.q.weight": (1536, 1536), "head.modulation": (1, 2, 1536)},
                                    "a Wan video model"),
    "qwen_image_bf16.safetensors": ({"txt_norm.weight": (3584,), "transformer_blocks.0.img_mod.1.weight": (18432, 3072)},
                                    "a Qwen-Image diffusion model"),
    "sdxl_vae.safetensors": ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3),
                              "quant_conv.weight": (8, 8, 1, 1)}, "a 4-channel VAE (Stable Diffusion 1.x/2.x/SDXL's)"),
    "wan_2.1_vae.safetensors": ({"encoder.conv1.weight": (96, 3, 3, 3, 3), "decoder.conv1.weight": (384, 16, 3, 3, 3)},
                                "a video VAE (3-D convolutions)"),
    "clip_l.safetensors": ({"text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
                            "text_model.embeddings.token_embedding.weight": (49408, 768)}, "a CLIP text encoder"),
    "t5xxl_fp16.safetensors": ({"encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
                                "shared.weight": (32128, 4096)}, "a T5 text encoder"),
    "gemma_2_2b.safetensors": ({"model.layers.0.self_attn.q_proj.weight": (2048, 2304),
                                "model.layers.0.pre_feedforward_layernorm.weight": (2304,)}, "a Gemma text encoder"),
    "qwen_2.5_vl_7b.safetensors": ({"model.layers.0.self_attn.q_proj.weight": (3584, 3584),
                                    "model.layers.0.self_attn.q_proj.bias": (3584,),
                                    "model.layers.0.input_layernorm.weight": (3584,)},
                                   "a Llama/Qwen2-style text encoder"),
    "qwen_3_8b.safetensors": ({"model.layers.0.self_attn.q_norm.weight": (128,),
                               "model.layers.0.input_layernorm.weight": (4096,)},
                              "a Qwen3 text encoder 4096 wide (Qwen3-4B is 2560 wide)"),
}


@pytest.mark.parametrize("name", sorted(FOREIGN_FILES))
def test_other_models_are_foreign_to_every_slot_with_what_they_are(tmp_path, name):
    shapes, what = FOREIGN_FILES[name]
    path = header_file(tmp_path / name, shapes)
    for slot in SLOTS:
        v = slot_verdict(path, slot)
        assert v.status == FOREIGN and not v.listed and v.what.startswith(what), (slot, v)
        reason = v.reason(name)
        assert reason.startswith(f"{name} is {what}") and "choose " in reason
        assert str(tmp_path) not in reason  # names the file as given, never where it is


def test_what_each_slot_asks_for_is_named(tmp_path):
    path = header_file(tmp_path / "clip_l.safetensors", FOREIGN_FILES["clip_l.safetensors"][0])
    assert "not the Qwen3-4B text encoder Z-Image uses: choose qwen_3_4b.safetensors" in (
        slot_verdict(path, "text_encoder").reason("clip_l.safetensors"))
    assert "not the 16-channel Flux VAE Z-Image uses: choose ae.safetensors." in slot_verdict(path, "vae").reason("c")
    assert "not a Z-Image diffusion model" in slot_verdict(path, "transformer").reason("c")


def test_a_lora_in_a_model_folder_is_foreign_to_every_slot(tiny):
    for fmt, (path, _) in tiny["loras"].items():
        for slot in SLOTS:
            v = slot_verdict(path, slot)
            assert v.status == FOREIGN and v.what.startswith("a LoRA (it belongs in models/loras"), (fmt, slot)
    assert slot_verdict(tiny["foreign_lora"], "transformer").what.startswith("a LoRA")


# ------------------------------------------------------------ files the header cannot tell: listed, never opened


class Boobytrap:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_corrupt_and_odd_files_cannot_be_told_and_are_never_unpickled(tiny, tmp_path):
    marker = tmp_path / "unpickled.txt"
    odd = {}
    for suffix in (".ckpt", ".pt", ".pth", ".bin", ".safetensors"):  # the last: a pickle under a safetensors name
        path = tmp_path / f"trap{suffix}"
        path.write_bytes(pickle.dumps(Boobytrap(str(marker))))
        odd[path.name] = path
    torch.save({"w": torch.zeros(2)}, tmp_path / "zipped.safetensors")  # torch's zip format
    odd["zipped"] = tmp_path / "zipped.safetensors"
    cut = tmp_path / "cut_download.safetensors"
    cut.write_bytes(tiny["built"].transformer_file.read_bytes()[:-100])  # header whole, data cut short
    odd["cut"] = cut
    odd["half header"] = tmp_path / "half_header.safetensors"
    odd["half header"].write_bytes(tiny["built"].transformer_file.read_bytes()[:300])
    odd["empty"] = tmp_path / "empty.safetensors"
    odd["empty"].write_bytes(b"")
    odd["no tensors"] = tmp_path / "no_tensors.safetensors"
    header_file(odd["no tensors"], {})
    odd["huge header length"] = tmp_path / "huge.safetensors"
    odd["huge header length"].write_bytes(struct.pack("<Q", 2**62) + b"{}")
    odd["not json"] = tmp_path / "noise.safetensors"
    odd["not json"].write_bytes(struct.pack("<Q", 8) + b"\xff\xfe{{[[\x00\x01" + bytes(64))
    odd["a list"] = tmp_path / "list.safetensors"
    odd["a list"].write_bytes(struct.pack("<Q", 2) + b"[]")
    odd["bad shape"] = tmp_path / "bad_shape.safetensors"
    bad = json.dumps({"decoder.conv_in.weight": {"dtype": "F16", "shape": "big", "data_offsets": [0, 0]},
                      "encoder.conv_in.weight": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}).encode()
    odd["bad shape"].write_bytes(struct.pack("<Q", len(bad)) + bad + bytes(2))
    odd["unknown layout"] = tmp_path / "mystery.safetensors"
    header_file(odd["unknown layout"], {"foo.bar": (2,)})
    odd["sd3 vae"] = tmp_path / "sd3_vae.safetensors"  # the very shapes of Flux's VAE: no header can tell
    header_file(odd["sd3 vae"], {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 16, 3, 3)})
    odd["missing"] = tmp_path / "missing.safetensors"
    odd["a folder"] = tmp_path / "folder.safetensors"
    odd["a folder"].mkdir()
    odd["a fifo"] = tmp_path / "fifo.safetensors"  # opening it for reading would wait forever
    os.mkfifo(odd["a fifo"])
    for what, path in odd.items():
        for slot in SLOTS:
            v = slot_verdict(path, slot)
            if what == "sd3 vae" and slot == "vae":
                assert v.status == PART  # listed first, like Flux's own: see part_lists' docstring
            elif what == "sd3 vae":
                assert v.status == FOREIGN
            else:
                assert v.status == UNKNOWN and v.listed and v.reason("x") == "", (what, slot, v)
    assert not marker.exists()


def test_pickle_suffixes_are_not_even_opened(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04anything")
    monkeypatch.setattr(part_lists, "_header_shapes", lambda *a: pytest.fail("a pickle file was opened"))
    assert slot_verdict(path, "transformer").status == UNKNOWN


def test_an_unknown_slot_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="unknown loader slot"):
        slot_verdict(tmp_path / "x.safetensors", "lora")


# ------------------------------------------------------------ the cache, and the cost of a big folder


def count_reads(monkeypatch) -> list:
    reads, real = [], part_lists._header_shapes
    monkeypatch.setattr(part_lists, "_header_shapes", lambda path, size: reads.append(path) or real(path, size))
    return reads


def test_the_header_is_read_once_per_file_version_for_all_three_slots(tmp_path, monkeypatch):
    reads = count_reads(monkeypatch)
    path = header_file(tmp_path / "flux1-dev.safetensors", FOREIGN_FILES["flux1-dev.safetensors"][0])
    first = [slot_verdict(path, slot) for slot in SLOTS]
    assert [slot_verdict(path, slot) for slot in SLOTS] == first
    assert len(reads) == 1
    # Replaced under the same name (new size and modification time): read again, and the new verdict counts.
    header_file(path, {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 16, 3, 3)})
    later = time.time_ns() + 10**9
    os.utime(path, ns=(later, later))
    assert slot_verdict(path, "vae").status == PART
    assert len(reads) == 2


def test_a_big_folder_is_read_once_from_the_header_only(tmp_path, monkeypatch):
    """300 files of 600 tensors (a transformer file has several hundred): the first listing reads each header once, a second
    one reads nothing."""
    reads = count_reads(monkeypatch)
    shapes = {f"layers.{b}.attention.qkv.weight": (3 * 2, 2) for b in range(300)}
    shapes |= {f"noise_refiner.{b}.feed_forward.w1.weight": (4, 2) for b in range(300)}
    paths = [header_file(tmp_path / f"model_{i:03d}.safetensors", shapes) for i in range(300)]
    started = time.perf_counter()
    first = [slot_verdict(p, "transformer").status for p in paths]
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    assert [slot_verdict(p, "transformer").status for p in paths] == first
    again_s = time.perf_counter() - started
    assert first == [PART] * 300 and len(reads) == 300
    assert first_s < 20 and again_s < 1, (first_s, again_s)  # measured on a 2-core box: 0.5-0.8 s and 3-4 ms


def test_the_adapter_prefilter_misses_no_adapter_key():
    """check._classify skips its key-by-key LoRA test when no name holds these fragments: every suffix and marker
    the LoRA reader knows must hold one."""
    for suffix, _ in lora_files._SUFFIXES:
        assert check._MAYBE_ADAPTER_KEY.search(f"layers.0.attention.to_q{suffix}"), suffix
    for marker in lora_files._UNSUPPORTED:
        assert check._MAYBE_ADAPTER_KEY.search(f"layers.0.attention.to_q.{marker}"), marker
