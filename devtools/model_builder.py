"""Builds random-weight Z-Image models with the real classes, in both file layouts.

Used by the tests and the demo (tiny sizes, CPU) and by the GPU benchmark (true
sizes). Nothing here downloads anything: the tokenizer is trained locally with the
`tokenizers` library, or copied from the Qwen tokenizer files ComfyUI ships.

Layouts written under `root`:
  diffusers/<name>/                      model_index.json, transformer/, text_encoder/,
                                         tokenizer/, vae/, scheduler/
  diffusion_models/<name>.safetensors    original key names, fused attention.qkv
  text_encoders/<name>_te.safetensors    Qwen3 causal-LM names (`model.` prefix)
  vae/<name>_ae.safetensors              original (Flux) VAE names
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from devtools import original_layout
from zimage_turbo.engine.model_config import (
    CHAT_TEMPLATE_JINJA,
    SCHEDULER_CONFIG,
    TEXT_ENCODER_CONFIG,
    TRANSFORMER_CONFIG,
    VAE_CONFIG,
)

# Tiny model: same classes, sizes small enough for CPU tests in milliseconds.
# head_dim = sum(axes_dims) = 32; dim = n_heads * head_dim.
TINY_TRANSFORMER_CONFIG = dict(
    TRANSFORMER_CONFIG,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=32,
    axes_dims=[8, 12, 12],
)

# The vocabulary keeps the real size so the Qwen tokenizer ComfyUI ships also fits it.
TINY_TEXT_ENCODER_CONFIG = dict(
    TEXT_ENCODER_CONFIG,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=1024,
)

# norm_num_groups cannot be read off the weights, so the tiny VAE keeps the real 32
# (split files are loaded with it).
TINY_VAE_CONFIG = dict(
    VAE_CONFIG,
    block_out_channels=[32, 32, 32, 32],
    layers_per_block=1,
    sample_size=64,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A few lines in both languages the styles use, so the tiny tokenizer learns some merges.
_CORPUS = [
    "portrait of sun zhen ni, studio lighting, soft focus, elegant dress, cinematic style",
    "ultra-detailed skin texture, natural background blur, fabric light, film grain",
    "Sugar面部,纯欲甜妹脸部,淡颜系清甜长相,清透水光肌,微醺蜜桃腮红,薄涂裸粉唇釉",
    "眼尾轻挑带慵懒笑意,细碎睫毛轻颤",
    "孙珍妮,旗袍,上海外滩,黄昏,胶片颗粒,王家卫风格",
    "a cat sitting on a windowsill, morning light, photo, 35mm",
    "一幅为名为造相的项目设计的创意海报",
]


@dataclass(frozen=True)
class ModelSizes:
    transformer: dict
    text_encoder: dict
    vae: dict

    @property
    def is_tiny(self) -> bool:
        return self.transformer["dim"] < 1024


TINY = ModelSizes(TINY_TRANSFORMER_CONFIG, TINY_TEXT_ENCODER_CONFIG, TINY_VAE_CONFIG)
FULL = ModelSizes(TRANSFORMER_CONFIG, TEXT_ENCODER_CONFIG, VAE_CONFIG)


@dataclass(frozen=True)
class BuiltModel:
    root: Path
    name: str
    # File names of the split layout; default: derived from `name`.
    split_names: tuple[str, str, str] | None = None

    @property
    def diffusers_dir(self) -> Path:
        return self.root / "diffusers" / self.name

    def _split(self, i: int, default: str) -> str:
        return self.split_names[i] if self.split_names else default

    @property
    def transformer_file(self) -> Path:
        return self.root / "diffusion_models" / self._split(0, f"{self.name}.safetensors")

    @property
    def text_encoder_file(self) -> Path:
        return self.root / "text_encoders" / self._split(1, f"{self.name}_te.safetensors")

    @property
    def vae_file(self) -> Path:
        return self.root / "vae" / self._split(2, f"{self.name}_ae.safetensors")

    @property
    def tokenizer_dir(self) -> Path:
        return self.diffusers_dir / "tokenizer"


def train_tiny_tokenizer(out_dir: Path) -> None:
    """A small byte-level BPE tokenizer with Qwen's special tokens and Z-Image's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    _write_tokenizer_config(out_dir, "PreTrainedTokenizerFast")


