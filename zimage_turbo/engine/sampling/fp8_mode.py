"""The opt-in fp8 mode, "fp8 (fast)": most of the transformer's matrix products run on fp8 tensor cores.

What it does: a chosen set of the transformer's Linear layers gets torchao's
Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) (through torchao.quantization.quantize_ with a
filter): the weight is stored as float8 e4m3 with one fp32 scale per output row, and at run time every activation row
is quantised on the fly (fused into the neighbouring kernels when compiled) before an fp8 GEMM (torch._scaled_mm).
Measured on an H200 at Z-Image's widths: 1.40x faster per block than compiled bf16. Everything else (norms,
attention, modulation, RoPE) stays bf16, and so does every layer the policy keeps.

Where: GPUs with fp8 tensor cores, compute capability 8.9 or newer (Ada, Hopper, Blackwell). Anywhere else, or
without torchao, or with memory=low_vram, the mode is refused before anything loads (Fp8UnsupportedError, saying
what to choose instead). torchao is imported only here, and only when a pipeline in this mode is made: the pack
runs without it.

Which layers: Fp8Policy, a small piece of data. The default keeps in bf16 the first and the last main block, both
refiners (noise and context), the embedders and the final layer (outside the blocks: never quantised), and each
block's adaLN modulation (K = 256: too narrow to gain, and it scales whole activations); it quantises q/k/v/out and
the three FFN matrices of the other 28 blocks. Layers whose sizes are not multiples of 16 stay bf16 (the fp8 GEMM
needs them). Z-Image is known to be sensitive to fp8 (community fp8 files keep first and last layers in bf16; one
serving engine passed its quality gate only with the last 15 blocks in bf16): "conservative" is that policy, for
comparing on real weights (ZIMAGE_TURBO_FP8_POLICY, bench/fp8_cost.py --policy).

LoRAs in fp8 mode run as a bf16 side product, x @ A^T @ B^T * strength, beside the fp8 product (the LoRA manager's
adapter slots), never folded into the fp8 weights. Why:
  * exact: a LoRA's change to one weight is small (about 1 % of it) while an e4m3 weight moves in steps of 6-12 % of
    itself; folding and re-quantising W0 + dW rounds most of dW away element by element (ComfyUI has to use
    stochastic rounding when it patches fp8 weights for this reason). Beside the fp8 product it is computed in bf16
    exactly as in bf16 mode;
  * "all LoRAs off" gives back the original fp8 weights bit for bit without any spare copy: they are never written;
  * a switch or a strength change copies rank-r factors into the slots (milliseconds, nothing re-quantised, nothing
    recompiled), as fast as the bf16 merge; re-quantising every targeted weight on each switch would need a spare
    copy of the fp8 weights (5+ GB, the memory fp8 exists to save) plus a dequantise/GEMM/quantise pass per layer
    (bench/fp8_cost.py measures that cost as fold_requant_ms for comparison).
  The price: with a LoRA on, each targeted layer runs two small extra GEMMs (about +12 % per step measured in bf16
  at rank 32); with every LoRA off, nothing. LoKr/LoHa/full-weight diffs change whole matrices and cannot sit beside
  the product as a low-rank pair: in fp8 mode they are refused, naming the file, with the advice to use bf16.

One transformer per set of files and device, in one precision: fp8 is made from the loaded bf16 weights in place
(no second copy on the device); the pipeline registry (pipeline.py) retires pipelines of the other precision.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import Fp8UnsupportedError, InvalidSettingError

FP8_CHOICE = "fp8 (fast)"  # the loader's dtype choice
POLICY_ENV = "ZIMAGE_TURBO_FP8_POLICY"
MIN_CAPABILITY = (8, 9)
ACTIVATION_LB = 1e-12  # smallest activation row maximum a scale is made from (see torchao_config)
ALIGN = 16  # torch._scaled_mm wants both sizes of the weight to be multiples of 16
_MARK = "_zimage_turbo_fp8"  # attribute on a converted transformer: its Fp8Plan

# The Linear layers inside a transformer block, as diffusers names them.
BLOCK_PARTS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
MODULATION_PART = "adaLN_modulation.0"

LORA_WHY = "fp8 mode: LoRAs run in bf16 beside the fp8 weights (exact; the fp8 weights are never changed)"
LORA_ADVICE = ("choose dtype bf16 in the Turbo Loader for this LoRA (fp8 weights cannot take a whole-matrix change "
               "exactly)")
GPUS_WITH_FP8 = "compute capability 8.9 or newer: RTX 40xx / L4 / L40 (Ada), H100 / H200 (Hopper), Blackwell"


# ------------------------------------------------------------------ policy


@dataclass(frozen=True)
class Fp8Policy:
    """Which Linear layers of the transformer become fp8; all others stay in the pipeline's bf16.

    Only layers inside transformer blocks can become fp8; embedders and the final layer never do.
    keep_first / keep_last: main blocks (transformer.layers) kept in bf16 at the start / the end.
    refiners: also quantise the noise and context refiner blocks (kept in bf16 when False).
    modulation: also quantise each block's adaLN modulation Linear (kept in bf16 when False).
    """

    name: str = "default"
    keep_first: int = 1
    keep_last: int = 1
    refiners: bool = False
    modulation: bool = False
    text_encoder: bool = True  # the text encoder's block matrices stored in fp8 (weight-only: TextEncoderFp8Linear)

    def decide(self, name: str, layer: nn.Linear, n_layers: int) -> str | None:
        """None when this layer becomes fp8, else why it stays bf16."""
        m = re.fullmatch(r"(layers|noise_refiner|context_refiner)\.(\d+)\.(.+)", name)
        if m is None:
            return "outside the blocks (embedders, final layer)"
        stack, index, part = m.group(1), int(m.group(2)), m.group(3)
        if part == MODULATION_PART:
            if not self.modulation:
                return "adaLN modulation"
        elif part not in BLOCK_PARTS:
            return "not a block matrix"
        if stack != "layers":
            if not self.refiners:
                return "refiner block"
        elif index < self.keep_first:
            return "first blocks"
        elif index >= n_layers - self.keep_last:
            return "last blocks"
        if layer.in_features % ALIGN or layer.out_features % ALIGN:
            return f"sizes not multiples of {ALIGN}"
        return None

    def describe(self) -> str:
        kept = [f"first {self.keep_first}" if self.keep_first else "", f"last {self.keep_last}" if self.keep_last else ""]
        kept = " and ".join(k for k in kept if k) or "no"
        extra = ["refiners" if not self.refiners else "", "adaLN modulation" if not self.modulation else ""]
        extra = ", ".join(e for e in extra if e)
        te = "text encoder weights in fp8" if self.text_encoder else "text encoder in bf16"
        return (f"policy {self.name!r}: {kept} main block(s){', ' + extra if extra else ''}, embedders and final "
                f"layer kept in bf16; {te}")


POLICIES = {
    "default": Fp8Policy(),
    # The setting one serving engine needed to pass an LPIPS <= 0.15 gate against bf16 (last 15 of 30 blocks bf16).
    # The text encoder stays bf16 here too: nothing of the conditioning is rounded.
    "conservative": Fp8Policy(name="conservative", keep_first=1, keep_last=15, text_encoder=False),
    # The default's transformer with the text encoder in bf16 (resident ~16.6 GiB instead of ~13): the conditioning
    # exactly as in bf16, for users with the memory who compare on real weights.
    "bf16_text_encoder": Fp8Policy(name="bf16_text_encoder", text_encoder=False),
    # Every block matrix the kernels can take: the fastest, the furthest from bf16 (for measuring).
    "all_blocks": Fp8Policy(name="all_blocks", keep_first=0, keep_last=0, refiners=True, modulation=True),
}


def policy_named(name: str) -> Fp8Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise InvalidSettingError(f"unknown fp8 policy {name!r}: use one of {', '.join(POLICIES)}.") from None


def policy_from_env() -> Fp8Policy:
    """The policy the loader uses: ZIMAGE_TURBO_FP8_POLICY names one of POLICIES (default: "default")."""
    return policy_named(os.environ.get(POLICY_ENV, "").strip() or "default")


@dataclass(frozen=True)
class Fp8Plan:
    """What a policy chose on one transformer: the fp8 layers and, for every other Linear, why it stays bf16."""

    policy: Fp8Policy
    fp8: tuple[str, ...]
    kept: tuple[tuple[str, str], ...]  # (layer, reason)
    fp8_weights: int  # elements of the fp8 layers' weights
    all_weights: int  # elements of every Linear weight

    def kept_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, why in self.kept:
            out[why] = out.get(why, 0) + 1
        return out

    def summary(self) -> str:
        n = len(self.fp8) + len(self.kept)
        share = self.fp8_weights / self.all_weights if self.all_weights else 0.0
        kept = ", ".join(f"{count} {why}" for why, count in self.kept_by_reason().items())
        return (f"policy {self.policy.name}: {len(self.fp8)} of {n} Linear layers in fp8 e4m3 (row scales; {share:.0%} "
                f"of the Linear weights), bf16: {kept or 'none'}")

    def to_dict(self) -> dict:
        return {"policy": self.policy.name, "policy_fields": self.policy.__dict__.copy(), "fp8_layers": len(self.fp8),
                "bf16_layers": len(self.kept), "bf16_by_reason": self.kept_by_reason(),
                "fp8_weight_share": self.fp8_weights / self.all_weights if self.all_weights else 0.0,
                "summary": self.summary()}


def _plain_name(name: str) -> str:
    """A Linear's name without PEFT's wrapper part (a LoRA slot wraps the base layer as `<name>.base_layer`)."""
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


def _linears(transformer: nn.Module) -> dict[str, nn.Linear]:
    out = {}
    for name, mod in transformer.named_modules():
        if isinstance(mod, nn.Linear) and ".lora_" not in name:
            out[_plain_name(name)] = mod
    return out


def plan(transformer: nn.Module, policy: Fp8Policy) -> Fp8Plan:
    """What `policy` chooses on this transformer (nothing is changed)."""
    n_layers = len(getattr(transformer, "layers", ()))
    fp8, kept, fp8_weights, all_weights = [], [], 0, 0
    for name, layer in _linears(transformer).items():
        numel = layer.in_features * layer.out_features
        all_weights += numel
        why = policy.decide(name, layer, n_layers)
        if why is None:
            fp8.append(name)
            fp8_weights += numel
        else:
            kept.append((name, why))
    return Fp8Plan(policy, tuple(fp8), tuple(kept), fp8_weights, all_weights)


# --------------------------------------------------------------- support


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of an NVIDIA GPU; None for the CPU and other devices (ROCm included: untested here)."""
    if device.type != "cuda" or getattr(torch.version, "hip", None):
        return None
    return tuple(torch.cuda.get_device_capability(device))


