"""torch.compile where it pays: the transformer's repeated blocks, the text encoder's layers, the VAE decoder.

Regional compilation: each repeated block type is compiled once and reused by all its
instances (34 transformer blocks, 35 text-encoder layers). The transformer blocks first
get an attention processor that applies RoPE in real arithmetic (fast_attention.py),
because inductor cannot fuse complex numbers. Shapes are dynamic, so a new prompt length
or image size does not recompile; LoRA slots keep strengths in tensors, so switching
styles does not recompile either. Streamed modules (offload modes) are never compiled:
their weights move between calls.

Nobody should wait for the compiler: a compiled region keeps its eager path, and which one
runs is chosen per thread (`compiled_calls`). The pipeline serves images eagerly while a
background thread compiles (warmup.py), and switches once the compiled code is ready.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading

import torch
from torch import nn

from . import fast_attention

TRANSFORMER_BLOCK = "ZImageTransformerBlock"
# auto: on CUDA, compile in the background while the first images run eagerly; off on a CPU.
# on: compile, and the first image waits for it (every image comes from the compiled code).
# off: the eager path only. background: like auto on any device (for tests on a CPU).
COMPILE_MODES = ("auto", "on", "off")
ENGINE_COMPILE_MODES = COMPILE_MODES + ("background",)

_local = threading.local()

# One code object serves every instance of a block class, and dynamo keeps one graph per kind of instance it
# meets: the transformer's blocks come as noise refiners, context refiners (no modulation) and main blocks (in
# fp8 mode: bf16 and fp8 main blocks), each for batch 1 and batch > 1 (sizes 0/1 are specialised) and with or
# without LoRA adapter slots: 16 graphs and more. Dynamo's default of 8 per code object was hit on an H100 in
# fp8 mode after seven sizes and a LoRA; the blocks then ran eagerly (207 ms a step instead of 73) while the
# probe said "compiled". Each of our regions gets this limit instead (other models in the process keep theirs).
RECOMPILE_LIMIT = 64
# Where our regions' code lives (dynamo's limit warning names the function's file).
_OUR_CODE = ("transformer_z_image", "autoencoder_kl", "modeling_qwen3", "fast_attention")


def check_compile_mode(mode: str) -> None:
    if mode not in ENGINE_COMPILE_MODES:
        from ..errors import InvalidSettingError

        raise InvalidSettingError(f"unknown compile setting {mode!r}: use auto, on or off.")


def wants_compile(mode: str, device_type: str) -> bool:
    check_compile_mode(mode)
    return mode in ("on", "background") or (mode == "auto" and device_type == "cuda")


def compiles_in_background(mode: str, device_type: str) -> bool:
    return mode == "background" or (mode == "auto" and device_type == "cuda")


@contextlib.contextmanager
def compiled_calls(on: bool):
    """Within this block, on this thread, compiled regions run their compiled code (else their eager code)."""
    prev = getattr(_local, "on", False)
    _local.on = on
    try:
        yield
    finally:
        _local.on = prev


def running_compiled() -> bool:
    """Does this thread run our regions' compiled code now (see compiled_calls)?"""
    return getattr(_local, "on", False)


def _regions(module: nn.Module, class_suffix: str) -> list[nn.Module]:
    return [m for m in module.modules() if type(m).__name__.endswith(class_suffix)]


def _inductor_options() -> dict:
    """Inductor settings for our regions: the same kernels, hence the same bits, in every process.

    By default inductor times several launch configurations of a reduction kernel (norms, softmax-like sums)
    on its first call and keeps the fastest; the winner depends on timing noise and on the size that
    arrived first, and a reduction's block size changes its summation order. Measured on an H100: two cold
    compiles of the same model gave images a few levels apart, and a soak's images differed from a second
    server's. Its deterministic mode picks reduction configurations by rule instead, so a retry on another
    replica, a restart or a second server gives the same image for the same seed.
    ZIMAGE_TURBO_INDUCTOR_DETERMINISTIC=0 turns it off (for measuring what it costs).
    """
    import os

    from torch._inductor import config as inductor_config

    if os.environ.get("ZIMAGE_TURBO_INDUCTOR_DETERMINISTIC", "1") == "0" or not hasattr(inductor_config, "deterministic"):
        return {}
    return {"deterministic": True}


