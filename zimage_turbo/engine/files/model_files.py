"""Loading Z-Image components from either file layout, straight onto the chosen device.

Two sources produce the same three modules (diffusers ZImageTransformer2DModel,
transformers Qwen3Model, diffusers AutoencoderKL):
  * a diffusers folder (models/diffusers/<name>/ with model_index.json), and
  * ComfyUI's split files (diffusion_models/, text_encoders/, vae/) plus the Qwen
    tokenizer files ComfyUI ships.
Modules are created with parameters on the meta device (no init, no memory), then
the tensors read from disk onto the target device are assigned in place.
Components are cached process-wide, keyed by (files + size + mtime, dtype, device),
so re-queuing never reloads and changing one setting reloads only what it affects.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import InvalidSettingError, ModelFileError
from ..model_config import (
    TEXT_ENCODER_HIDDEN_LAYER_FROM_END,
    TRANSFORMER_CONFIG,
    VAE_CONFIG,
)
from . import key_maps, quantized
from .safetensors_io import TensorEntry, read_index, refuse_pickle

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


log = logging.getLogger("zimage_turbo")


def shown(path: Path) -> str:
    """A path as messages show it: its last two parts, never the server's absolute path."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


# ---------------------------------------------------------------- identities


@dataclass(frozen=True)
class FileId:
    """A file as the cache sees it: a changed size or mtime means a different file."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "FileId":
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ModelFileError(f"{path.name}: file not found.") from None
        return cls(str(path.resolve()), st.st_size, st.st_mtime_ns)


# ------------------------------------------------------------------ sources


@dataclass(frozen=True)
class DiffusersFolder:
    root: Path

    def describe(self) -> str:
        return f"diffusers folder {self.root.name}"


@dataclass(frozen=True)
class SplitFiles:
    transformer: Path
    text_encoder: Path
    vae: Path
    tokenizer_dir: Path

    def describe(self) -> str:
        return f"{self.transformer.name} + {self.text_encoder.name} + {self.vae.name}"


ModelSource = DiffusersFolder | SplitFiles


def _component_files(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise ModelFileError(f"{folder.parent.name}: the diffusers folder has no {folder.name}/ subfolder ({what}).")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
        if pickles:
            refuse_pickle(folder / pickles[0])
        raise ModelFileError(f"{shown(folder)}: no .safetensors weights found for the {what}.")
    return files


def source_files(source: ModelSource) -> dict[str, list[Path]]:
    """The weight files of each component; raises a clear error for anything missing."""
    if isinstance(source, DiffusersFolder):
        root = Path(source.root)
        if not (root / "model_index.json").is_file():
            raise ModelFileError(f"{root.name}: not a diffusers model folder (no model_index.json).")
        return {
            "transformer": _component_files(root / "transformer", "transformer"),
            "text_encoder": _component_files(root / "text_encoder", "text encoder"),
            "vae": _component_files(root / "vae", "VAE"),
        }
    out = {}
    for part, path in (("transformer", source.transformer), ("text_encoder", source.text_encoder), ("vae", source.vae)):
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path.name}: file not found (the {part.replace('_', ' ')} file).")
        refuse_pickle(path)
        out[part] = [path]
    return out


# ------------------------------------------------------- empty construction


@contextlib.contextmanager
def params_on_meta():
    """Create modules whose parameters live on the meta device: no memory, no init cost.

    Buffers (e.g. rotary frequencies) are still created normally, they are small.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _assign(model: nn.Module, sd: dict[str, torch.Tensor], what: str, source: str) -> nn.Module:
    expected = set(model.state_dict().keys())
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown weights (e.g. {', '.join(unexpected[:3])})")
        raise ModelFileError(
            f"{source}: does not look like a Z-Image {what}: {'; '.join(parts)}. Check that the right file is "
            "selected for this slot."
        )
    params = dict(model.named_parameters())
    for k, v in sd.items():
        ref = params.get(k)
        if ref is not None and tuple(ref.shape) != tuple(v.shape):
            raise ModelFileError(f"{source}: weight {k} has shape {tuple(v.shape)}, the {what} expects {tuple(ref.shape)}.")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------- config inference


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{shown(path)}: cannot read config ({type(exc).__name__}).") from None