def unsupported_reason(device: torch.device) -> str | None:
    """Why this device cannot run fp8 GEMMs, or None when it can."""
    cap = device_capability(device)
    if cap is None:
        return "this pipeline's device is the CPU" if device.type == "cpu" else f"{device} is not an NVIDIA GPU"
    if tuple(cap) < MIN_CAPABILITY:
        name = f" ({torch.cuda.get_device_name(device)})" if torch.cuda.is_available() else ""
        return f"{device}{name} has compute capability {cap[0]}.{cap[1]}, without fp8 tensor cores"
    return None


def torchao_version() -> str:
    """torchao's version if it is importable with what fp8 mode uses; Fp8UnsupportedError otherwise."""
    try:
        import torchao
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a torchao built for another torch failing to import
        raise Fp8UnsupportedError(
            f"fp8 (fast) uses the torchao library, which cannot be imported in ComfyUI's Python "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}): install it with "
            "`python -m pip install torchao` (0.17 or newer, for torch 2.11 or newer) and restart ComfyUI, or choose "
            "dtype bf16 in the Turbo Loader.") from None
    return getattr(torchao, "__version__", "unknown")


def check_supported(device: torch.device, dtype: torch.dtype = torch.bfloat16, memory: str = "resident") -> None:
    """Refuse fp8 mode, saying what to choose instead, where it cannot run. Called before anything loads."""
    why = unsupported_reason(device)
    if why is not None:
        raise Fp8UnsupportedError(
            f"fp8 (fast) needs an NVIDIA GPU with fp8 tensor cores ({GPUS_WITH_FP8}); {why}. Choose dtype bf16 (or "
            "auto) in the Turbo Loader: the same model, without the fp8 speed-up.")
    check_memory(memory)
    if dtype != torch.bfloat16:
        raise InvalidSettingError(f"fp8 mode keeps its other layers in bf16, not {dtype}: load it with bfloat16.")
    torchao_version()


