"""A LoRA stack as the user wrote it: rows of (file, strength, on), checked before anything runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidSettingError

# Beyond this a LoRA only produces overflow or noise; the real ones are used between about -2 and 2
# ("slider" LoRAs up to about 5-8). Non-finite strengths would give a black image.
MAX_ABS_STRENGTH = 20.0


def check_strength(strength: float) -> float:
    """The strength if it is usable, else InvalidSettingError saying what to use instead."""
    if not math.isfinite(strength):
        raise InvalidSettingError(f"strength {strength} is not a finite number: use e.g. 0.8 (or switch the row off).")
    if abs(strength) > MAX_ABS_STRENGTH:
        raise InvalidSettingError(
            f"strength {strength:g} is outside -{MAX_ABS_STRENGTH:g}..{MAX_ABS_STRENGTH:g}: LoRAs are used at about "
            "-2..2; larger values only overflow the model."
        )
    return strength


@dataclass(frozen=True)
class LoraSpec:
    """One row of a LoRA stack."""

    path: Path
    strength: float = 1.0
    enabled: bool = True

    def __repr__(self) -> str:
        # ComfyUI shows node inputs (str of this) in its error reports to API clients: no server paths.
        return f"LoraSpec({Path(self.path).name!r}, strength={self.strength:g}, on={self.enabled})"


def combine_stack(front, back) -> tuple[LoraSpec, ...]:
    """`front` followed by `back`; a LoRA file that is on twice is refused.

    Two rows of one file used to add their strengths (200 rows at 0.8 became 160): that is never
    what a user means, so the stack says which rows to merge instead.
    """
    out: list[LoraSpec] = []
    seen: dict[Path, LoraSpec] = {}
    for spec in tuple(front) + tuple(back):
        if spec.enabled:
            key = Path(spec.path).resolve()
            if key in seen:
                raise InvalidSettingError(
                    f"{Path(spec.path).name} is switched on twice in the LoRA stack (strengths "
                    f"{seen[key].strength:g} and {spec.strength:g}); a LoRA is applied once: keep one row with the "
                    "strength you want."
                )
            seen[key] = spec
        out.append(spec)
    return tuple(out)