def _shapes(entries: list[TensorEntry]) -> dict[str, tuple[int, ...]]:
    return {e.name: e.shape for e in entries}


def _count(names, prefix: str) -> int:
    idx = {int(n[len(prefix):].split(".")[0]) for n in names if n.startswith(prefix) and n[len(prefix):].split(".")[0].isdigit()}
    return max(idx) + 1 if idx else 0


def transformer_config_from_weights(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """The transformer config, read off the tensor shapes of a ComfyUI/original file (any prefix)."""
    stripped = {key_maps.strip_transformer_prefix(n) for n in shapes}
    if "cap_embedder.1.weight" not in stripped or "layers.0.attention.qkv.weight" not in stripped:
        raise ModelFileError(
            f"{source}: this is not a Z-Image diffusion model (no cap_embedder / fused attention.qkv weights)."
        )
    # Named as diffusers' converter names them (meta tensors: shapes only, nothing allocated).
    meta = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
    renamed = {n: tuple(t.shape) for n, t in key_maps.transformer_to_diffusers(meta).items()}
    return transformer_config_from_diffusers_shapes(renamed, source)


# The weights the size is read from, in diffusers names.
TRANSFORMER_SIZE_KEYS = ("cap_embedder.1.weight", "all_x_embedder.2-1.weight", "layers.0.attention.to_q.weight",
                         "layers.0.attention.norm_q.weight")


def transformer_config_from_diffusers_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """The transformer config, read off the tensor shapes of a diffusers-named state dict."""
    lacking = [k for k in TRANSFORMER_SIZE_KEYS if k not in shapes]
    if lacking:
        raise ModelFileError(f"{source}: incomplete Z-Image transformer (no {', '.join(lacking)}): a shard of a "
                             "sharded model, or a file cut short: download it again.")
    dim, cap = shapes["cap_embedder.1.weight"]
    head_dim = shapes["layers.0.attention.norm_q.weight"][0]
    axes = list(TRANSFORMER_CONFIG["axes_dims"]) if head_dim == 128 else [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]
    return dict(
        TRANSFORMER_CONFIG,
        dim=dim,
        cap_feat_dim=cap,
        n_layers=_count(shapes, "layers."),
        n_refiner_layers=_count(shapes, "noise_refiner."),
        n_heads=dim // head_dim,
        n_kv_heads=dim // head_dim,
        in_channels=shapes["all_x_embedder.2-1.weight"][1] // 4,  # patch 2 x 2, frame patch 1
        axes_dims=axes,
    )


def text_encoder_config_from_weights(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    shapes = {key_maps.text_encoder_file_name_to_model(n): s for n, s in shapes.items()}
    if "embed_tokens.weight" not in shapes or "layers.0.self_attn.q_norm.weight" not in shapes:
        raise ModelFileError(f"{source}: this is not a Qwen3 text encoder (no embed_tokens / q_norm weights).")
    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    from ..model_config import TEXT_ENCODER_CONFIG

    return dict(
        TEXT_ENCODER_CONFIG,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=_count(shapes, "layers."),
        num_attention_heads=shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
        num_key_value_heads=shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim,
        head_dim=head_dim,
    )


def vae_config_from_weights(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    if "encoder.conv_in.weight" not in shapes or "decoder.conv_in.weight" not in shapes:
        raise ModelFileError(f"{source}: this is not a VAE file (no encoder/decoder conv_in weights).")
    n_blocks = _count(shapes, "encoder.down.")
    channels = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(n_blocks)]
    return dict(
        VAE_CONFIG,
        block_out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * n_blocks,
        up_block_types=["UpDecoderBlock2D"] * n_blocks,
        layers_per_block=_count(shapes, "encoder.down.0.block."),
        latent_channels=shapes["decoder.conv_in.weight"][1],
    )


# ------------------------------------------------------------ the loaders


def _read_files(files: list[Path], part: str) -> tuple[list[TensorEntry], quantized.Quantization]:
    """The model tensors of a component's files and how they are quantised; refuses what cannot run."""
    entries: list[TensorEntry] = []
    metadata: dict[str, str] = {}
    for f in files:
        meta, found = read_index(f)
        metadata.update(meta)
        entries += found
    quant = quantized.read_quantization(entries, metadata, files[0].name)
    refusal = quant.refusal(files[0].name, part)
    if refusal:
        raise ModelFileError(refusal)
    return quant.weights(entries), quant


# Each part loads in two steps: its tensors are read (no model class needed), then its module is built around
# them. load_components reads every part before it builds any, so the reading overlaps the head start's import
# of the model classes (engine/head_start.py), which a first image after a server start otherwise waited for
# before reading anything (H100: 3.6-4.8 s of import, then 1.6-4.5 s of reading).


def _read_transformer(files: list[Path], index, device, dtype) -> tuple[dict, int]:
    entries, quant = index
    # Dequantised before the rename: an fp8 file's fused qkv has one scale for all three parts.
    return quantized.load_dequantized(entries, quant, device, dtype)


def _build_transformer(files: list[Path], index, source: ModelSource, device, sd: dict) -> nn.Module:
    from diffusers import ZImageTransformer2DModel

    entries, _ = index
    if isinstance(source, DiffusersFolder):
        cfg = {k: v for k, v in _read_json(Path(source.root) / "transformer" / "config.json").items() if not k.startswith("_")}
        cfg.setdefault("axes_lens", TRANSFORMER_CONFIG["axes_lens"])  # diffusers' default is wrong for Z-Image
        rename: Callable[[dict], dict] = lambda sd: sd
    else:
        cfg = transformer_config_from_weights(_shapes(entries), files[0].name)
        rename = key_maps.transformer_to_diffusers  # diffusers' single-file converter, on the loaded tensors
    with params_on_meta():
        model = ZImageTransformer2DModel(**cfg)
    return _assign(model, rename(sd), "diffusion model", files[0].name).to(device)


def _text_encoder_config(files: list[Path], index, source: ModelSource) -> dict:
    entries, _ = index
    if isinstance(source, DiffusersFolder):
        cfg = _read_json(Path(source.root) / "text_encoder" / "config.json")
        cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype")}
    else:
        cfg = text_encoder_config_from_weights(_shapes(entries), files[0].name)
    # hidden_states[-2] is the output of the second-to-last layer: the last layer and
    # the final norm are never needed, so they are neither loaded nor run.
    keep_layers = cfg["num_hidden_layers"] - (TEXT_ENCODER_HIDDEN_LAYER_FROM_END - 1)
    cfg = dict(cfg, num_hidden_layers=keep_layers, use_cache=False)
    cfg.pop("layer_types", None)
    return cfg


def _read_text_encoder(files: list[Path], index, source: ModelSource, device, dtype, pin: bool) -> tuple[dict, int]:
    entries, quant = index
    keep_layers = _text_encoder_config(files, index, source)["num_hidden_layers"]
    selected = []
    for e in entries:
        name = key_maps.text_encoder_file_name_to_model(e.name)
        if name is None or name == "norm.weight":
            continue
        if name.startswith("layers.") and int(name.split(".")[1]) >= keep_layers:
            continue
        selected.append((name, e))
    target = "cpu" if pin else device
    raw, nbytes = quantized.load_dequantized([e for _, e in selected], quant, target, dtype)
    sd = {name: raw[e.name] for name, e in selected}
    if pin:
        sd = {k: v.pin_memory() for k, v in sd.items()}
    return sd, nbytes


def _build_text_encoder(files: list[Path], index, source: ModelSource, device, sd: dict) -> nn.Module:
    from transformers import Qwen3Config, Qwen3Model

    with params_on_meta():
        model = Qwen3Model(Qwen3Config(**_text_encoder_config(files, index, source)))
    model.norm = nn.Identity()
    model = _assign(model, sd, "text encoder", files[0].name)
    # Buffers (rotary frequencies) follow the compute device; weights stay where they were put.
    for mod in model.modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is not None:
                mod._buffers[bname] = buf.to(device)
    return model


def _vae_config(files: list[Path], index, source: ModelSource) -> tuple[dict, int | None]:
    """(config, number of blocks for diffusers' converter, or None for a diffusers folder)."""
    entries, _ = index
    if isinstance(source, DiffusersFolder):
        return {k: v for k, v in _read_json(Path(source.root) / "vae" / "config.json").items() if not k.startswith("_")}, None
    cfg = vae_config_from_weights(_shapes(entries), files[0].name)
    return cfg, len(cfg["block_out_channels"])


def _read_vae(files: list[Path], index, device, dtype) -> tuple[dict, int]:
    entries, quant = index
    return quantized.load_dequantized(entries, quant, device, dtype)


def _build_vae(files: list[Path], index, source: ModelSource, device, sd: dict) -> nn.Module:
    from diffusers import AutoencoderKL

    cfg, convert = _vae_config(files, index, source)
    with params_on_meta():
        model = AutoencoderKL(**cfg)
    if convert is not None:
        sd = key_maps.vae_to_diffusers(sd, convert)  # diffusers' single-file converter, on the loaded tensors
    return _assign(model, sd, "VAE", files[0].name).to(device)


def load_tokenizer(source: ModelSource):
    """The Qwen tokenizer: the diffusers folder's own, or the files ComfyUI ships for split files."""
    from transformers import AutoTokenizer

    folder = Path(source.root) / "tokenizer" if isinstance(source, DiffusersFolder) else Path(source.tokenizer_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        log.warning("tokenizer in %s: %s", folder, exc)  # the full reason, for the server log only
        raise ModelFileError(f"{shown(folder)}: no usable tokenizer files ({type(exc).__name__}).") from None
    # The chat template's markers must be single special tokens, or the prompt is encoded wrongly.
    for marker in ("<|im_start|>", "<|im_end|>"):
        if len(tok(marker, add_special_tokens=False).input_ids) != 1:
            raise ModelFileError(f"{shown(folder)}: the tokenizer does not know the {marker} token; it is not a Qwen tokenizer.")
    return tok


# ------------------------------------------------------------- the cache


@dataclass
class CachedComponent:
    module: nn.Module
    key: tuple
    load_seconds: float
    bytes_read: int
    loaded_at: float = field(default_factory=time.time)


class ComponentCache:
    """Process-wide cache of loaded components; released explicitly (e.g. by ComfyUI's /free)."""

    def __init__(self):
        self._lock = threading.RLock()
        self._items: dict[tuple, CachedComponent] = {}
        self.loads = 0  # how many components were read from disk, ever

    def get_or_load(self, key: tuple, loader: Callable[[], tuple[nn.Module, int]]) -> tuple[CachedComponent, bool]:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                return hit, True
            t0 = time.perf_counter()
            module, nbytes = loader()
            item = CachedComponent(module, key, time.perf_counter() - t0, nbytes)
            self._items[key] = item
            self.loads += 1
            return item, False

    def has(self, key: tuple) -> bool:
        with self._lock:
            return key in self._items

    def drop(self, keys) -> int:
        with self._lock:
            n = 0
            for k in list(keys):
                if self._items.pop(k, None) is not None:
                    n += 1
            return n

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._items)

    def clear(self) -> int:
        return self.drop(self.keys())


COMPONENTS = ComponentCache()


def resolve_device(name: str, auto_device: torch.device | None = None) -> torch.device:
    if name in ("auto", "", None):
        if auto_device is not None:
            return torch.device(auto_device)
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InvalidSettingError(f"unknown device {name!r}: use auto, cpu or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidSettingError(f"device {name} was asked for but this machine has no CUDA GPU; use auto or cpu.")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise InvalidSettingError(
                f"device {name} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s) (cuda:0..)."
            )
        dev = torch.device("cuda", index)
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name in ("auto", "", None):
        if device.type == "cuda":
            # Asked of this very GPU (Ampere and newer have bf16), not of the process's current one.
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        return torch.bfloat16
    if name not in DTYPES:
        raise InvalidSettingError(f"unknown dtype {name!r}: use auto, bf16, fp16 or fp32.")
    return DTYPES[name]


@dataclass
class LoadedComponents:
    transformer: CachedComponent
    text_encoder: CachedComponent
    vae: CachedComponent
    tokenizer: Any
    source: ModelSource
    fresh_loads: dict[str, float]  # component -> seconds, for components read from disk by this call
    keys: tuple[tuple, ...]


def component_key(part: str, files: list[Path], dtype: torch.dtype, device: torch.device, variant: str = "") -> tuple:
    """The cache key of one part. `variant` names a converted form kept apart from the loaded one (the fp8 mode's
    text encoder: "fp8-weights"), so that a pipeline of the other precision never gets it."""
    return (part, tuple(FileId.of(p) for p in files), DTYPE_NAMES[dtype] + (f"+{variant}" if variant else ""),
            str(device))


def load_components(source: ModelSource, device: torch.device, dtype: torch.dtype, te_on_host: bool,
                    classes_ready: Callable[[], None] | None = None, te_variant: str = "") -> LoadedComponents:
    """Load (or fetch from the cache) the three modules and the tokenizer for `source`.

    `classes_ready`: called between reading the tensors and building the modules (the head start's import of
    the model classes is waited for there, engine/head_start.py). `te_variant`: the text encoder's cache variant
    (component_key); it is loaded as usual, and the caller converts it.
    """
    files = source_files(source)
    fresh = {}

    def key(part):
        return component_key(part, files[part], dtype, device, te_variant if part == "text_encoder" else "")

    # The headers of every part that is not cached are read and checked before any part is loaded:
    # a text encoder that cannot be used is refused before minutes go into loading the transformer.
    parts = ("transformer", "text_encoder", "vae")
    indexes = {part: _read_files(files[part], part) for part in parts if not COMPONENTS.has(key(part))}
    readers = {
        "transformer": lambda: _read_transformer(files["transformer"], indexes["transformer"], device, dtype),
        # The text encoder's key ignores where it sits (device or pinned host): moving it is cheap.
        "text_encoder": lambda: _read_text_encoder(files["text_encoder"], indexes["text_encoder"], source, device,
                                                   dtype, pin=te_on_host),
        "vae": lambda: _read_vae(files["vae"], indexes["vae"], device, dtype),
    }
    builders = {
        "transformer": _build_transformer,
        "text_encoder": _build_text_encoder,
        "vae": _build_vae,
    }

    def load_part(part):  # a part dropped from the cache since the check above: read and build it now
        indexes[part] = _read_files(files[part], part)
        sd, nbytes = readers[part]()
        return builders[part](files[part], indexes[part], source, device, sd), nbytes

    read: dict[str, tuple[dict, int, float]] = {}
    try:
        for part in indexes:
            t0 = time.perf_counter()
            sd, nbytes = readers[part]()
            read[part] = (sd, nbytes, time.perf_counter() - t0)
        if classes_ready is not None:
            classes_ready()
        out = {}
        keys = []
        for part in parts:
            k = key(part)
            keys.append(k)
            if part in read:
                sd, nbytes, read_s = read.pop(part)
                build = builders[part]
                item, hit = COMPONENTS.get_or_load(
                    k, lambda: (build(files[part], indexes[part], source, device, sd), nbytes))
                del sd
                if not hit:
                    item.load_seconds += read_s
            else:  # cached (or loaded meanwhile by another caller)
                item, hit = COMPONENTS.get_or_load(k, lambda: load_part(part))
            if not hit:
                fresh[part] = item.load_seconds
            out[part] = item
    except torch.OutOfMemoryError:
        read.clear()
        sd = None  # noqa: F841 - what was read goes before the cache is emptied
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        from ..errors import OutOfMemoryError

        raise OutOfMemoryError(
            f"out of memory on {device} while loading the {part.replace('_', ' ')}: free memory (unload other "
            "models), choose memory=offload_text_encoder or low_vram, or another device."
        ) from None

    tok_dir = Path(source.root) / "tokenizer" if isinstance(source, DiffusersFolder) else Path(source.tokenizer_dir)
    tok_files = tuple(FileId.of(p) for p in sorted(tok_dir.glob("*")) if p.is_file()) if tok_dir.is_dir() else ()
    tokenizer, _ = COMPONENTS.get_or_load(("tokenizer", str(tok_dir), tok_files), lambda: (load_tokenizer(source), 0))
    return LoadedComponents(
        out["transformer"], out["text_encoder"], out["vae"], tokenizer.module, source, fresh, tuple(keys)
    )