def check_memory(memory: str) -> None:
    if memory == "low_vram":
        raise Fp8UnsupportedError(
            "fp8 (fast) keeps the transformer on the GPU (its fp8 weights need about 7 GB); low_vram streams bf16 "
            "blocks from host memory instead. Choose memory offload_text_encoder (or resident) with fp8 (fast), or "
            "dtype bf16 with low_vram.")


# ------------------------------------------------------------- converting


def quantize(transformer: nn.Module, policy: Fp8Policy) -> Fp8Plan:
    """Make the policy's layers fp8, in place (each bf16 weight is freed as its fp8 copy is made); the plan.

    The transformer must hold plain weights: no LoRA merged, no block streaming (the pipeline resets them first).
    """
    from torchao.quantization import quantize_

    chosen = plan(transformer, policy)
    if chosen.fp8:
        names = set(chosen.fp8)
        with torch.no_grad():
            quantize_(transformer, torchao_config(),
                      filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and _plain_name(fqn) in names)
            for _, (qdata, scale) in fp8_state(transformer).items():
                # A weight row of zeros has scale 0 and quantises to 0/0 = NaN: make it an exact 0 with scale 1.
                zero = scale == 0
                if bool(zero.any()):
                    qdata[zero.reshape(-1)] = 0
                    scale[zero] = 1
    setattr(transformer, _MARK, chosen)
    return chosen


