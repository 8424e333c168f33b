"""LoRA: reading files of every key format and kind (lora_files, deltas), the user's stack (stack), applying
it (apply), trigger words (trigger_words)."""

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
    biased_modules,
    linear_modules,
    parse_lora,
)
from .stack import (
    MAX_ABS_STRENGTH,
    LoraSpec,
    check_strength,
    combine_stack,
    common_stack_of,
    common_stack_rows,
)
from .trigger_words import TriggerWords, prompt_with_trigger_words, read_trigger_words, stack_trigger_words

__all__ = [
    "LORA_FILES", "LORA_MODES", "LORA_MODE_ENV", "MAX_ABS_STRENGTH", "LoraApplyReport", "LoraFileCache", "LoraManager",
    "LoraSpec", "ParsedLora", "TriggerWords", "biased_modules", "check_strength", "combine_stack", "common_stack_of",
    "common_stack_rows", "linear_modules", "lora_mode_from_env", "parse_lora", "prompt_with_trigger_words",
    "read_trigger_words", "stack_trigger_words",
]
