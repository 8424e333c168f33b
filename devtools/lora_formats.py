"""Random LoRA files for a Z-Image transformer in every layout found in the wild, for tests.

Each layout writes real .safetensors files with the key names, prefixes, adapter kinds, alphas and
dtypes that tool writes, and returns what it wrote per model layer (`Written`: the raw tensors and
the alpha, in the layout's own terms) so a test can compute the expected weight change by hand,
independently of the engine.

Layouts (LAYOUTS): low-rank
  diffusers            transformer.<diffusers name>.lora_A/lora_B.weight (peft; optional
                       lora_adapter_metadata with lora_alpha, as diffusers' save_lora_weights writes)
  kohya_fused          diffusion_model.<original name>.lora_down/lora_up.weight + .alpha, fused attention.qkv
  kohya_split          same with split to_q/to_k/to_v and attention.out
  kohya_underscore     lora_unet_<original name, underscored> (fused qkv) + alpha
  kohya_underscore_split   lora_unet_<diffusers name, underscored> + alpha (musubi-tuner / sd-scripts style)
  onetrainer           lora_transformer_<diffusers name, underscored> + alpha
  lycoris_lora         lycoris_<diffusers name, underscored>.lora_down/up + alpha (SimpleTuner / LyCORIS)
  diffsynth            <diffusers name>.lora_A.default.weight (DiffSynth-Studio / ModelScope, bare keys)
  diffsynth_plain      <diffusers name>.lora_A.weight
  ai_toolkit           diffusion_model.<diffusers name>.lora_A/lora_B.weight (ostris ai-toolkit)
  comfy_distill_patch  diffusion_model.<diffusers name>.lora_A/B.default.weight, bf16, no alpha, no
                       metadata, attention q/k/v/out and w1/w2/w3 of every block, refiners included: the
                       layout of Comfy-Org's z_image_turbo_distill_patch_lora_bf16.safetensors (a repackage
                       of DiffSynth-Studio/Z-Image-Turbo-DistillPatch; at true size and rank 32 this layout
                       is exactly the published 158,826,336 bytes)
  dot_names            diffusion_model.layers.0.attention.to.q.lora.down.weight ... (no alpha), with the
                       redundant fused qkv and bare `out` copies some trainers add (Anime-Z style, as
                       diffusers' converter describes it)
LyCORIS and full-weight layouts (non-low-rank):
  lokr_full            diffusion_model.<diffusers name>.lokr_w1 + lokr_w2 (+ alpha, unused: nothing is split)
  lokr_w2_factored     lokr_w1 + lokr_w2_a/_b + alpha (ai-toolkit's usual LoKr)
  lokr_factored        lokr_w1_a/_b + lokr_w2_a/_b + alpha
  lokr_uneven_ranks    the same with w1 split at rank + 1 (alpha / rank then uses w2's rank)
  lokr_no_alpha        lokr_w1 + lokr_w2_a/_b without alpha
  lokr_tucker          lycoris_<name>: lokr_w1 + lokr_w2_a/_b + lokr_t2 (1x1 core) + alpha
  lokr_fused_qkv       lora_unet_<original name>: LoKr over the fused attention.qkv
  loha                 lycoris_<name>.hada_w1_a/_b, hada_w2_a/_b + alpha
  loha_tucker          + hada_t1/hada_t2 (1x1 cores)
  diff                 diffusion_model.<original name>.diff (fused qkv included) + .diff_b for the layers
                       with a bias (each main block's adaLN_modulation.0, final_layer.linear)
  lora_with_diff_b     kohya_split LoRA pairs plus .diff_b on the biased adaLN layers
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

_ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
_FFN = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")

LOW_RANK_LAYOUTS = ("diffusers", "kohya_fused", "kohya_split", "kohya_underscore", "kohya_underscore_split",
                    "onetrainer", "lycoris_lora", "diffsynth", "diffsynth_plain", "ai_toolkit", "comfy_distill_patch",
                    "dot_names")
DENSE_LAYOUTS = ("lokr_full", "lokr_w2_factored", "lokr_factored", "lokr_uneven_ranks", "lokr_no_alpha", "lokr_tucker",
                 "lokr_fused_qkv",
                 "loha", "loha_tucker", "diff", "lora_with_diff_b")
LAYOUTS = LOW_RANK_LAYOUTS + DENSE_LAYOUTS
# The published Comfy-Org distill patch (Hugging Face LFS pointer of split_files/loras/...).
DISTILL_PATCH_BYTES = 158_826_336
DISTILL_PATCH_RANK = 32


@dataclass
class Written:
    """What a file holds for one layer of the model, in the file's own terms.

    kind: lora / lokr / loha / diff. tensors: the file's tensors of that layer by role (down, up,
    lokr_w1, hada_w1_a, diff, ...). alpha: the stored alpha or None. rows: for a fused qkv layer, the
    rows of the file's delta that belong to this layer. bias: a diff_b for this layer. scale_hint:
    an alpha that only the file's metadata carries (diffusers' lora_adapter_metadata).
    """

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None
    rows: tuple[int, int] | None = None
    bias: torch.Tensor | None = None
    metadata_alpha: float | None = None


@dataclass
class BuiltLora:
    path: Path
    layout: str
    layers: dict[str, Written]  # diffusers module -> what the file holds for it
    keys: list[str]


def _hidden(cfg: dict) -> int:
    return int(cfg["dim"] / 3 * 8)


def module_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of the block Linears LoRAs target."""
    dim, hidden = cfg["dim"], _hidden(cfg)
    return {"attention.to_q": (dim, dim), "attention.to_k": (dim, dim), "attention.to_v": (dim, dim),
            "attention.to_out.0": (dim, dim), "feed_forward.w1": (dim, hidden), "feed_forward.w3": (dim, hidden),
            "feed_forward.w2": (hidden, dim)}