def _install(region: nn.Module) -> None:
    # What nn.Module.compile() does, plus a per-thread choice of path: the eager code stays
    # callable while another thread compiles (dynamo's cache is per code object, so every
    # instance of a block class shares one compiled graph).
    # The compiled callable is made at the first compiled call, on the thread that compiles (the background
    # warm-up): making it needs the compiler's modules, and a first image that waits for them (or for the head
    # start importing them beside it) paid for a compiler it does not use (H100: 3.8 s of a cold first image).
    eager = region._call_impl
    made: list = []
    lock = threading.Lock()

    def compiled():
        if not made:
            with lock:
                if not made:
                    made.append(torch.compile(eager, dynamic=True, fullgraph=False, options=_inductor_options(),
                                              **_recompile_limit_kwargs()))
        return made[0]

    def call(*args, **kwargs):
        if getattr(_local, "on", False):
            return compiled()(*args, **kwargs)
        return eager(*args, **kwargs)

    call.compiled_made = lambda: bool(made)  # for tests: has the compiled callable been made?
    region._compiled_call_impl = call


def _recompile_limit_kwargs() -> dict:
    """torch.compile's per-region recompile_limit where this torch has it; else dynamo's global limit is raised."""
    _limit_watch.install()
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": RECOMPILE_LIMIT}
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    return {}


class _RecompileLimitWatch(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings about our regions: from then on a region runs its
    eager code, and the probe must say so instead of "compiled"."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.hits = 0
        self.last = ""
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            self._installed = True
            logging.getLogger("torch._dynamo.convert_frame").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to report
            return
        if "recompile_limit" in text and any(name in text for name in _OUR_CODE):
            self.hits += 1
            self.last = next((line.strip() for line in text.splitlines() if "function:" in line), "")


_limit_watch = _RecompileLimitWatch()


def recompile_limit_hits() -> int:
    """How many times one of our compiled regions gave up compiling (dynamo's recompile limit) in this process."""
    return _limit_watch.hits


def recompile_limit_note() -> str:
    return (f"some compiled blocks hit torch's recompile limit and run eagerly (slower); {_limit_watch.last}; "
            f"restart ComfyUI to compile afresh")


def _set(regions: list[nn.Module], on: bool) -> None:
    for r in regions:
        if on and getattr(r, "_compiled_call_impl", None) is None:
            _install(r)
        elif not on:
            r._compiled_call_impl = None


def is_compiled(module: nn.Module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def set_transformer(transformer: nn.Module, on: bool) -> None:
    if on:
        fast_attention.install(transformer)
    _set(_regions(transformer, TRANSFORMER_BLOCK), on)
    if not on:
        fast_attention.uninstall(transformer)


def set_text_encoder(text_encoder: nn.Module, on: bool) -> None:
    _set(_regions(text_encoder, "DecoderLayer"), on)


def set_vae(vae: nn.Module, on: bool) -> None:
    _set([vae.decoder], on)


def tracing_context():
    """Settings for the traces our modules make (they happen lazily, inside generate() or the warm-up).

    Without this, dynamo's "duck sizing" assumes dimensions that were equal at the first trace
    stay equal: after a square image, the first non-square one recompiles the VAE decoder.
    torch's config overrides belong to the thread that sets them, so each thread that runs our
    compiled regions (the generation, the background warm-up) enters this itself; other
    compiled models in the process keep their own settings.
    """
    try:
        from torch.fx.experimental import _config as fx_config

        return fx_config.patch(use_duck_shape=False)
    except (ImportError, AttributeError):
        return contextlib.nullcontext()
