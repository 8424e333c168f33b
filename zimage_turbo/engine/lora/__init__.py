"""LoRA: reading files of every key format (lora_files), the user's stack (stack), applying it (apply)."""

from .apply import (
    LORA_MODE_ENV,
    LORA_MODES,
    LoraApplyReport,
    LoraManager,
    lora_mode_from_env,
)
from .lora_files import (
    LORA_FILES,
    LoraFileCache,
    ParsedLora,
    linear_modules,
    parse_lora,
)
from .stack import MAX_ABS_STRENGTH, LoraSpec, check_strength, combine_stack

__all__ = [
    "LORA_FILES", "LORA_MODES", "LORA_MODE_ENV", "MAX_ABS_STRENGTH", "LoraApplyReport", "LoraFileCache", "LoraManager",
    "LoraSpec", "ParsedLora", "check_strength", "combine_stack", "linear_modules", "lora_mode_from_env", "parse_lora",
]