def block_modules(cfg: dict, refiners: bool = False, ffn: bool = True) -> list[str]:
    groups = [("layers", cfg["n_layers"])]
    if refiners:
        groups += [("noise_refiner", cfg["n_refiner_layers"]), ("context_refiner", cfg["n_refiner_layers"])]
    kinds = _ATTN + (_FFN if ffn else ())
    return [f"{g}.{i}.{k}" for g, n in groups for i in range(n) for k in kinds]


def original_name(module: str) -> str:
    """The ComfyUI/original name of a diffusers block module (q/k/v handled by the caller)."""
    return (module.replace("attention.to_out.0", "attention.out").replace("all_final_layer.2-1.", "final_layer.")
            .replace("all_x_embedder.2-1", "x_embedder"))


def factor_pair(n: int) -> tuple[int, int]:
    """n = a * b with a <= b as close to sqrt(n) as possible (LyCORIS's factorization with factor -1)."""
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    return a, n // a


def _write(sd: dict[str, torch.Tensor], path: Path, metadata: dict | None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone(): one tensor kept under two names (a shared down) must be stored twice.
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}, str(path), metadata=metadata)


class _Rand:
    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, *shape, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std


def _low_rank(rand, fan_in, fan_out, rank, scale):
    return rand(rank, fan_in, std=1 / math.sqrt(fan_in)), rand(fan_out, rank, std=scale)


