"""Which files the loader's lists show: is a file a Z-Image part for a loader input, told from its header alone.

ComfyUI's model folders are shared with every other model a user has (Flux, SDXL, SD3, Wan, CLIP, T5, LoRAs put in
the wrong folder). For each loader input ("slot": transformer, text_encoder, vae) a file gets one verdict:

- PART: its header shows a Z-Image part for that slot. Listed first.
- FOREIGN: its header shows it is something else; the verdict's reason says what it is and what to choose instead.
  Left out of the list.
- UNKNOWN: the header cannot tell. Pickles (never opened), files that are not safetensors, malformed, cut short or
  of an unknown layout. Listed after the parts; the loader's own checks refuse a bad one with the exact reason when
  it is chosen.

Shapes are all a header has, so one foreign file passes for a part: SD3's VAE has exactly the shapes of Flux's
(which *is* Z-Image's VAE).

Only the first 8 bytes and the JSON header of a file are read, never tensor data, and nothing is validated beyond
what the verdict needs (the loader validates every file it loads). The kind of file comes from the same classifier
as `python -m zimage_turbo check` (check._classify), with a few shape tests on top. Verdicts are cached per file
version (path, size, modification time): ComfyUI builds the node lists on every /object_info request, so a folder
of hundreds of files is read once and then costs a stat per file.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from ..model_config import LATENT_CHANNELS, TEXT_ENCODER_CONFIG
from .check import _FOREIGN_HINTS, _classify, _strip_vae_prefix
from .key_maps import strip_transformer_prefix

PART, FOREIGN, UNKNOWN = "part", "foreign", "unknown"
SLOTS = ("transformer", "text_encoder", "vae")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# A real header is well under 1 MiB (Z-Image's transformer: about 0.1 MiB); a longer one is not worth reading here.
MAX_HEADER_BYTES = 16 * 1024 * 1024

# What each slot wants, as the reasons say it.
_WANTED = {
    "transformer": ("a Z-Image diffusion model", "choose a Z-Image-Turbo diffusion model (z_image_turbo_bf16.safetensors)"),
    "text_encoder": ("the Qwen3-4B text encoder Z-Image uses",
                     "choose qwen_3_4b.safetensors (or qwen_3_4b_fp8_mixed.safetensors)"),
    "vae": ("the 16-channel Flux VAE Z-Image uses", "choose ae.safetensors"),
}
# A Z-Image part, said from another slot's point of view.
_PART_ELSEWHERE = {
    "transformer": "a Z-Image diffusion model (it belongs in models/diffusion_models)",
    "text_encoder": "a Qwen3 text encoder (it belongs in models/text_encoders)",
    "vae": "a VAE (it belongs in models/vae)",
}
_LORA = "a LoRA (it belongs in models/loras, for the LoRA Stack)"
# Other models' files that check._FOREIGN_HINTS does not name; a key fragment each (ComfyUI detects these models by
# the same keys in comfy/model_detection.py).
_MORE_HINTS = (
    ("double_stream_blocks.", "a HiDream diffusion model"),
    ("txt_norm.weight", "a Qwen-Image diffusion model"),
    ("head.modulation", "a Wan video model"),
    ("double_layers.", "an AuraFlow diffusion model"),
    ("adaln_single.", "an LTX-Video or PixArt diffusion model"),
)
_ZIMAGE_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention|feed_forward)\.", re.M)
_REFINER = re.compile(r"^(noise_refiner|context_refiner)\.\d+\.", re.M)


@dataclass(frozen=True)
class SlotVerdict:
    slot: str
    status: str  # PART, FOREIGN or UNKNOWN
    what: str = ""  # FOREIGN: what the file is instead ("a Flux diffusion model")

    @property
    def is_part(self) -> bool:
        return self.status == PART

    @property
    def listed(self) -> bool:
        return self.status != FOREIGN

    def reason(self, name: str) -> str:
        """Why the file `name` is not a part for this slot and what to choose instead ("" when it may be one).
        `name` is the file as the user named it (relative to its model folder: never a server path)."""
        if self.status != FOREIGN:
            return ""
        wanted, advice = _WANTED[self.slot]
        return f"{name} is {self.what}, not {wanted}: {advice}."


_lock = threading.Lock()
# str(path) -> (size, mtime_ns, {slot: SlotVerdict}); a file that changes replaces its entry.
_cache: dict[str, tuple[int, int, dict[str, SlotVerdict]]] = {}


def slot_verdict(path, slot: str) -> SlotVerdict:
    """Whether the file at `path` is a Z-Image part for the loader's `slot`: PART, FOREIGN (with the reason) or
    UNKNOWN. Never raises for a bad file (a missing or unreadable one is UNKNOWN); reads the header at most once
    per file version."""
    if slot not in SLOTS:
        raise ValueError(f"unknown loader slot {slot!r}; one of {SLOTS}")
    path = Path(path)
    try:
        st = path.stat()  # follows links, as ComfyUI's lists do
    except OSError:
        return SlotVerdict(slot, UNKNOWN)
    key = str(path)
    with _lock:
        hit = _cache.get(key)
    if hit is not None and hit[:2] == (st.st_size, st.st_mtime_ns):
        return hit[2][slot]
    verdicts = _verdicts(path, st)
    with _lock:
        _cache[key] = (st.st_size, st.st_mtime_ns, verdicts)
    return verdicts[slot]


def clear_cache() -> None:
    with _lock:
        _cache.clear()


# ------------------------------------------------------------------ reading


def _header_shapes(path: Path, size: int) -> dict[str, list[int]] | None:
    """Tensor name -> shape from a safetensors header, or None when the file is not safetensors, is malformed or is
    cut short.

    Reads 8 bytes and the header, nothing else: a pickle or zip under a .safetensors name is at most handed to
    json.loads (its first bytes, read as a length, rarely even fit the file), never unpickled."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            n = int.from_bytes(head, "little")
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                return None
            raw = f.read(n)
        header = json.loads(raw)
        if not isinstance(header, dict):
            return None
        header.pop("__metadata__", None)
        # Comprehensions, not one checked loop: after json.loads this is most of what a listing costs.
        shapes = {name: entry["shape"] for name, entry in header.items()}
        ends = [entry["data_offsets"][1] for entry in header.values()]
        well_formed = (all(type(s) is list for s in shapes.values())
                       and all(type(d) is int for s in shapes.values() for d in s)
                       and all(type(e) is int for e in ends))
    except (OSError, ValueError, RecursionError, TypeError, KeyError, IndexError):
        return None  # unreadable, not JSON (UnicodeDecodeError and JSONDecodeError are ValueErrors), malformed
    if not well_formed or 8 + n + max(ends, default=0) > size:  # malformed, or the data is cut short
        return None
    return shapes


