"""Compiling without making anyone wait: a background warm-up per pipeline.

With compile "auto" on a GPU, a new pipeline serves its first images on the eager path
(about 1.3 s at 1024² on an H200, instead of a minute and more of compiling) while a
background thread runs the compiled regions once at a representative size, which is when
torch compiles them. When that is done, generations switch to the compiled code. LoRA
states that change what the compiled transformer sees (adapter slots on, see lora.py) are
"variants": a variant that has not been compiled yet runs eagerly while the thread compiles
it. Compiled code is written to disk afterwards (compile_cache.py), so a restart only traces.

States: off (compile not wanted) · pending (wanted, not started) · compiling · compiled ·
failed (the error is kept; generations stay eager and say why).

The thread shares the interpreter finely while it runs (engine/switch_interval.py says why and what it is
worth). (A profile hook that put the thread to sleep during images was tried: it slowed tracing itself more
than twofold.)
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from contextlib import nullcontext

import torch

from ..model_config import CHAT_TEMPLATE, LATENT_CHANNELS, VAE_SCALE
from .. import switch_interval
from ..probing import device_stats
from . import acceleration, compile_cache

log = logging.getLogger("zimage_turbo")

WARM_SIDE = 1024  # the size most images are made at: kernels autotune on realistic shapes
WARM_PROMPT = "a photograph of a lighthouse on a cliff at dusk, waves, soft light, 灯塔, 黄昏"  # 64 tokens templated
WARM_TOKENS = 64
BASE_VARIANT = "base"

IDLE_BEFORE_COMPILE_S = 1.0  # quiet time after an eager image before the background compile starts
MAX_DEFER_S = 60.0  # longest the compile waits for a quiet moment under steady traffic
SWITCH_INTERVAL_S = switch_interval.SHORT_S  # Python's thread switch interval while a warm-up runs


def _transformer_cases(device: torch.device) -> list[tuple[tuple[int, int], int]]:
    """((height, width), caption tokens) to run: first unpadded (1024², 64 tokens), then both padded."""
    side = WARM_SIDE if device.type == "cuda" else 64  # a CPU compiles the same graphs on tiny images
    return [((side, side), WARM_TOKENS), ((240, 240), 50)]  # 15x15 patches and 50 tokens: not multiples of 32


class CompileWarmup:
    def __init__(self, pipe):
        self.pipe = pipe
        self.lock = threading.Lock()
        self.state = "pending"
        self.error: str | None = None
        self.seconds: float | None = None
        self.started_at: float | None = None
        self.ready: set = set()  # variants whose compiled code exists
        self.queue: list = []  # variants waiting for the thread
        self.thread: threading.Thread | None = None
        self.running = False  # changed under self.lock only: a thread is taking variants from the queue
        self.done = threading.Event()
        self.done.set()
        self.generations = 0  # generations begun on the pipeline (see start_queued)
        self.deferred_since: float | None = None

    # --------------------------------------------------------------- queries

    def status(self) -> dict:
        with self.lock:
            return {"state": self.state, "seconds": self.seconds, "error": self.error,
                    "variants": sorted(map(str, self.ready))}

    def use_compiled(self, variant) -> bool:
        with self.lock:
            return self.state == "compiled" and variant in self.ready

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no warm-up is running; True when the pipeline's compiled code is ready."""
        self.done.wait(timeout)
        with self.lock:
            return self.state in ("compiled", "off")

    # --------------------------------------------------------------- control

    def mark_ready(self, variant) -> None:
        """A foreground run (compile "on") compiled this variant itself."""
        with self.lock:
            self.ready.add(variant)
            if self.state != "failed" and not self.queue:
                self.state = "compiled"

    def set_off(self) -> None:
        with self.lock:
            if not self.running:
                self.state = "off"

    def cancel(self) -> None:
        """Forget the variants waiting (a pipeline being retired); a running thread ends after the one it is on."""
        with self.lock:
            if self.running:
                del self.queue[1:]  # the thread's current variant is queue[0]
            else:
                self.queue.clear()
                self.done.set()

    def request(self, variant, start: bool = True) -> None:
        """Compile this variant in the background (idempotent).

        start=False only queues it: a generation asks this way and starts the thread when its image
        is done (start_queued), because a compiling thread takes most of the interpreter (the GIL)
        from an eager generation running beside it: the first image would be several times slower.
        """
        with self.lock:
            if self.state == "failed" or variant in self.ready:
                return
            if variant not in self.queue:
                self.queue.append(variant)
            self.done.clear()  # wait() now waits for this variant, also while its start is deferred
            if self.state in ("off", "pending"):
                self.state = "compiling"
            if self.running or not start:  # a running thread takes it from the queue before it stops
                return
            self._start()

    def note_generation(self) -> None:
        """A generation is starting: a deferred start waits for the next quiet moment."""
        with self.lock:
            self.generations += 1

    def start_queued(self, idle_s: float | None = None) -> None:
        """Start the queued compile once no generation has begun for `idle_s` seconds.

        Images queued back to back (an API client, a batch of prompts) then all run at eager speed;
        beside a tracing thread the next one would wait for the interpreter at every operator
        (H100, warm cache: a styled image took 23.7 s instead of about 2 s). After MAX_DEFER_S of
        steady traffic the compile starts anyway, so a busy server is not eager for ever.
        """
        idle_s = IDLE_BEFORE_COMPILE_S if idle_s is None else idle_s
        with self.lock:
            if not self.queue or self.running or self.state == "failed":
                return
            now = time.perf_counter()
            self.deferred_since = self.deferred_since or now
            if idle_s <= 0 or now - self.deferred_since >= MAX_DEFER_S:
                self._start()
                return
            timer = threading.Timer(idle_s, self._start_if_quiet, args=(self.generations,))
            timer.daemon = True
            timer.start()

    def _start_if_quiet(self, generations_then: int) -> None:
        with self.lock:
            # A generation began meanwhile: its end arms the timer again.
            if self.generations == generations_then and self.queue and not self.running and self.state != "failed":
                self._start()

    def _start(self) -> None:
        """Start the thread (the caller holds self.lock)."""
        self.deferred_since = None
        self.running = True
        self.done.clear()
        self.started_at = self.started_at or time.perf_counter()
        self.thread = threading.Thread(target=self._run, name="zimage-turbo-compile", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- thread

    def _run(self) -> None:
        with switch_interval.short():
            self._compile_queue()

    def _compile_queue(self) -> None:
        pipe = self.pipe
        attempts = 0
        try:
            while True:
                with self.lock:
                    variant = self.queue[0] if self.queue else None
                if variant is None:
                    pipe._save_compiled()  # on disk for the next start
                    with self.lock:
                        if self.queue:  # more arrived while saving
                            continue
                        self.state = "compiled"
                        self.seconds = time.perf_counter() - self.started_at
                        self.running = False
                        self.done.set()
                    log.info("zimage_turbo: compiled in the background in %.1f s", self.seconds)
                    return
                try:
                    warm_regions(pipe, everything=not self.ready)
                except Exception as exc:  # noqa: BLE001
                    # A trace can be spoilt by the model changing under it (a LoRA stack building its
                    # adapter slots meanwhile: dynamo's SpeculationLogDivergence): try again, twice.
                    attempts += 1
                    if attempts > 2:
                        raise
                    log.info("zimage_turbo: background compile attempt %d failed (%s: %s); trying again",
                             attempts, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                    continue
                with self.lock:
                    self.queue.pop(0)
                    # Only what the thread really saw counts as compiled: the LoRA state may have
                    # changed while it traced (then a later run asks for that variant again).
                    if pipe.lora_variant() == variant:
                        self.ready.add(variant)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the eager path serving
            with self.lock:
                self.state = "failed"
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                self.error = f"{type(exc).__name__}: {first_line}"[:300]
                self.queue.clear()
                self.running = False
                self.done.set()
            log.warning("zimage_turbo: background compile failed, images stay on the eager path: %s\n%s",
                        self.error, traceback.format_exc(limit=4))


def warm_regions(pipe, everything: bool) -> None:
    """Run each compiled module once on the compiled path (that is when torch compiles it).

    On its own CUDA stream, so the foreground's eager images keep their own queue. The outputs
    are thrown away; the weights are only read.
    """
    dev = pipe.device
    compile_cache.load(pipe.cache_tag)
    stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    with (torch.inference_mode(), acceleration.tracing_context(), device_stats.current_device(dev),
          acceleration.compiled_calls(True), torch.cuda.stream(stream) if stream is not None else nullcontext()):
        hidden = None
        if everything and acceleration.is_compiled(pipe.text_encoder):
            ids = pipe.tokenizer(CHAT_TEMPLATE.format(prompt=WARM_PROMPT), add_special_tokens=False).input_ids
            out = pipe.text_encoder(input_ids=torch.tensor([ids], device=dev), use_cache=False)
            hidden = out.last_hidden_state[0].to(pipe.dtype)
        if acceleration.is_compiled(pipe.transformer):
            if hidden is None:
                hidden = torch.zeros((WARM_TOKENS, pipe.transformer.config.cap_feat_dim), device=dev, dtype=pipe.dtype)
            # Z-Image pads the caption and the image tokens to multiples of 32 only where they are not
            # already: padded and unpadded sequences trace differently, so both are warmed.
            for (height, width), tokens in _transformer_cases(dev):
                latents = torch.randn((1, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE), device=dev)
                pipe._model(latents, torch.full((1,), 0.5, device=dev), [hidden[:tokens]])
        if everything and acceleration.is_compiled(pipe.vae):
            (height, width), _ = _transformer_cases(dev)[0]
            z = torch.randn((1, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE), device=dev, dtype=pipe.vae.dtype)
            pipe.vae.decode(z, return_dict=False)
        if stream is not None:
            stream.synchronize()

