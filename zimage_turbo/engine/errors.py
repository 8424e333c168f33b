"""Errors the engine raises, each with a message a user can act on.

They all derive from ZImageError so the node layer can tell a user mistake
(bad file, bad size, foreign LoRA) from a bug.
"""


class ZImageError(Exception):
    """Base class: the message is meant for the user."""


class ModelFileError(ZImageError):
    """A model or LoRA file is missing, corrupt, a pickle, or outside the allowed folders."""


class LoraKeyError(ZImageError):
    """A LoRA's keys do not fit the model."""


class InvalidSettingError(ZImageError):
    """A generation setting is out of range (size not a multiple of 16, steps < 1, ...)."""


class OutOfMemoryError(ZImageError):
    """The device ran out of memory; the message says what to change."""


class NonFiniteError(ZImageError):
    """A generation produced NaN/infinite values: refused rather than returned as a black image."""


class Fp8UnsupportedError(InvalidSettingError):
    """fp8 (fast) was asked for where it cannot run (no fp8 tensor cores, no torchao, low_vram); says what to choose."""