def copy_qwen_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """Use the Qwen tokenizer files ComfyUI ships (vocab.json, merges.txt) for a true-size model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src_dir / name, out_dir / name)
    _write_tokenizer_config(out_dir, "Qwen2Tokenizer")


def _write_tokenizer_config(out_dir: Path, cls: str) -> None:
    cfg = {
        "tokenizer_class": cls,
        "chat_template": CHAT_TEMPLATE_JINJA,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
    }
    if cls == "Qwen2Tokenizer":
        cfg["added_tokens_decoder"] = {
            "151643": {"content": "<|endoftext|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False},
            "151644": {"content": "<|im_start|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False},
            "151645": {"content": "<|im_end|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False},
        }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def _random_state(model: torch.nn.Module, generator: torch.Generator, device: str, tiny: bool) -> dict[str, torch.Tensor]:
    """Weights for every parameter: default init for tiny models, N(0, 0.02)-style for full size.

    Full-size models are filled on `device` (a GPU) directly; norms get ones so that
    activations stay in a realistic range through 30 blocks.
    """
    if tiny:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, dtype=torch.float32, device=device)
        if name.endswith("bias") or "pad_token" in name:
            t.zero_()
        elif p.ndim == 1:
            t.fill_(1.0)
        else:
            fan_in = math.prod(p.shape[1:])
            t.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
        out[name] = t
    return out


def _empty_model(factory):
    from zimage_turbo.engine.files.model_files import params_on_meta

    with params_on_meta():
        return factory()


def build_random_model(
    root: Path,
    name: str,
    sizes: ModelSizes = TINY,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    qwen_tokenizer_dir: Path | None = None,
    layouts: tuple[str, ...] = ("diffusers", "split"),
    split_names: tuple[str, str, str] | None = None,
) -> BuiltModel:
    """Write a random Z-Image model in the requested layouts and return where it went.

    With both layouts, the diffusers folder's text encoder is a hard link to the split
    file (transformers reads the `model.` prefix as well): 8 GB less to write at true size.
    """
    import os

    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    built = BuiltModel(Path(root), name, split_names)
    tiny = sizes.is_tiny
    gen = torch.Generator(device).manual_seed(seed)
    torch.manual_seed(seed)

    def make_transformer():
        return ZImageTransformer2DModel(**sizes.transformer)

    def make_te():
        return Qwen3Model(Qwen3Config(**sizes.text_encoder))

    def make_vae():
        return AutoencoderKL(**sizes.vae)

    parts = {}
    for part, factory in (("transformer", make_transformer), ("text_encoder", make_te), ("vae", make_vae)):
        model = factory() if tiny else _empty_model(factory)
        sd = _random_state(model, gen, device, tiny)
        parts[part] = {k: v.to(dtype).contiguous() for k, v in sd.items()}
        del model, sd

    te_prefixed = {f"model.{k}": v for k, v in parts["text_encoder"].items()}
    if "split" in layouts:
        n_up = len(sizes.vae["block_out_channels"])
        for path, sd in (
            (built.transformer_file, original_layout.transformer_to_original(parts["transformer"])),
            (built.text_encoder_file, te_prefixed),
            (built.vae_file, original_layout.vae_to_original(parts["vae"], n_up)),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            _save(sd, path)
    if "diffusers" in layouts:
        d = built.diffusers_dir
        d.mkdir(parents=True, exist_ok=True)
        _save_component(d / "transformer", parts["transformer"], "diffusion_pytorch_model",
                        {"_class_name": "ZImageTransformer2DModel", **sizes.transformer})
        te_cfg = Qwen3Config(**sizes.text_encoder).to_dict()
        te_cfg["architectures"] = ["Qwen3Model"]
        if "split" in layouts:
            (d / "text_encoder").mkdir(parents=True, exist_ok=True)
            (d / "text_encoder" / "config.json").write_text(json.dumps(te_cfg, indent=1, default=str))
            target = d / "text_encoder" / "model.safetensors"
            if target.exists():
                target.unlink()
            os.link(built.text_encoder_file, target)
        else:
            _save_component(d / "text_encoder", te_prefixed, "model", te_cfg)
        _save_component(d / "vae", parts["vae"], "diffusion_pytorch_model", {"_class_name": "AutoencoderKL", **sizes.vae})
        (d / "scheduler").mkdir(exist_ok=True)
        (d / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULER_CONFIG}, indent=1)
        )
        if qwen_tokenizer_dir is not None:
            copy_qwen_tokenizer(Path(qwen_tokenizer_dir), d / "tokenizer")
            tok_cls = "Qwen2Tokenizer"
        else:
            train_tiny_tokenizer(d / "tokenizer")
            tok_cls = "PreTrainedTokenizerFast"
        (d / "model_index.json").write_text(json.dumps({
            "_class_name": "ZImagePipeline",
            "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3Model"],
            "tokenizer": ["transformers", tok_cls],
            "transformer": ["diffusers", "ZImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }, indent=1))

    return built


def _save(sd: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    # clone(): tensors that share memory (one alpha used by many keys) must be stored apart.
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}, str(path), metadata=metadata or {"format": "pt"})


def _save_component(folder: Path, sd: dict[str, torch.Tensor], stem: str, config: dict, shard_bytes: int = 5 * 1024**3) -> None:
    """Save like diffusers/transformers: one file, or shards plus an index above `shard_bytes`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=str))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    if total <= shard_bytes:
        _save(sd, folder / f"{stem}.safetensors")
        return
    shards, current, size = [], {}, 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, folder / fname)
        weight_map.update({k: fname for k in shard})
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )


