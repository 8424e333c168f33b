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
    """One row of a LoRA stack. name: the file as the user chose it, relative to its model folder."""

    path: Path
    strength: float = 1.0
    enabled: bool = True
    name: str = ""

    @property
    def shown_name(self) -> str:
        return self.name or Path(self.path).name

    def __repr__(self) -> str:
        # ComfyUI shows node inputs (str of this) in its error reports to API clients: no server paths.
        return f"LoraSpec({self.shown_name!r}, strength={self.strength:g}, on={self.enabled})"


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
                    f"{spec.shown_name} is switched on twice in the LoRA stack (strengths "
                    f"{seen[key].strength:g} and {spec.strength:g}); a LoRA is applied once: keep one row with the "
                    "strength you want."
                )
            seen[key] = spec
        out.append(spec)
    return tuple(out)


# ---------------------------------------------------------------- the common LORA_STACK type
# Efficiency Nodes, Comfyroll, Lora-Manager and others pass LoRA stacks along as a Python list of
# (lora_name, model_strength, clip_strength) tuples, lora_name relative to models/loras.
NO_LORA = "None"  # what those packs put in a slot that is switched off


def common_stack_rows(value) -> list[tuple[str, float]]:
    """(lora_name, model_strength) of each entry of a LORA_STACK value; InvalidSettingError naming a bad one.

    clip_strength is read and ignored: the text encoder is not LoRA-patched here. An entry named "None" is
    those packs' empty slot and is skipped; anything else malformed is refused, never guessed.
    """
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise InvalidSettingError(f"LORA_STACK must be a list of (lora_name, model_strength, clip_strength) entries, "
                                  f"not {type(value).__name__}.")
    rows = []
    for i, entry in enumerate(value, 1):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise InvalidSettingError(f"LORA_STACK entry {i} is {_short(entry)}: an entry is (lora_name, model_strength, "
                                      "clip_strength).")
        name, model_strength, _clip = entry
        if not isinstance(name, str) or not name.strip():
            raise InvalidSettingError(f"LORA_STACK entry {i}: the LoRA name must be a file name in models/loras, "
                                      f"not {_short(name)}.")
        if name == NO_LORA:
            continue
        if isinstance(model_strength, bool) or not isinstance(model_strength, (int, float)):
            raise InvalidSettingError(f"LORA_STACK entry {i} ({name}): model_strength must be a number, not "
                                      f"{_short(model_strength)}.")
        try:
            strength = check_strength(float(model_strength))
        except (InvalidSettingError, OverflowError) as exc:
            raise InvalidSettingError(f"LORA_STACK entry {i} ({name}): {exc}") from None
        rows.append((name, strength))
    return rows


def common_stack_of(specs) -> list[tuple[str, float, float]]:
    """A stack as a LORA_STACK value: the rows that are on, clip strength = model strength (never used here)."""
    return [(spec.shown_name, float(spec.strength), float(spec.strength)) for spec in specs if spec.enabled]


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
