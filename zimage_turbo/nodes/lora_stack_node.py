"""LoRA Stack node: rows of (LoRA file, strength, on/off); stacks chain into each other."""

from __future__ import annotations

import json

from ..engine.api import InvalidSettingError, LoraSpec, ZImageError, check_strength, combine_stack
from . import comfy_paths
from .constants import CATEGORY, LORA_STACK_TYPE

EXAMPLE = '[{"lora": "sugar_face.safetensors", "strength": 0.8, "on": true}]'


def parse_rows(text: str) -> list[dict]:
    """The node's `loras` value: a JSON list of {"lora": file, "strength": number, "on": bool}.

    Rows that are not what this schema says are refused with a message, never guessed: a string
    "false" is not a switch, NaN is not a strength.
    """
    try:
        rows = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise ZImageError(f"loras must be a JSON list like {EXAMPLE} ({exc.msg} at character {exc.pos}).") from None
    if not isinstance(rows, list):
        raise ZImageError(f"loras must be a JSON list like {EXAMPLE}.")
    out = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("lora"), str) or not row["lora"]:
            raise ZImageError(f"LoRA row {i} needs a \"lora\" file name, like {EXAMPLE}.")
        unknown = sorted(set(row) - {"lora", "strength", "on"})
        if unknown:
            raise ZImageError(f"LoRA row {i} ({row['lora']}): unknown field(s) {', '.join(unknown)}; a row has "
                              "\"lora\", \"strength\" and \"on\".")
        on = row.get("on", True)
        if not isinstance(on, bool):
            raise ZImageError(f"LoRA row {i} ({row['lora']}): \"on\" must be true or false (JSON booleans, not "
                              f"{json.dumps(on)}).")
        strength = row.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ZImageError(f"LoRA row {i} ({row['lora']}): strength must be a number.")
        try:
            strength = check_strength(float(strength))
        except (InvalidSettingError, OverflowError) as exc:
            raise ZImageError(f"LoRA row {i} ({row['lora']}): {exc}") from None
        out.append({"lora": row["lora"], "strength": strength, "on": on})
    return out


def resolve_rows(rows: list[dict]) -> list[LoraSpec]:
    specs = []
    for row in rows:
        if not row["on"]:
            continue  # a switched-off row is never read, so a missing file there is no error
        specs.append(LoraSpec(comfy_paths.resolve_file("loras", row["lora"]), row["strength"], True))
    return specs


class ZImageTurboLoraStack:
    DESCRIPTION = (
        "A stack of LoRAs, each with its own strength (negative and above 1 allowed) and an on/off switch. "
        "Chain stacks to compose styles. Changing strengths or switching LoRAs never reloads the base model: the "
        "LoRAs are applied as adapters, and each file is read once."
    )
    CATEGORY = CATEGORY
    FUNCTION = "stack"
    RETURN_TYPES = (LORA_STACK_TYPE,)
    RETURN_NAMES = ("lora_stack",)
    OUTPUT_TOOLTIPS = ("The incoming stack followed by this node's LoRAs; connect to the Sampler or another stack.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "loras": ("STRING", {
                    "default": "[]",
                    "multiline": True,
                    "tooltip": "The rows, as JSON: " + EXAMPLE + ". Files are looked up in models/loras. "
                               "The canvas shows these as rows you can add, remove, reorder and toggle.",
                }),
            },
            "optional": {
                "lora_stack": (LORA_STACK_TYPE, {"tooltip": "Another stack to put in front of this one (optional)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, loras=None):
        # Runs when the prompt is queued: a missing LoRA is named before any model loads.
        if loras is None:
            return True
        try:
            combine_stack((), resolve_rows(parse_rows(loras)))
        except ZImageError as exc:
            return str(exc)
        return True

    def stack(self, loras, lora_stack=None):
        specs = resolve_rows(parse_rows(loras))
        # A LoRA that is on twice (here or in a chained stack) is refused, not silently added up.
        return (combine_stack(lora_stack or (), specs),)
