"""Every Z-Image LoRA layout in the wild, each written as a real file and checked against a hand merge.

For each layout devtools/lora_formats.py writes a random file on the tiny model; the engine reads it
and merges it; the expected weights are W0 (read from the tiny model's own safetensors file) plus
strength x the delta computed here by hand from the tensors the file holds, with LyCORIS's scale
rules written out (no engine code involved).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools import lora_formats
from devtools.lora_formats import DENSE_LAYOUTS, LAYOUTS, Written
from devtools.model_builder import TINY
from zimage_turbo.engine.errors import LoraKeyError
from zimage_turbo.engine.files.model_files import DiffusersFolder
from zimage_turbo.engine.lora import LoraManager, LoraSpec
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

CPU = torch.device("cpu")
REQ = GenerationRequest("a portrait, soft light", width=48, height=48, seed=21)
RANK = {name: 2 if name.startswith("lokr") else 4 for name in LAYOUTS}  # rank 2: PEFT's LoKr split rule on the tiny sizes
STRENGTH = 0.8


# ------------------------------------------------------------------ by hand


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product written out: out[i*p + k, j*q + l] = a[i, j] * b[k, l]."""
    (m, n), (p, q) = a.shape, b.shape
    return torch.einsum("ij,kl->ikjl", a, b).reshape(m * p, n * q)


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS: einsum('i j k l, j r, i p -> p r k l', core, b, a) on a 1x1 core."""
    return torch.einsum("ijkl,jr,ip->prkl", core, b, a)[:, :, 0, 0]


def hand_delta(w: Written) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dW, db) at strength 1, in float64, from what the file holds for one layer."""
    t = {k: v.double() for k, v in w.tensors.items()}
    dw = None
    if w.kind == "lora":
        r = t["down"].shape[0]
        alpha = w.alpha if w.alpha is not None else w.metadata_alpha
        dw = t["up"] @ t["down"] * ((alpha / r) if alpha is not None else 1.0)
    elif w.kind == "lokr":
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_t2" in t:
            w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        # LyCORIS: alpha / rank only when a factor is split, the rank of w2's split first.
        rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
        scale = w.alpha / rank if (w.alpha is not None and rank is not None) else 1.0
        dw = kron(w1, w2) * scale
    elif w.kind == "loha":
        if "hada_t1" in t:
            m1 = tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            m2 = tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            m1, m2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        dw = m1 * m2 * (w.alpha / t["hada_w1_b"].shape[0])
    elif "diff" in t:
        dw = t["diff"]
    if dw is not None and w.rows is not None:
        dw = dw[w.rows[0]:w.rows[1]]
    return dw, (w.bias.double() if w.bias is not None else None)


def hand_merged_state(tiny, built_loras) -> dict[str, torch.Tensor]:
    """The tiny transformer's weights with each (file, strength) merged by hand, in float64."""
    sd = {k: v.double() for k, v in load_file(str(tiny["built"].diffusers_dir / "transformer" /
                                                 "diffusion_pytorch_model.safetensors")).items()}
    for built, strength in built_loras:
        for module, w in built.layers.items():
            dw, db = hand_delta(w)
            if dw is not None:
                sd[f"{module}.weight"] = sd[f"{module}.weight"] + strength * dw
            if db is not None:
                sd[f"{module}.bias"] = sd[f"{module}.bias"] + strength * db
    return sd


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_layouts")
    return {name: lora_formats.build_lora(root / f"{name}.safetensors", TINY.transformer, name, rank=RANK[name],
                                          alpha=3.0 if name != "diffusers" else 8.0, seed=100 + i)
            for i, name in enumerate(LAYOUTS)}


@pytest.fixture(scope="module")
def transformer(tiny):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel.from_pretrained(str(tiny["built"].diffusers_dir / "transformer")).eval()


@pytest.fixture()
def manager(transformer):
    mgr = LoraManager(transformer)
    mgr.mode = "merge"
    yield mgr
    mgr.remove_all()


def model_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_merges_to_the_hand_merged_weights(files, tiny, transformer, manager, layout):
    built = files[layout]
    before = model_state(transformer)
    report = manager.apply([LoraSpec(built.path, STRENGTH)])
    assert report.path == "merged" and report.active[0]["layers"] == len(built.layers)
    want = hand_merged_state(tiny, [(built, STRENGTH)])
    got = model_state(transformer)
    changed = [k for k in got if not torch.equal(got[k], before[k])]
    assert sorted(changed) == sorted(k for k in want if not torch.equal(want[k], before[k].double())), \
        "the engine changed other weights than the file names"
    assert changed
    for k in changed:
        torch.testing.assert_close(got[k].double(), want[k], rtol=0, atol=2e-6, msg=k)
    manager.apply([])
    assert all(torch.equal(v, before[k]) for k, v in model_state(transformer).items())  # restored bit for bit


def test_two_kinds_stacked_equal_both_merged_by_hand(files, tiny, transformer, manager):
    a, b, c = files["lokr_factored"], files["loha"], files["kohya_fused"]
    manager.apply([LoraSpec(a.path, 0.6), LoraSpec(b.path, -0.5), LoraSpec(c.path, 1.1)])
    want = hand_merged_state(tiny, [(a, 0.6), (b, -0.5), (c, 1.1)])
    got = model_state(transformer)
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v, rtol=0, atol=4e-6, msg=k)


