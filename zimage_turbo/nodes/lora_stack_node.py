"""LoRA Stack node: rows of (LoRA file, strength, on/off); stacks chain into each other, and ComfyUI's
common LORA_STACK (Efficiency Nodes, Comfyroll, Lora-Manager, ...) goes in and comes out."""

from __future__ import annotations

import json

from ..engine.api import (
    InvalidSettingError,
    LoraSpec,
    ZImageError,
    check_strength,
    combine_stack,
    common_stack_of,
    common_stack_rows,
    stack_trigger_words,
)
from . import comfy_paths
from .constants import CATEGORY, CLIP_STRENGTH_NOTE, COMMON_LORA_STACK_TYPE, LORA_STACK_TYPE

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
        specs.append(LoraSpec(comfy_paths.resolve_file("loras", row["lora"]), row["strength"], True, row["lora"]))
    return specs


def resolve_common_stack(value) -> list[LoraSpec]:
    """A LORA_STACK from another pack as our rows: names looked up in models/loras like our own rows."""
    return [LoraSpec(comfy_paths.resolve_file("loras", name), strength, True, name)
            for name, strength in common_stack_rows(value)]


def common_stack_tooltip(order: str) -> str:
    return ("A LORA_STACK from another pack (Efficiency Nodes, Comfyroll, Lora-Manager, rgthree ...): its "
            f"(lora_name, model_strength, clip_strength) entries are applied with model_strength, {order}; names are "
            "looked up in models/loras like the rows. " + CLIP_STRENGTH_NOTE)


class ZImageTurboLoraStack:
    DESCRIPTION = (
        "A stack of LoRAs, each with its own strength (negative and above 1 allowed) and an on/off switch. "
        "Chain stacks to compose styles, or feed in a LORA_STACK from another LoRA pack. Reads LoRA, LyCORIS "
        "LoKr/LoHa and full-weight diff files of every Z-Image layout. Changing strengths or switching LoRAs never "
        "reloads the base model, and each file is read once. Also gives the trigger words of the LoRAs that are on, "
        "and the stack as a LORA_STACK for other packs."
    )
    CATEGORY = CATEGORY
    FUNCTION = "stack"
    # New outputs go at the end: saved workflows link outputs by their index.
    RETURN_TYPES = (LORA_STACK_TYPE, "STRING", COMMON_LORA_STACK_TYPE)
    RETURN_NAMES = ("lora_stack", "trigger_words", "LORA_STACK")
    OUTPUT_TOOLTIPS = (
        "The incoming stacks followed by this node's LoRAs; connect to the Sampler or another stack.",
        "The trigger words of the LoRAs that are on, comma-separated (from the files' metadata: kohya, modelspec, "
        "Civitai/A1111 side files); empty when they name none. The Sampler can also put them in front of the prompt.",
        "The same stack as ComfyUI's common LORA_STACK list of (lora_name, model_strength, clip_strength) for other "
        "packs; clip_strength is set to the strength (Z-Image's text encoder takes no LoRA here).",
    )

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
                "LORA_STACK": (COMMON_LORA_STACK_TYPE, {
                    "tooltip": common_stack_tooltip("after the lora_stack input and before this node's rows")}),
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

    def stack(self, loras, lora_stack=None, LORA_STACK=None):  # noqa: N803 -- the input's name is the type's name
        specs = resolve_rows(parse_rows(loras))
        # A LoRA that is on twice (here or in a chained stack) is refused, not silently added up.
        combined = combine_stack(combine_stack(lora_stack or (), resolve_common_stack(LORA_STACK)), specs)
        return (combined, ", ".join(stack_trigger_words(combined)), common_stack_of(combined))