# ------------------------------------------------------------------ LoRAs

LORA_FORMATS = ("diffusers", "kohya_fused", "kohya_split", "kohya_underscore", "diffsynth")
_ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
_FFN = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def lora_target_modules(transformer_config: dict, ffn: bool = True, refiners: bool = False) -> list[str]:
    """The usual LoRA targets of Z-Image: attention and feed-forward linears of the main layers
    (and of the refiner blocks with `refiners`)."""
    groups = [("layers", transformer_config["n_layers"])]
    if refiners:
        groups += [("noise_refiner", transformer_config["n_refiner_layers"]),
                   ("context_refiner", transformer_config["n_refiner_layers"])]
    names = []
    for group, count in groups:
        for i in range(count):
            names += [f"{group}.{i}.{m}" for m in _ATTN + (_FFN if ffn else ())]
    return names


def build_random_lora(
    path: Path,
    transformer_config: dict,
    fmt: str = "diffusers",
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    scale: float = 0.5,
    ffn: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    refiners: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Write a random LoRA in key format `fmt`; return {diffusers module: (down, up, alpha)} for checks.

    For kohya_fused (and kohya_underscore), q/k/v share one down matrix, as a LoRA trained
    on the fused qkv layer does.
    """
    if fmt not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {fmt}")
    gen = torch.Generator(device).manual_seed(seed)
    dim = transformer_config["dim"]
    hidden = int(dim / 3 * 8)
    shapes = {"attention.to_q": (dim, dim), "attention.to_k": (dim, dim), "attention.to_v": (dim, dim),
              "attention.to_out.0": (dim, dim), "feed_forward.w1": (dim, hidden), "feed_forward.w3": (dim, hidden),
              "feed_forward.w2": (hidden, dim)}
    # diffusers/peft and DiffSynth files carry no alpha: their scale is 1 (alpha = rank).
    stores_alpha = fmt.startswith("kohya")
    alpha = float(rank if alpha is None or not stores_alpha else alpha)
    fused = fmt in ("kohya_fused", "kohya_underscore")
    expected = {}
    for name in lora_target_modules(transformer_config, ffn, refiners):
        kind = name.split(".", 2)[2]
        fan_in, fan_out = shapes[kind]
        shared = fused and kind in ("attention.to_k", "attention.to_v")
        down = expected[name.replace(kind, "attention.to_q")][0] if shared else \
            torch.randn(rank, fan_in, generator=gen, device=device) / math.sqrt(fan_in)
        up = torch.randn(fan_out, rank, generator=gen, device=device) * scale
        expected[name] = (down.to(dtype), up.to(dtype), alpha)

    sd: dict[str, torch.Tensor] = {}
    alpha_t = torch.tensor(alpha, dtype=dtype)
    for name, (down, up, _) in expected.items():
        kind = name.split(".", 2)[2]
        if fmt == "diffusers":
            sd[f"transformer.{name}.lora_A.weight"] = down
            sd[f"transformer.{name}.lora_B.weight"] = up
        elif fmt == "diffsynth":
            sd[f"{name}.lora_A.default.weight"] = down
            sd[f"{name}.lora_B.default.weight"] = up
        elif fmt == "kohya_split":
            orig = name.replace("attention.to_out.0", "attention.out")
            sd[f"diffusion_model.{orig}.lora_down.weight"] = down
            sd[f"diffusion_model.{orig}.lora_up.weight"] = up
            sd[f"diffusion_model.{orig}.alpha"] = alpha_t
        else:  # fused qkv, original names
            if kind in ("attention.to_k", "attention.to_v"):
                continue
            if kind == "attention.to_q":
                base = name[: -len(".attention.to_q")]
                orig = f"{base}.attention.qkv"
                up = torch.cat([expected[f"{base}.attention.{x}"][1] for x in ("to_q", "to_k", "to_v")], dim=0)
            else:
                orig = name.replace("attention.to_out.0", "attention.out")
            if fmt == "kohya_fused":
                key = f"diffusion_model.{orig}"
            else:
                key = "lora_unet_" + orig.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = down
            sd[f"{key}.lora_up.weight"] = up
            sd[f"{key}.alpha"] = alpha_t
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(sd, path)
    return expected


def build_foreign_lora(path: Path, seed: int = 0) -> None:
    """An SDXL-style LoRA whose keys fit nothing in Z-Image (for error-path tests)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for blk in ("down_blocks_0_attentions_0_proj_in", "mid_block_attentions_0_proj_out"):
        sd[f"lora_unet_{blk}.lora_down.weight"] = torch.randn(4, 320, generator=gen)
        sd[f"lora_unet_{blk}.lora_up.weight"] = torch.randn(320, 4, generator=gen)
        sd[f"lora_unet_{blk}.alpha"] = torch.tensor(4.0)
    _save(sd, Path(path))