@pytest.mark.parametrize("layout", ["lokr_w2_factored", "loha_tucker", "diff", "comfy_distill_patch"])
def test_images_equal_a_model_merged_by_hand(files, tiny, tmp_path, fresh_engine, layout):
    folder = tmp_path / "merged"
    shutil.copytree(tiny["built"].diffusers_dir, folder)
    wfile = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.float() for k, v in hand_merged_state(tiny, [(files[layout], STRENGTH)]).items()}, str(wfile))
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32)
    base = pipe.generate(REQ).images
    ours = pipe.generate(REQ, [LoraSpec(files[layout].path, STRENGTH)])
    assert ours.report.lora_path == "merged"
    by_hand = get_pipeline(DiffusersFolder(folder), CPU, torch.float32).generate(REQ).images
    assert (ours.images - base).abs().max() > 1e-2  # the file really changes the image
    torch.testing.assert_close(ours.images, by_hand, rtol=0, atol=2e-5)


@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
def test_whole_matrix_formats_are_refused_on_the_adapter_path_before_anything_changes(files, transformer, layout):
    mgr = LoraManager(transformer)
    mgr.mode = "adapters"
    before = model_state(transformer)
    with pytest.raises(LoraKeyError, match="runs only merged into the weights.*ZIMAGE_TURBO_LORA_MODE=adapters.*"
                                           "Nothing was applied"):
        mgr.apply([LoraSpec(files["kohya_split"].path, 0.5), LoraSpec(files[layout].path, 0.5)])
    assert mgr.path == "" and not mgr.slot_files
    assert all(torch.equal(v, before[k]) for k, v in model_state(transformer).items())
    mgr.set_allow_merge(False)
    mgr.mode = "auto"
    with pytest.raises(LoraKeyError, match="low_vram.*choose the memory mode resident or offload_text_encoder"):
        mgr.apply([LoraSpec(files[layout].path, 0.5)])
    mgr.remove_all()


# ------------------------------------------------------------------ bad files: refused whole, named


def write(tmp_path, name, tensors):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