def _verdicts(path: Path, st: os.stat_result) -> dict[str, SlotVerdict]:
    unknown = {slot: SlotVerdict(slot, UNKNOWN) for slot in SLOTS}
    # Pickles (.ckpt, .pt, ...) are never opened; only regular files are (a link to a FIFO would block a read).
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES or not stat.S_ISREG(st.st_mode):
        return unknown
    shapes = _header_shapes(path, st.st_size)
    if not shapes:
        return unknown
    what, part_of = _what_it_is(shapes)
    if what is None:
        return unknown
    return {slot: SlotVerdict(slot, PART) if slot == part_of else SlotVerdict(slot, FOREIGN, what) for slot in SLOTS}


# ------------------------------------------------------------------ telling


def _what_it_is(shapes: dict[str, list[int]]) -> tuple[str | None, str | None]:
    """(what the file is, the slot it is a Z-Image part for): (None, None) when the header cannot tell,
    (phrase, None) when it is something else, (phrase, slot) for a Z-Image part."""
    names = list(shapes)
    kind = _classify(names)
    if kind == "lora":
        return _LORA, None
    if kind == "transformer":
        return _transformer(names, shapes)
    if kind == "text_encoder":
        other = _other_text_encoder(names, shapes)
        return (other, None) if other else (_PART_ELSEWHERE["text_encoder"], "text_encoder")
    if kind == "vae":
        other = _other_vae(shapes)
        return (other, None) if other else (_PART_ELSEWHERE["vae"], "vae")
    return _hint(names, shapes), None


