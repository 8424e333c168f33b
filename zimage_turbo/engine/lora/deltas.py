"""What each kind of LoRA file adds to a Linear weight, as a recipe computed on demand.

Low-rank LoRAs (lora_A/lora_B, lora_down/lora_up) stay as their two factors: the merge is one GEMM
and the adapter slots take them as they are. The other kinds change a whole weight matrix and are
kept here as the file's factors, turned into a dense delta only when a layer is merged:

  * LoKr  (LyCORIS)  dW = scale * kron(w1, w2); w1 is lokr_w1 or lokr_w1_a @ lokr_w1_b, w2 is
                     lokr_w2, lokr_w2_a @ lokr_w2_b, or the Tucker form with lokr_t2.
                     scale = alpha / rank when a factor is split in two (rank: of w2's split if
                     w2 is split, else of w1's), otherwise 1: LyCORIS's rule, which ComfyUI and
                     diffusers follow too. No alpha stored: scale 1.
  * LoHa  (LyCORIS)  dW = scale * (w1a @ w1b) * (w2a @ w2b) (element-wise), or the Tucker form
                     with hada_t1/hada_t2; scale = alpha / rank (rank = hada_w1_b rows), 1 without alpha.
  * diff             dW = the stored tensor (a full-weight difference), no scale.

Keeping the factors (not the dense delta) matters at true size: a LoKr on every layer is a few MB
as factors and 12 GB as dense deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KIND_NAMES = {"lora": "LoRA", "lokr": "LyCORIS LoKr", "loha": "LyCORIS LoHa", "diff": "full-weight diff"}


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker form: a [rank, out], b [rank, in], core [rank, rank, 1, 1] -> [out, in].

    Only 1x1 cores fit a Linear layer (larger kernels belong to convolutions, which Z-Image's
    LoRA-able layers are not); the parser checks that before anything is computed.
    """
    core2 = core.reshape(core.shape[0], core.shape[1])
    return a.t() @ core2 @ b


def _matrix(t: torch.Tensor) -> torch.Tensor:
    # Some tools store Linear factors as [out, in, 1, 1]; the 1s carry no information.
    return t.reshape(t.shape[0], -1) if t.ndim != 2 else t


@dataclass
class DenseDelta:
    """A whole-matrix delta (LoKr, LoHa or diff) of one layer, kept as the file's factors.

    rows: for a fused qkv layer of the file, the slice of its rows that belongs to this layer of
    the model (the delta of q, k or v); None for the whole delta.
    """

    kind: str  # "lokr" / "loha" / "diff"
    parts: dict[str, torch.Tensor]
    scale: float = 1.0
    rows: tuple[int, int] | None = None
    full_shape: tuple[int, int] = (0, 0)  # before `rows` is taken

    @property
    def shape(self) -> tuple[int, int]:
        if self.rows is None:
            return self.full_shape
        return (self.rows[1] - self.rows[0], self.full_shape[1])

    def sliced(self, start: int, stop: int) -> "DenseDelta":
        return DenseDelta(self.kind, self.parts, self.scale, (start, stop), self.full_shape)

    def to(self, device: torch.device) -> "DenseDelta":
        moved = {k: v.to(device=device, non_blocking=True) for k, v in self.parts.items()}
        return DenseDelta(self.kind, moved, self.scale, self.rows, self.full_shape)

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense delta (scale folded in) on the parts' device, in `dtype`."""
        p = {k: v.to(dtype) for k, v in self.parts.items()}
        if self.kind == "lokr":
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            if "lokr_w2" in p:
                w2 = p["lokr_w2"]
            elif "lokr_t2" in p:
                w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
            else:
                w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
            delta = torch.kron(_matrix(w1), _matrix(w2))
        elif self.kind == "loha":
            if "hada_t1" in p:
                m1 = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
                m2 = _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
            else:
                m1 = p["hada_w1_a"] @ p["hada_w1_b"]
                m2 = p["hada_w2_a"] @ p["hada_w2_b"]
            delta = m1 * m2
        else:
            delta = _matrix(p["diff"])
        if self.rows is not None:
            delta = delta[self.rows[0]: self.rows[1]]
        return delta * self.scale if self.scale != 1.0 else delta


# ------------------------------------------------------------ reading one layer's tensors

LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


class DeltaShapeError(ValueError):
    """The tensors of one layer do not form a delta (missing parts, shapes that do not chain)."""


def _need(parts: dict, *roles: str) -> None:
    missing = [r for r in roles if r not in parts]
    if missing:
        raise DeltaShapeError(f"lacks {', '.join(missing)} (has {', '.join(sorted(parts))})")


def _linear_core(core: torch.Tensor, name: str) -> None:
    if core.ndim == 2 or (core.ndim == 4 and core.shape[2:] == (1, 1)):
        return
    raise DeltaShapeError(f"{name} has shape {tuple(core.shape)}: a convolution kernel; Z-Image's layers are Linear")