BAD = {
    "lokr without w2": ({"diffusion_model.layers.0.attention.to_q.lokr_w1": torch.ones(8, 8)},
                        r"layer diffusion_model.layers.0.attention.to_q lacks lokr_w2_a, lokr_w2_b .*incomplete or broken"),
    "lokr for a bigger model": ({"diffusion_model.layers.0.attention.to_q.lokr_w1": torch.ones(8, 8),
                                 "diffusion_model.layers.0.attention.to_q.lokr_w2": torch.ones(12, 12)},
                                r"layers.0.attention.to_q is 64->64 in this model but the LoRA has 96->96: .*different model size"),
    "loha with one tucker core": ({f"lycoris_layers_0_attention_to_q.{k}": v for k, v in {
        "hada_w1_a": torch.ones(2, 64), "hada_w1_b": torch.ones(2, 64), "hada_w2_a": torch.ones(2, 64),
        "hada_w2_b": torch.ones(2, 64), "hada_t1": torch.ones(2, 2, 1, 1)}.items()}, "only one of hada_t1 / hada_t2"),
    "convolution tucker core": ({f"lycoris_layers_0_attention_to_q.{k}": v for k, v in {
        "lokr_w1": torch.ones(8, 8), "lokr_w2_a": torch.ones(2, 8), "lokr_w2_b": torch.ones(2, 8),
        "lokr_t2": torch.ones(2, 2, 3, 3)}.items()}, r"convolution kernel; Z-Image's layers are Linear"),
    "bias diff on a layer without bias": ({"diffusion_model.layers.0.attention.out.diff_b": torch.ones(64)},
                                          "changes the bias of layers.0.attention.to_out.0, a layer without a bias"),
    "two kinds in one layer": ({"diffusion_model.layers.0.attention.out.diff": torch.ones(64, 64),
                                "diffusion_model.layers.0.attention.out.lora_down.weight": torch.ones(2, 64),
                                "diffusion_model.layers.0.attention.out.lora_up.weight": torch.ones(64, 2)},
                               "layer diffusion_model.layers.0.attention.out holds parts of full-weight diff and LoRA at once"),
    "half a pair": ({"transformer.layers.0.attention.to_q.lora_A.weight": torch.ones(4, 64)}, "has only the down/A half"),
    "text encoder keys": ({"transformer.layers.0.attention.to_q.lora_A.weight": torch.ones(4, 64),
                           "transformer.layers.0.attention.to_q.lora_B.weight": torch.ones(64, 4),
                           "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(4, 32),
                           "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(32, 4)},
                          "2 of 4 keys fit no layer.* 2 of them change a text encoder, which this pack does not patch"),
    "one alpha of many values": ({"diffusion_model.layers.0.attention.out.lora_down.weight": torch.ones(2, 64),
                                  "diffusion_model.layers.0.attention.out.lora_up.weight": torch.ones(64, 2),
                                  "diffusion_model.layers.0.attention.out.alpha": torch.ones(2)},
                                 "holds 2 values; an alpha is one number"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_files_are_refused_whole_with_the_layer_named(tmp_path, transformer, case):
    tensors, message = BAD[case]
    manager = LoraManager(transformer)
    manager.mode = "merge"
    good = lora_formats.build_lora(tmp_path / "good.safetensors", TINY.transformer, "kohya_split", seed=5)
    before = model_state(transformer)
    with pytest.raises(LoraKeyError, match=message):
        manager.apply([LoraSpec(good.path, 1.0), LoraSpec(write(tmp_path, "bad", tensors), 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in model_state(transformer).items())  # not even the good file


def test_a_layer_named_twice_with_different_values_is_refused_and_with_equal_values_read_once(files, tmp_path, manager):
    sd = load_file(str(files["dot_names"].path))
    key = "diffusion_model.layers.0.attention.qkv.lora.up.weight"
    manager.apply([LoraSpec(files["dot_names"].path, 1.0)])  # the redundant copies are equal: read once
    sd[key] = sd[key] * 1.5
    with pytest.raises(LoraKeyError, match=r"layers.0.attention.to_[qkv] is changed twice with different values \(by "
                                           r"diffusion_model.layers.0.attention.qkv and "
                                           r"diffusion_model.layers.0.attention.to.[qkv]\)"):
        manager.apply([LoraSpec(write(tmp_path, "contradicts", sd), 1.0)])


# ------------------------------------------------------------------ on a GPU (pytest -m gpu)

CUDA = torch.cuda.is_available()


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", DENSE_LAYOUTS + ("kohya_fused", "comfy_distill_patch"))
def test_merged_in_bf16_equals_the_hand_merge(tmp_path, layout, device):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**TINY.transformer).to(device, torch.bfloat16).eval()
    before = model_state(model)
    built = lora_formats.build_lora(tmp_path / f"{layout}.safetensors", TINY.transformer, layout, rank=RANK[layout],
                                    alpha=3.0, seed=500)
    manager = LoraManager(model)
    manager.mode = "merge"
    assert manager.apply([LoraSpec(built.path, STRENGTH)]).path == "merged"
    got = model_state(model)
    for module, w in built.layers.items():
        dw, db = hand_delta(w)
        for suffix, delta in ((".weight", dw), (".bias", db)):
            if delta is None:
                continue
            want = before[module + suffix].double() + STRENGTH * delta.to(device)
            if w.kind == "lora" and suffix == ".weight":
                # Low-rank pairs are merged by one bf16 GEMM from bf16 factors (scale and strength folded into the
                # up factor): a few bf16 steps of the delta on top of the final rounding.
                atol = 2 ** -6 * float(delta.abs().max())
            else:
                atol = 1e-6  # whole-matrix deltas are summed in fp32 and rounded once: within half a bf16 step
            torch.testing.assert_close(got[module + suffix].double(), want, rtol=2 ** -8, atol=atol, msg=module)
    manager.apply([])
    assert all(torch.equal(v, before[k]) for k, v in model_state(model).items())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_true_size_lokr_and_lora_switches_on_the_gpu(tmp_path):
    """Figures for the README: a LoKr on every block linear of the released transformer, merged and switched."""
    import time

    from diffusers import ZImageTransformer2DModel
    from zimage_turbo.engine.files.model_files import params_on_meta
    from zimage_turbo.engine.model_config import TRANSFORMER_CONFIG

    with params_on_meta():
        model = ZImageTransformer2DModel(**TRANSFORMER_CONFIG)
    model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    lokr = lora_formats.build_lora(tmp_path / "lokr.safetensors", TRANSFORMER_CONFIG, "lokr_w2_factored", rank=16,
                                   alpha=16.0, refiners=True, seed=1, dtype=torch.bfloat16)
    lora = lora_formats.build_lora(tmp_path / "lora.safetensors", TRANSFORMER_CONFIG, "comfy_distill_patch", rank=32, seed=2)
    snapshot = {k: v.detach().clone() for k, v in list(model.state_dict().items())[:40]}
    manager = LoraManager(model)
    manager.mode = "merge"

    def timed(stack):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        report = manager.apply(stack)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, report

    figures = {
        "lokr first (read, spare copies, merge)": timed([LoraSpec(lokr.path, 1.0)]),
        "lokr strength change": timed([LoraSpec(lokr.path, 0.6)]),
        "switch to the distill-patch LoRA (file read)": timed([LoraSpec(lora.path, 1.0)]),
        "back to the lokr (cached)": timed([LoraSpec(lokr.path, 0.6)]),
        "both": timed([LoraSpec(lokr.path, 0.6), LoraSpec(lora.path, 1.0)]),
        "all off": timed([]),
    }
    for what, (seconds, report) in figures.items():
        print(f"{torch.cuda.get_device_name()}: {what}: {seconds * 1000:.0f} ms ({report.path or 'none'})")
    assert all(r.path == "merged" for _, r in list(figures.values())[:-1])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshot.items())  # restored bit for bit