def _transformer(names: list[str], shapes: dict) -> tuple[str | None, str | None]:
    stripped = {strip_transformer_prefix(n): s for n, s in shapes.items()}
    joined = "\n".join(stripped)
    if not (_ZIMAGE_BLOCK.search(joined) and _REFINER.search(joined)):
        return _hint(names, shapes), None  # embedders only (a shard?) or another layout: the loader will say
    # Lumina 2 (Z-Image's ancestor) has the same block names, but fewer key/value heads than query heads; Z-Image
    # has as many, so its fused qkv is 3x as tall as the output projection (to_k as tall as to_q).
    qkv, out = stripped.get("layers.0.attention.qkv.weight"), stripped.get("layers.0.attention.out.weight")
    q, k = stripped.get("layers.0.attention.to_q.weight"), stripped.get("layers.0.attention.to_k.weight")
    if qkv and out:
        grouped, dim = qkv[0] != 3 * out[0], out[0]
    elif q and k:
        grouped, dim = k[0] != q[0], q[0]
    else:
        grouped, dim = False, None
    if grouped:
        family = "a Lumina 2 diffusion model" if dim == 2304 else "a Lumina-style diffusion model"
        return f"{family} (grouped key/value heads, which Z-Image does not have)", None
    return _PART_ELSEWHERE["transformer"], "transformer"


def _other_text_encoder(names: list[str], shapes: dict) -> str | None:
    """What a text encoder is when it is not a Qwen3 Z-Image can use; None when it is one."""
    joined = "\n".join(names)
    if re.search(r"^text_model\.|\.text_model\.", joined, re.M):
        return "a CLIP text encoder"
    if re.search(r"^encoder\.block\.", joined, re.M):
        return "a T5 text encoder"
    if "pre_feedforward_layernorm" in joined:
        return "a Gemma text encoder"
    if not re.search(r"self_attn\.q_norm\.weight$", joined, re.M):  # Qwen3's attention normalises q and k
        return "a Llama/Qwen2-style text encoder (e.g. Qwen2.5-VL, Llama, Mistral)"
    norm = next((s for n, s in shapes.items() if n.endswith("layers.0.input_layernorm.weight")), None)
    width, wanted = (norm[0] if norm and len(norm) == 1 else None), TEXT_ENCODER_CONFIG["hidden_size"]
    # Released Qwen3 models are 1024 to 5120 wide; narrower ones are test-size models (this project builds them).
    if width is not None and width >= 1024 and width != wanted:
        return f"a Qwen3 text encoder {width} wide (Qwen3-4B is {wanted} wide)"
    return None


def _other_vae(shapes: dict) -> str | None:
    """What a VAE is when it is not a 16-channel image VAE; None when it is one (Flux's, or SD3's: the same shapes)."""
    conv_in = next((s for n, s in shapes.items() if _strip_vae_prefix(n)[0] == "decoder.conv_in.weight"), None)
    if conv_in is None or len(conv_in) not in (4, 5):
        return None
    if len(conv_in) == 5:
        return "a video VAE (3-D convolutions)"
    channels = conv_in[1]
    if channels == LATENT_CHANNELS:
        return None
    family = " (Stable Diffusion 1.x/2.x/SDXL's)" if channels == 4 else ""
    return f"a {channels}-channel VAE{family}"


def _hint(names: list[str], shapes: dict) -> str | None:
    joined = "\n".join(names)
    for fragment, what in _FOREIGN_HINTS + _MORE_HINTS:
        if fragment in joined:
            return what
    # Wan's, Qwen-Image's and Hunyuan Video's VAEs: a decoder of 3-D convolutions, without SD's conv_in names.
    if any((n.startswith("decoder.") or ".decoder." in n) and len(s) == 5 for n, s in shapes.items()):
        return "a video VAE (3-D convolutions)"
    return None