def torchao_config():
    """torchao's fp8 config used here: e4m3 weights and activations, one scale per row.

    activation_value_lb: a row of zeros (padding tokens can be all zeros after a norm) would get scale 0 and
    quantise to 0/0 = NaN; with a tiny lower bound it stays an exact 0 (a clamp, fused when compiled).
    set_inductor_config=False: torchao would otherwise change process-wide settings (TF32 for every fp32
    matmul in ComfyUI, timing-based kernel tuning that breaks our same-seed-same-bits rule).
    """
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), activation_value_lb=ACTIVATION_LB,
                                                     set_inductor_config=False)


def plan_of(transformer: nn.Module) -> Fp8Plan | None:
    """The plan a transformer was converted with, or None for one in its loaded precision."""
    return getattr(transformer, _MARK, None)


def policy_of(transformer: nn.Module) -> Fp8Policy | None:
    chosen = plan_of(transformer)
    return chosen.policy if chosen is not None else None


def is_fp8(t: torch.Tensor) -> bool:
    """A torchao float8 weight (the tensor subclass holding qdata and scale)."""
    qdata = getattr(t, "qdata", None)
    return isinstance(qdata, torch.Tensor) and qdata.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def tensor_bytes(t: torch.Tensor) -> int:
    """Device bytes of a weight: an fp8 weight counts its fp8 data and its scales, not its logical bf16 size."""
    if is_fp8(t):
        scale = getattr(t, "scale", None)
        extra = scale.numel() * scale.element_size() if isinstance(scale, torch.Tensor) else 0
        return t.qdata.numel() * t.qdata.element_size() + extra
    return t.numel() * t.element_size()


def fp8_state(transformer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (fp8 data, scales) of every fp8 weight, as references (for checks that they never change)."""
    out = {}
    for name, layer in _linears(transformer).items():
        if is_fp8(layer.weight):
            out[name] = (layer.weight.qdata, layer.weight.scale)
    return out


def describe(transformer: nn.Module, text_encoder: nn.Module | None = None) -> str:
    """What the probe says of a pipeline's fp8 mode ("" for a transformer in its loaded precision)."""
    chosen = plan_of(transformer)
    if chosen is None:
        return ""
    n = text_encoder_fp8_layers(text_encoder) if text_encoder is not None else 0
    te = f"; text encoder: {n} Linear layers with fp8 e4m3 weights (weight-only)" if n else "; text encoder in bf16"
    return f"{FP8_CHOICE}: {chosen.summary()}{te}; torchao {torchao_version()}"


# ------------------------------------------------------- the text encoder

E4M3_MAX = 448.0  # largest finite float8 e4m3fn value
TEXT_ENCODER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class TextEncoderFp8Linear(nn.Module):
    """A text-encoder Linear whose weight is stored as float8 e4m3 with one fp32 scale per output row, multiplied in
    the activations' precision (weight-only: activations are not quantised).

    Why this and not torchao (which the transformer's fp8 layers use): the text encoder runs once per new prompt
    (its output is cached per prompt), so its speed hardly shows, while its bf16 weights (7.5 GB) are what keeps the
    fp8 mode's resident memory above a 16 GB card's. What matters here is memory and exactness: weight-only keeps
    the activations exact, and plain tensors move, pin and stream (memory=offload_text_encoder's block streamer)
    like any other weight, which torchao's tensor subclass does not.
    """

    def __init__(self, linear: nn.Linear, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            w = linear.weight.detach().to(device if device is not None else linear.weight.device).float()
            scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a row of zeros stays exactly 0
            q = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            del w
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)  # a Parameter, so the streamer moves it too
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(q.device), requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dequantized(x.dtype), self.bias)


def text_encoder_fp8_layers(text_encoder: nn.Module) -> int:
    """How many of the text encoder's Linear layers hold fp8 weights (0: it is in its loaded precision)."""
    return sum(isinstance(m, TextEncoderFp8Linear) for m in text_encoder.modules())


def quantize_text_encoder(text_encoder: nn.Module, device: torch.device, keep_on: torch.device) -> int:
    """Store the decoder layers' matrices as fp8 weights, in place, one layer at a time: each bf16 weight is quantised
    on `device` (fast) and freed as its fp8 copy, left on `keep_on`, replaces it. Embeddings and norms stay. Returns
    how many layers were converted (0 when it already was)."""
    n = 0
    with torch.no_grad():
        for layer in getattr(text_encoder, "layers", ()):
            for part in TEXT_ENCODER_PARTS:
                parent_name, _, child = part.rpartition(".")
                parent = layer.get_submodule(parent_name)
                old = getattr(parent, child)
                if not isinstance(old, nn.Linear):
                    continue
                new = TextEncoderFp8Linear(old, device)
                setattr(parent, child, new.to(keep_on))
                n += 1
    return n