def _chain(a: torch.Tensor, b: torch.Tensor, what: str) -> tuple[int, int]:
    a2, b2 = _matrix(a), _matrix(b)
    if a2.ndim != 2 or b2.ndim != 2 or a2.shape[1] != b2.shape[0]:
        raise DeltaShapeError(f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    return a2.shape[0], b2.shape[1]


def _tucker_shape(core, a, b, what) -> tuple[int, int]:
    _linear_core(core, what)
    if a.ndim != 2 or b.ndim != 2 or core.shape[0] != a.shape[0] or core.shape[1] != b.shape[0]:
        raise DeltaShapeError(f"{what}: Tucker shapes {tuple(core.shape)}, {tuple(a.shape)}, {tuple(b.shape)} do not fit")
    return a.shape[1], b.shape[1]


def lokr_delta(parts: dict[str, torch.Tensor], alpha: float | None) -> DenseDelta:
    """A LoKr layer's delta; DeltaShapeError when its tensors do not form one."""
    if "lokr_w1" in parts:
        w1_shape, w1_rank = tuple(_matrix(parts["lokr_w1"]).shape), None
    else:
        _need(parts, "lokr_w1_a", "lokr_w1_b")
        w1_shape, w1_rank = _chain(parts["lokr_w1_a"], parts["lokr_w1_b"], "lokr_w1_a @ lokr_w1_b"), parts["lokr_w1_b"].shape[0]
    if "lokr_w2" in parts:
        w2_shape, w2_rank = tuple(_matrix(parts["lokr_w2"]).shape), None
    elif "lokr_t2" in parts:
        _need(parts, "lokr_w2_a", "lokr_w2_b")
        w2_shape = _tucker_shape(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"], "lokr_t2")
        w2_rank = parts["lokr_w2_b"].shape[0]
    else:
        _need(parts, "lokr_w2_a", "lokr_w2_b")
        w2_shape, w2_rank = _chain(parts["lokr_w2_a"], parts["lokr_w2_b"], "lokr_w2_a @ lokr_w2_b"), parts["lokr_w2_b"].shape[0]
    rank = w2_rank if w2_rank is not None else w1_rank
    scale = alpha / rank if (alpha is not None and rank is not None) else 1.0
    shape = (w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1])
    return DenseDelta("lokr", dict(parts), scale, None, shape)


def loha_delta(parts: dict[str, torch.Tensor], alpha: float | None) -> DenseDelta:
    _need(parts, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if ("hada_t1" in parts) != ("hada_t2" in parts):
        raise DeltaShapeError("has only one of hada_t1 / hada_t2 (the Tucker form needs both)")
    if "hada_t1" in parts:
        s1 = _tucker_shape(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"], "hada_t1")
        s2 = _tucker_shape(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"], "hada_t2")
    else:
        s1 = _chain(parts["hada_w1_a"], parts["hada_w1_b"], "hada_w1_a @ hada_w1_b")
        s2 = _chain(parts["hada_w2_a"], parts["hada_w2_b"], "hada_w2_a @ hada_w2_b")
    if s1 != s2:
        raise DeltaShapeError(f"its two Hadamard factors are {s1} and {s2}: they must have one shape")
    rank = parts["hada_w1_b"].shape[0]
    scale = alpha / rank if alpha is not None else 1.0
    return DenseDelta("loha", dict(parts), scale, None, s1)


def diff_delta(diff: torch.Tensor) -> DenseDelta:
    if diff.ndim not in (2, 4) or (diff.ndim == 4 and diff.shape[2:] != (1, 1)):
        raise DeltaShapeError(f"diff has shape {tuple(diff.shape)}: a Linear layer's difference is 2-D")
    m = _matrix(diff)
    return DenseDelta("diff", {"diff": diff}, 1.0, None, (m.shape[0], m.shape[1]))


@dataclass
class LowRank:
    """W' = W + scale * up @ down."""

    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.up.to(dtype) @ self.down.to(dtype)) * self.scale


@dataclass
class LayerDelta:
    """Everything one file does to one Linear: at most one weight delta, and perhaps a bias delta."""

    module: str
    low_rank: LowRank | None = None
    dense: DenseDelta | None = None
    bias: torch.Tensor | None = None  # diff_b: [out]
    sources: list[str] = field(default_factory=list)  # the file's layer names it came from

    @property
    def kind(self) -> str:
        if self.low_rank is not None:
            return "lora"
        if self.dense is not None:
            return self.dense.kind
        return "diff"  # a bias difference alone

    @property
    def needs_merge(self) -> bool:
        """Only low-rank pairs fit an adapter slot; anything else is merged into the weights."""
        return self.dense is not None or self.bias is not None

    def weight_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        if self.low_rank is not None:
            return self.low_rank.materialize(dtype)
        if self.dense is not None:
            return self.dense.materialize(dtype)
        return None

    # The names the rest of the engine used when every target was a LoRA pair.
    @property
    def down(self):
        return self.low_rank.down if self.low_rank is not None else None

    @property
    def up(self):
        return self.low_rank.up if self.low_rank is not None else None

    @property
    def rank(self) -> int:
        return self.low_rank.rank if self.low_rank is not None else 0