def build_lora(path: Path, cfg: dict, layout: str, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
               scale: float = 0.5, dtype: torch.dtype = torch.float32, refiners: bool = False,
               metadata: dict | None = None, zeros: bool = False) -> BuiltLora:
    """Write a random LoRA for a transformer of config `cfg` in `layout`; return what it holds per layer.

    alpha: stored where the layout stores one (kohya, LyCORIS); for `diffusers` it goes into
    lora_adapter_metadata instead (None: no metadata). zeros: all-zero tensors (for size checks
    of a true-size layout without making 80 M random numbers).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout}; known: {', '.join(LAYOUTS)}")
    rand = _Rand(seed)
    if zeros:
        rand = lambda *shape, std=1.0: torch.zeros(*shape)  # noqa: E731
    shapes = module_shapes(cfg)
    sd: dict[str, torch.Tensor] = {}
    layers: dict[str, Written] = {}
    meta = dict(metadata) if metadata else None

    def put(key, t):
        sd[key] = t.to(dtype)

    if layout == "comfy_distill_patch":
        refiners, dtype = True, torch.bfloat16
    modules = block_modules(cfg, refiners=refiners)

    if layout in ("diffusers", "ai_toolkit", "diffsynth", "diffsynth_plain", "comfy_distill_patch",
                  "kohya_split", "kohya_underscore_split", "onetrainer", "lycoris_lora"):
        stores_alpha = layout in ("kohya_split", "kohya_underscore_split", "onetrainer", "lycoris_lora")
        for m in modules:
            kind = m.split(".", 2)[2]
            down, up = _low_rank(rand, *shapes[kind], rank, scale)
            down, up = down.to(dtype), up.to(dtype)
            w = Written("lora", {"down": down, "up": up}, alpha if stores_alpha else None)
            if layout == "diffusers":
                keys = (f"transformer.{m}.lora_A.weight", f"transformer.{m}.lora_B.weight")
                w.metadata_alpha = alpha
            elif layout == "ai_toolkit":
                keys = (f"diffusion_model.{m}.lora_A.weight", f"diffusion_model.{m}.lora_B.weight")
            elif layout == "diffsynth":
                keys = (f"{m}.lora_A.default.weight", f"{m}.lora_B.default.weight")
            elif layout == "diffsynth_plain":
                keys = (f"{m}.lora_A.weight", f"{m}.lora_B.weight")
            elif layout == "comfy_distill_patch":
                keys = (f"diffusion_model.{m}.lora_A.default.weight", f"diffusion_model.{m}.lora_B.default.weight")
            else:
                base = {"kohya_split": "diffusion_model." + original_name(m),
                        "kohya_underscore_split": "lora_unet_" + m.replace(".", "_"),
                        "onetrainer": "lora_transformer_" + m.replace(".", "_"),
                        "lycoris_lora": "lycoris_" + m.replace(".", "_")}[layout]
                keys = (f"{base}.lora_down.weight", f"{base}.lora_up.weight")
                sd[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
            put(keys[0], down)
            put(keys[1], up)
            layers[m] = w
        if layout == "diffusers" and alpha is not None:
            # What diffusers' save_lora_weights writes: the LoraConfig, keys prefixed with the component.
            conf = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.use_rslora": False,
                    "transformer.use_dora": False, "transformer.target_modules": sorted({m.split(".", 2)[2] for m in modules})}
            meta = dict(meta or {"format": "pt"}, lora_adapter_metadata=json.dumps(conf, indent=2, sort_keys=True))

    elif layout in ("kohya_fused", "kohya_underscore", "dot_names"):
        for m in modules:
            kind = m.split(".", 2)[2]
            if kind in ("attention.to_k", "attention.to_v"):
                continue
            block = m.split(".attention.")[0] if "attention" in m else m.rsplit(".", 2)[0]
            if kind == "attention.to_q":
                # One LoRA on the fused qkv: a shared down, the three ups stacked.
                down = rand(rank, shapes[kind][0], std=1 / math.sqrt(shapes[kind][0])).to(dtype)
                ups = [rand(shapes[kind][1], rank, std=scale).to(dtype) for _ in range(3)]
                for i, p in enumerate(("to_q", "to_k", "to_v")):
                    layers[f"{block}.attention.{p}"] = Written("lora", {"down": down, "up": ups[i]}, alpha)
                up = torch.cat(ups, dim=0)
                orig = f"{block}.attention.qkv"
            else:
                down, up = (t.to(dtype) for t in _low_rank(rand, *shapes[kind], rank, scale))
                layers[m] = Written("lora", {"down": down, "up": up}, alpha)
                orig = original_name(m)
            if layout == "kohya_fused":
                base = f"diffusion_model.{orig}"
            elif layout == "kohya_underscore":
                base = "lora_unet_" + orig.replace(".", "_")
            else:
                base = None
            if base is not None:
                put(f"{base}.lora_down.weight", down)
                put(f"{base}.lora_up.weight", up)
                sd[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
                continue
            # dot_names: split keys with dots inside the names, plus redundant fused/bare copies.
            for w in (layers[f"{block}.attention.{p}"] for p in ("to_q", "to_k", "to_v")) if kind == "attention.to_q" \
                    else (layers[m],):
                w.alpha = None  # this layout stores no alpha: scale 1
            if kind == "attention.to_q":
                for i, p in enumerate(("q", "k", "v")):
                    b = f"diffusion_model.{block}.attention.to.{p}"
                    put(f"{b}.lora.down.weight", down)
                    put(f"{b}.lora.up.weight", up[i * (up.shape[0] // 3):(i + 1) * (up.shape[0] // 3)])
                b = f"diffusion_model.{block}.attention.qkv"
            elif kind == "attention.to_out.0":
                b = f"diffusion_model.{block}.attention.to_out.0"
                put(f"{b}.lora.down.weight", down)
                put(f"{b}.lora.up.weight", up)
                b = f"diffusion_model.{block}.attention.out"
            else:
                b = f"diffusion_model.{m}"
            put(f"{b}.lora.down.weight", down)
            put(f"{b}.lora.up.weight", up)

    elif layout.startswith("lokr"):
        for m in modules:
            kind = m.split(".", 2)[2]
            fan_in, fan_out = shapes[kind]
            if layout == "lokr_fused_qkv":
                if kind in ("attention.to_k", "attention.to_v"):
                    continue
                if kind == "attention.to_q":
                    block = m.split(".attention.")[0]
                    base, fan_out, rows_of = f"lora_unet_{block.replace('.', '_')}_attention_qkv", 3 * fan_out, block
                else:
                    base, rows_of = "lora_unet_" + original_name(m).replace(".", "_"), None
            else:
                base = ("lycoris_" + m.replace(".", "_")) if layout == "lokr_tucker" else f"diffusion_model.{m}"
                rows_of = None
            (o1, o2), (i1, i2) = factor_pair(fan_out), factor_pair(fan_in)
            t: dict[str, torch.Tensor] = {}
            split_w1 = layout in ("lokr_factored", "lokr_uneven_ranks")
            split_w2 = layout in ("lokr_w2_factored", "lokr_factored", "lokr_uneven_ranks", "lokr_no_alpha", "lokr_tucker",
                                  "lokr_fused_qkv")
            if split_w1:
                r1 = rank + 1 if layout == "lokr_uneven_ranks" else rank
                t["lokr_w1_a"], t["lokr_w1_b"] = rand(o1, r1, std=0.5), rand(r1, i1, std=0.5)
            else:
                t["lokr_w1"] = rand(o1, i1, std=0.5)
            if split_w2 and layout == "lokr_tucker":
                # LyCORIS's Tucker form: w2_a [rank, out2], w2_b [rank, in2], a 1x1 core [rank, rank, 1, 1].
                t["lokr_w2_a"], t["lokr_w2_b"] = rand(rank, o2, std=0.5), rand(rank, i2, std=0.5 / math.sqrt(i2))
                t["lokr_t2"] = rand(rank, rank, 1, 1, std=0.7)
            elif split_w2:
                t["lokr_w2_a"], t["lokr_w2_b"] = rand(o2, rank, std=0.5), rand(rank, i2, std=0.5 / math.sqrt(i2))
            else:
                t["lokr_w2"] = rand(o2, i2, std=0.5 / math.sqrt(i2))
            t = {k: v.to(dtype) for k, v in t.items()}
            for role, tensor in t.items():
                put(f"{base}.{role}", tensor)
            stored_alpha = None if layout == "lokr_no_alpha" else alpha
            if stored_alpha is not None:
                sd[f"{base}.alpha"] = torch.tensor(float(stored_alpha), dtype=dtype)
            if rows_of is not None:
                d = fan_out // 3
                for i, p in enumerate(("to_q", "to_k", "to_v")):
                    layers[f"{rows_of}.attention.{p}"] = Written("lokr", t, stored_alpha, rows=(i * d, (i + 1) * d))
            else:
                layers[m] = Written("lokr", t, stored_alpha)

    elif layout.startswith("loha"):
        for m in modules:
            kind = m.split(".", 2)[2]
            fan_in, fan_out = shapes[kind]
            base = "lycoris_" + m.replace(".", "_")
            t = {}
            if layout == "loha_tucker":
                for i in (1, 2):
                    t[f"hada_w{i}_a"] = rand(rank, fan_out, std=0.5)
                    t[f"hada_w{i}_b"] = rand(rank, fan_in, std=0.5 / math.sqrt(fan_in))
                    t[f"hada_t{i}"] = rand(rank, rank, 1, 1, std=0.7)
            else:
                for i in (1, 2):  # each factor's entries about 0.4: their product changes a weight like a LoRA
                    t[f"hada_w{i}_a"] = rand(fan_out, rank, std=1.0)
                    t[f"hada_w{i}_b"] = rand(rank, fan_in, std=1.6 / math.sqrt(fan_in * rank / 4))
            t = {k: v.to(dtype) for k, v in t.items()}
            for role, tensor in t.items():
                put(f"{base}.{role}", tensor)
            sd[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
            layers[m] = Written("loha", t, alpha)

    elif layout == "diff":
        for m in modules:
            kind = m.split(".", 2)[2]
            if kind in ("attention.to_k", "attention.to_v"):
                continue
            fan_in, fan_out = shapes[kind]
            if kind == "attention.to_q":
                block = m.split(".attention.")[0]
                diff = rand(3 * fan_out, fan_in, std=0.05).to(dtype)
                put(f"diffusion_model.{block}.attention.qkv.diff", diff)
                for i, p in enumerate(("to_q", "to_k", "to_v")):
                    layers[f"{block}.attention.{p}"] = Written("diff", {"diff": diff}, rows=(i * fan_out, (i + 1) * fan_out))
            else:
                diff = rand(fan_out, fan_in, std=0.05).to(dtype)
                put(f"diffusion_model.{original_name(m)}.diff", diff)
                layers[m] = Written("diff", {"diff": diff})
        _add_bias_diffs(cfg, rand, put, layers, dtype, with_weight=True)

    elif layout == "lora_with_diff_b":
        inner = build_lora(path, cfg, "kohya_split", rank=rank, alpha=alpha, seed=seed, scale=scale, dtype=dtype,
                           refiners=refiners)
        from safetensors.torch import load_file

        sd.update(load_file(str(path)))
        layers.update(inner.layers)
        _add_bias_diffs(cfg, rand, put, layers, dtype, with_weight=False)

    _write(sd, path, meta)
    return BuiltLora(Path(path), layout, layers, sorted(sd))


def _add_bias_diffs(cfg, rand, put, layers, dtype, with_weight: bool) -> None:
    """diff_b (and diff) for Linears with a bias: each main block's adaLN_modulation.0, the final linear."""
    dim, ada = cfg["dim"], min(cfg["dim"], 256)
    p, f, c = cfg["all_patch_size"][0], cfg["all_f_patch_size"][0], cfg["in_channels"]
    biased = {f"layers.{i}.adaLN_modulation.0": (ada, 4 * dim) for i in range(cfg["n_layers"])}
    biased[f"all_final_layer.{p}-{f}.linear"] = (dim, p * p * f * c)
    for m, (fan_in, fan_out) in biased.items():
        name = original_name(m)
        w = layers.setdefault(m, Written("diff"))
        w.bias = rand(fan_out, std=0.05).to(dtype)
        put(f"diffusion_model.{name}.diff_b", w.bias)
        if with_weight:
            w.tensors["diff"] = rand(fan_out, fan_in, std=0.02).to(dtype)
            put(f"diffusion_model.{name}.diff", w.tensors["diff"])


def with_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Rewrite a safetensors file with these metadata strings added (tensors unchanged)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        old = dict(f.metadata() or {})
        sd = {k: f.get_tensor(k) for k in f.keys()}
    _write(sd, path, {**old, **metadata})
