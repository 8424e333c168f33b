"""The Turbo pipeline: cached components + memory placement + LoRA state + the 8-step sampler.

Heavy state lives with the cached component it belongs to (LoRA adapters with the
transformer, the prompt-embedding cache with the text encoder), so two pipelines
that share a component also share, and never fight over, that state.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import InvalidSettingError, NonFiniteError, OutOfMemoryError
from ..files.model_files import (
    COMPONENTS,
    CachedComponent,
    LoadedComponents,
    ModelSource,
    component_key,
    load_components,
    source_files,
)
from ..lora import LORA_FILES, LoraApplyReport, LoraManager, LoraSpec
from ..model_config import (
    CHAT_TEMPLATE,
    LATENT_CHANNELS,
    MAX_PROMPT_TOKENS,
    SIZE_MULTIPLE,
    VAE_SCALE,
)
from ..probing import device_stats
from ..probing.report import RunReport
from .. import head_start
from . import acceleration, compile_cache, fp8_mode, fp16_guard
from .placement import BlockStreamer, apply_plan, check_memory_mode, drop_streamers, plan_for
from .warmup import CompileWarmup

log = logging.getLogger("zimage_turbo")

MAX_SIDE = 4096
MAX_BATCH = 16
MAX_CFG = 30.0
MAX_SHIFT = 20.0
EMBED_CACHE_SIZE = 64



@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 8
    cfg: float = 0.0  # ComfyUI convention: <= 1 means no guidance (Turbo is distilled for it)
    shift: float = 3.0
    seed: int = 0
    batch_size: int = 1

    def validate(self) -> None:
        for side, value in (("width", self.width), ("height", self.height)):
            if value % SIZE_MULTIPLE or value < SIZE_MULTIPLE:
                lower = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
                raise InvalidSettingError(
                    f"{side} {value} is not a multiple of {SIZE_MULTIPLE} (Z-Image works on 16-pixel patches): "
                    f"use {lower} or {lower + SIZE_MULTIPLE}."
                )
            if value > MAX_SIDE:
                raise InvalidSettingError(f"{side} {value} is above the supported {MAX_SIDE} pixels.")
        if not 1 <= self.steps <= 200:
            raise InvalidSettingError(f"steps {self.steps}: use 1 to 200 (Turbo is made for 8).")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise InvalidSettingError(f"batch size {self.batch_size}: use 1 to {MAX_BATCH}.")
        if not (np.isfinite(self.cfg) and 0 <= self.cfg <= MAX_CFG):
            raise InvalidSettingError(f"cfg {self.cfg}: use 0 (off, the Turbo default) or a value from 1 to {MAX_CFG:g}.")
        # NaN passes every comparison, so finiteness is checked first: a NaN shift gave a black image.
        if not (np.isfinite(self.shift) and 0 < self.shift <= MAX_SHIFT):
            raise InvalidSettingError(f"shift {self.shift}: use a number above 0 and up to {MAX_SHIFT:g} (Turbo uses 3).")

    @property
    def guidance(self) -> bool:
        return self.cfg > 1.0


@dataclass
class GenerationResult:
    images: torch.Tensor  # [B, H, W, 3] float32 in 0..1, on the CPU (ComfyUI IMAGE)
    latents: torch.Tensor  # [B, 16, H/8, W/8] float32, VAE space (ComfyUI LATENT samples)
    report: RunReport


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Z-Image's schedule: linspace(1, 1/steps) shifted by `shift`, then a final 0 (float32 throughout)."""
    base = np.array(torch.linspace(1.0, 1.0 / steps, steps).tolist(), dtype=np.float32)
    shifted = shift * base / (1 + (shift - 1) * base)
    sigmas = torch.from_numpy(shifted).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


class _TextEncoderState:
    def __init__(self):
        self.embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.streamer: BlockStreamer | None = None
        self.guards: list = []


class _TransformerState:
    def __init__(self, transformer, device: torch.device):
        self.lora = LoraManager(transformer, device=device)
        self.streamer: BlockStreamer | None = None
        self.guards: list = []


def _state(component: CachedComponent, factory):
    st = getattr(component, "state", None)
    if st is None:
        st = factory()
        component.state = st
    return st


class TurboPipeline:
    """One loaded Z-Image-Turbo: generate() runs LoRA apply, text encoding, denoising and decoding."""

    def __init__(self, comps: LoadedComponents, device: torch.device, dtype: torch.dtype, memory: str,
                 compile_mode: str = "auto", fp8: fp8_mode.Fp8Policy | None = None):
        self.comps = comps
        self.fp8 = fp8  # the fp8 mode's policy (fp8_mode.py), None for the loaded precision alone
        self.device = device
        self.dtype = dtype
        self.memory = memory
        self.compile_mode = compile_mode
        self.transformer = comps.transformer.module
        self.text_encoder = comps.text_encoder.module
        self.vae = comps.vae.module
        self.tokenizer = comps.tokenizer
        self.tstate: _TransformerState = _state(comps.transformer, lambda: _TransformerState(self.transformer, device))
        self.testate: _TextEncoderState = _state(comps.text_encoder, _TextEncoderState)
        self.pending_loads: dict[str, float] = dict(comps.fresh_loads)
        self.last_report: RunReport | None = None
        self.lock = threading.Lock()
        self.vae_fp32 = None
        self.warmup = CompileWarmup(self)
        signature = _shape_signature(self.transformer, self.text_encoder, self.vae)
        if fp8 is not None:  # fp8 layers compile to other kernels: their artifacts are kept apart
            signature += f"|fp8:{fp8!r}"
        self.cache_tag = compile_cache.tag(device, dtype, signature)
        self.fp8_summary = fp8_mode.describe(self.transformer, self.text_encoder) if fp8 is not None else ""
        self._graphs_saved = None
        if dtype == torch.float16:
            if not self.tstate.guards:
                self.tstate.guards = fp16_guard.install_transformer_guards(self.transformer)
            if not self.testate.guards:
                self.testate.guards = fp16_guard.install_text_encoder_guards(self.text_encoder)

    # ---------------------------------------------------------------- memory

    def _apply_compile(self) -> bool:
        """Compile (or un-compile) what the settings allow: streamed modules are never compiled."""
        want = acceleration.wants_compile(self.compile_mode, self.device.type)
        plan = (
            (self.transformer, acceleration.set_transformer, want and self.tstate.streamer is None),
            (self.text_encoder, acceleration.set_text_encoder, want and self.testate.streamer is None),
            (self.vae, acceleration.set_vae, want),
        )
        for module, setter, on in plan:
            if on != acceleration.is_compiled(module):
                setter(module, on)
        if not want:
            self.warmup.set_off()
        return want

    def weight_bytes(self) -> int:
        """Bytes of every weight of the three models (what ComfyUI's manager and status pages are told)."""
        return sum(fp8_mode.tensor_bytes(t) for m in (self.transformer, self.text_encoder, self.vae)
                   for t in m.parameters())

    def lora_variant(self):
        """What the compiled transformer sees of the LoRA state (see LoraManager.variant)."""
        return self.tstate.lora.variant()

    def start_warmup(self) -> None:
        """Compile now, in the background, what generate() would compile (idempotent; a no-op without compile).

        For a preload: the first image after it runs the compiled code at once.
        """
        with self.lock, torch.inference_mode(), device_stats.current_device(self.device):
            self._apply_memory_mode()
            if self._apply_compile():
                self.warmup.request(self.lora_variant())

    def compile_status(self) -> dict:
        """{"state": off|pending|compiling|compiled|failed, "seconds", "error", "variants"}."""
        return self.warmup.status()

    def wait_warm(self, timeout: float | None = None) -> bool:
        return self.warmup.wait(timeout)

    def _choose_path(self, want: bool) -> tuple[bool, str]:
        """(run the compiled code?, what the probe says) for this generation, after the LoRA apply."""
        if not want:
            return False, "eager (compile off)"
        variant = self.lora_variant()
        if acceleration.compiles_in_background(self.compile_mode, self.device.type):
            if self.warmup.use_compiled(variant):
                return True, "compiled"
            self.warmup.request(variant, start=False)  # started once this image is done
            st = self.warmup.status()
            if st["state"] == "failed":
                return False, f"eager (compile failed: {st['error']})"
            return False, "eager (compiling in the background)"
        # "on": compiled code from the first image: this run waits for the warm-up (which compiles
        # every padding case at once, so later prompt lengths and sizes do not stop to compile).
        t0 = time.perf_counter()
        for _ in range(3):  # a variant lost to a race with a LoRA change is asked for again
            if self.warmup.use_compiled(variant) or self.warmup.status()["state"] == "failed":
                break
            self.warmup.request(variant)
            self.warmup.wait()
        waited = time.perf_counter() - t0
        if self.warmup.use_compiled(variant):
            return True, "compiled" + (f" (this run waited {waited:.1f} s for the compiler)" if waited > 0.5 else "")
        st = self.warmup.status()
        return False, f"eager (compile failed: {st['error'] or 'the compiled code did not become ready'})"

    def _save_compiled(self) -> None:
        """After a foreground compile ("on"), keep what was compiled on disk."""
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        if graphs != self._graphs_saved:
            self._graphs_saved = graphs
            compile_cache.save(self.cache_tag)

    def _apply_memory_mode(self) -> None:
        """Put the weights where this pipeline's memory mode wants them (placement.py decides)."""
        plan = plan_for(self.device, self.memory)
        if self.fp8 is not None:  # LoRAs run beside the fp8 weights, never merged into them (fp8_mode.py says why)
            self.tstate.lora.set_allow_merge(False, fp8_mode.LORA_WHY, fp8_mode.LORA_ADVICE)
        else:
            self.tstate.lora.set_allow_merge(plan.lora_may_merge)
        apply_plan(plan, self.device, self.transformer, self.tstate, self.text_encoder, self.testate)

    def drop_streamers(self) -> None:
        drop_streamers(self.testate, self.tstate)

    # ------------------------------------------------------------ text input

    def encode(self, text: str) -> tuple[torch.Tensor, bool, int, bool]:
        """[tokens, hidden] embedding of the prompt at its own length; cached by text."""
        cache = self.testate.embeddings
        hit = cache.get(text)
        if hit is not None:
            cache.move_to_end(text)
            return hit, True, hit.shape[0], False
        templated = CHAT_TEMPLATE.format(prompt=text)
        full = self.tokenizer(templated, add_special_tokens=False).input_ids
        ids = full[:MAX_PROMPT_TOKENS]
        table = self.text_encoder.embed_tokens.weight
        with torch.inference_mode():
            # One unpadded sequence: no attention mask (plain causal attention, the fast kernels).
            # In offload modes the embedding table stays in host memory: look the rows up there.
            if table.device != self.device:
                embeds = table[torch.tensor(ids)].to(self.device, non_blocking=True)[None]
                out = self.text_encoder(inputs_embeds=embeds, use_cache=False)
            else:
                out = self.text_encoder(input_ids=torch.tensor([ids], device=self.device), use_cache=False)
        # The encoder was built without its last layer and final norm: its output is hidden_states[-2].
        emb = out.last_hidden_state[0].to(self.dtype)
        cache[text] = emb
        while len(cache) > EMBED_CACHE_SIZE:
            cache.popitem(last=False)
        return emb, False, len(ids), len(full) > MAX_PROMPT_TOKENS

    # -------------------------------------------------------------- denoise

    def _model(self, latents: torch.Tensor, t_model: torch.Tensor, embeds: list[torch.Tensor]) -> torch.Tensor:
        x = latents.to(self.dtype).unsqueeze(2)
        out = self.transformer(list(x.unbind(0)), t_model, embeds, return_dict=False)[0]
        return torch.stack([o.float() for o in out], dim=0).squeeze(2)

    def generate(
        self,
        req: GenerationRequest,
        loras: list[LoraSpec] = (),
        on_step: Callable[[int, int], None] | None = None,
        check_interrupt: Callable[[], None] | None = None,
        memory: str | None = None,
        compile_mode: str | None = None,
    ) -> GenerationResult:
        """Generate with these settings; `memory` / `compile_mode` default to the pipeline's current ones.

        Callers that share one pipeline (two loaders of the same files) pass their own settings,
        so what each caller gets is fixed by its own inputs, not by whoever asked last.
        """
        req.validate()
        if memory is not None:
            check_memory_mode(memory)
        if compile_mode is not None:
            acceleration.check_compile_mode(compile_mode)
        if self.fp8 is not None:
            fp8_mode.check_memory(memory if memory is not None else self.memory)
        # Inference mode for everything, LoRA slot updates included: tensors made inside it (as
        # ComfyUI runs nodes) may only be changed inside it. The pipeline's device is made the
        # current one, so every CUDA call (events, streams, sync, memory stats) names it even in a
        # process whose current device is another GPU (ComfyUI's default is cuda:0).
        with self.lock, torch.inference_mode(), acceleration.tracing_context(), device_stats.current_device(self.device):
            try:
                if fp8_mode.policy_of(self.transformer) != self.fp8:
                    raise InvalidSettingError(
                        "another loader of these model files turned this pipeline's transformer to another precision "
                        "(fp8 (fast) and bf16 of the same files are kept once): queue the prompt again, its loader "
                        "loads its own.")
                if memory is not None:
                    self.memory = memory
                if compile_mode is not None:
                    self.compile_mode = compile_mode
                return self._generate(req, list(loras), on_step, check_interrupt)
            except torch.OutOfMemoryError:
                self._after_oom()
                raise OutOfMemoryError(
                    f"out of memory on {device_stats.device_name(self.device)} at {req.width}x{req.height}, batch "
                    f"{req.batch_size}, memory mode {self.memory}: lower the size or batch, or choose "
                    "memory=offload_text_encoder / low_vram, or unload other models."
                ) from None

    def _after_oom(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _generate(self, req, loras, on_step, check_interrupt) -> GenerationResult:
        dev = self.device
        t_start = time.perf_counter()
        self.warmup.note_generation()
        report = RunReport.start(self, req)
        report.load_s = dict(self.pending_loads)
        self.pending_loads = {}
        device_stats.reset_peak(dev)
        self._apply_memory_mode()
        t0 = time.perf_counter()
        want = self._apply_compile()
        if time.perf_counter() - t0 > 0.5:
            log.info("zimage_turbo: preparing the compiled modules took %.1f s", time.perf_counter() - t0)

        t0 = time.perf_counter()
        lora_rep: LoraApplyReport = self.tstate.lora.apply(loras)
        device_stats.synchronize(dev)
        report.set_lora(lora_rep, time.perf_counter() - t0)
        report.compiled, report.compile_path = self._choose_path(want)
        limit_hits = acceleration.recompile_limit_hits()
        with acceleration.compiled_calls(report.compiled):
            result = self._denoise_and_decode(req, report, lora_rep, t_start, on_step, check_interrupt)
        # Once dynamo gives up on a region it runs that region eagerly from then on, without a word: say so.
        if report.compiled and acceleration.recompile_limit_hits():
            report.compile_path = f"{report.compile_path}, but {acceleration.recompile_limit_note()}"
            if acceleration.recompile_limit_hits() > limit_hits:
                log.warning("zimage_turbo: %s", report.compile_path)
        if report.compiled:
            self._save_compiled()  # only when this run compiled something new
            self.warmup.mark_ready(self.lora_variant())
        else:
            self.warmup.start_queued()
        return result

    def _denoise_and_decode(self, req, report, lora_rep, t_start, on_step, check_interrupt) -> GenerationResult:
        dev = self.device
        cuda = dev.type == "cuda"

        t0 = time.perf_counter()
        pos, pos_hit, n_tok, truncated = self.encode(req.prompt)
        neg = None
        neg_hit = None
        if req.guidance:
            neg, neg_hit, _, _ = self.encode(req.negative_prompt)
        device_stats.synchronize(dev)
        report.text_encode_s = time.perf_counter() - t0
        report.prompt_tokens = n_tok
        report.prompt_truncated = truncated
        report.embedding_cache_hit = pos_hit if neg_hit is None else (pos_hit and neg_hit)

        B = req.batch_size
        h, w = req.height // VAE_SCALE, req.width // VAE_SCALE
        gen = torch.Generator("cpu").manual_seed(int(req.seed))
        latents = torch.randn((B, LATENT_CHANNELS, h, w), generator=gen, dtype=torch.float32).to(dev)
        sigmas = flow_sigmas(req.steps, req.shift).to(dev)
        timesteps = sigmas[:-1] * 1000.0
        embeds = [pos] * B + ([neg] * B if neg is not None else [])
        g = req.cfg - 1.0  # ComfyUI's cfg c == diffusers' guidance c-1: pos + (c-1)(pos-neg)

        t0 = time.perf_counter()
        step_ends = []
        events = []  # CUDA: events[i] .. events[i+1] brackets step i
        stream = torch.cuda.current_stream(dev) if cuda else None
        if cuda:
            events.append(torch.cuda.Event(enable_timing=True))
            events[0].record(stream)
        with torch.inference_mode():
            for i in range(req.steps):
                if check_interrupt is not None:
                    check_interrupt()
                t = timesteps[i]
                t_model = ((1000.0 - t.expand(B)) / 1000.0)
                if neg is not None:
                    pred = self._model(latents.repeat(2, 1, 1, 1), t_model.repeat(2), embeds)
                    p, n = pred[:B], pred[B:]
                    pred = p + g * (p - n)
                else:
                    pred = self._model(latents, t_model, embeds)
                latents = latents + (sigmas[i + 1] - sigmas[i]) * (-pred)
                if cuda:
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record(stream)
                    events.append(ev)
                    # Wait for the previous step only: one step stays queued, so the GPU never idles
                    # while the progress bar still reports finished steps.
                    if i > 0:
                        events[i].synchronize()
                        if on_step:
                            on_step(i, req.steps)
                else:
                    step_ends.append(time.perf_counter())
                    if on_step:
                        on_step(i + 1, req.steps)
            report.nvml_during = device_stats.nvml_snapshot(dev)
            device_stats.synchronize(dev)
            if cuda and on_step:
                on_step(req.steps, req.steps)
        report.denoise_s = time.perf_counter() - t0
        if not bool(torch.isfinite(latents).all()):
            raise NonFiniteError(self._non_finite_message("the latents became NaN or infinite while denoising", req, lora_rep))
        if cuda:
            report.step_s = [events[i].elapsed_time(events[i + 1]) / 1000.0 for i in range(req.steps)]
        else:
            prev = t0
            report.step_s = []
            for end in step_ends:
                report.step_s.append(end - prev)
                prev = end

        t0 = time.perf_counter()
        with torch.inference_mode():
            vae_latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            image, report.vae_fp32_fallback = self._decode(vae_latents)
            if not bool(torch.isfinite(image).all()):
                raise NonFiniteError(self._non_finite_message("the VAE decoder returned NaN or infinite pixels", req, lora_rep))
            images = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()
        report.vae_decode_s = time.perf_counter() - t0
        report.total_s = time.perf_counter() - t_start
        report.finish(self)
        self.last_report = report
        return GenerationResult(images, vae_latents.float().cpu(), report)

    def _non_finite_message(self, what: str, req: GenerationRequest, lora_rep: LoraApplyReport) -> str:
        """Why a generation is refused instead of returning a black image, with the likely causes first."""
        causes = []
        if lora_rep.active:
            rows = ", ".join(f"{a['file']} at strength {a['strength']:g}" for a in lora_rep.active)
            causes.append(f"the LoRA(s) {rows}: try a lower strength or switch them off one by one")
        if self.dtype == torch.float16:
            causes.append("fp16 precision: use dtype bf16 (or auto)")
        if req.shift != 3.0 or req.guidance:
            causes.append(f"the sampler settings (shift {req.shift:g}, cfg {req.cfg:g}; Turbo uses shift 3, cfg 0)")
        causes.append("the model files themselves: check them with `python -m zimage_turbo check FILE` in the node pack's folder")
        return f"{what}, so no image is returned (it would be black). Likely cause: " + "; or ".join(causes) + "."

    def _decode(self, vae_latents: torch.Tensor) -> tuple[torch.Tensor, bool]:
        image = self.vae.decode(vae_latents.to(self.vae.dtype), return_dict=False)[0]
        if self.vae.dtype == torch.float16 and not torch.isfinite(image).all():
            # The fp16 VAE overflowed on this image: decode it again in fp32 rather than return NaNs.
            if self.vae_fp32 is None:
                import copy

                self.vae_fp32 = copy.deepcopy(self.vae).float()
            return self.vae_fp32.decode(vae_latents.float(), return_dict=False)[0], True
        return image, False


# ---------------------------------------------------------------- registry

_REGISTRY_LOCK = threading.RLock()
_PIPELINES: dict[tuple, TurboPipeline] = {}


def get_pipeline(source: ModelSource, device: torch.device, dtype: torch.dtype, memory: str = "resident",
                 compile_mode: str = "auto", fp8: fp8_mode.Fp8Policy | None = None) -> TurboPipeline:
    """The cached pipeline for these files/dtype/device (loading what is missing).

    `memory` and `compile_mode` become its defaults for generate() calls that name none; callers
    sharing the pipeline (the nodes) pass their own to generate(). `fp8`: the fp8 mode with this
    policy (fp8_mode.py; refused before anything loads where it cannot run), dtype being bf16.
    """
    plan = plan_for(device, memory)
    if fp8 is not None:
        fp8_mode.check_supported(device, dtype, memory)
    # One-time work that would otherwise land in the first image: the CUDA libraries load and the compiler
    # imports while the weights are read. The model classes are imported on the head-start thread only, and
    # waited for here: diffusers' and transformers' lazy modules fail when two threads import them at once.
    classes = head_start.import_model_classes()
    head_start.warm_cuda_libraries(device)
    if acceleration.wants_compile(compile_mode, device.type) and not acceleration.compiles_in_background(
            compile_mode, device.type):
        # "on": the first image compiles, so the compiler's modules are imported while the weights are read.
        # In the background modes the first image runs eagerly and the warm-up thread imports them later: a
        # first image beside that import waits for the interpreter at every operator call.
        head_start.import_compiler()
    waited = [0.0]

    def classes_ready() -> None:
        # Called once the files are read (the reading overlaps the import): a first image queued as the server
        # comes up waits here; the probe shows the wait beside the files read.
        t0 = time.perf_counter()
        classes.wait()
        waited[0] += time.perf_counter() - t0

    # fp8: a transformer read now is quantised before the text encoder comes to the device (it is read into host
    # memory and moved at the first image), so loading never holds the bf16 transformer and the encoder at once.
    te_on_host = plan.text_encoder_loads_to_host or (fp8 is not None and plan.on_gpu)
    # The fp8 text encoder's weights end where the memory mode wants the encoder: the GPU when resident.
    te_keep_on = torch.device("cpu") if plan.text_encoder_loads_to_host or not plan.on_gpu else device
    with _REGISTRY_LOCK:
        comps = _components(source, device, dtype, te_on_host, fp8, classes_ready, te_keep_on)
        key = comps.keys if fp8 is None else comps.keys + (("fp8", fp8),)
        pipe = _PIPELINES.get(key)
        acceleration.check_compile_mode(compile_mode)  # reject a bad value before anything runs
        if pipe is None:
            pipe = TurboPipeline(comps, device, dtype, memory, compile_mode, fp8)
            _PIPELINES[key] = pipe
        else:
            for part, secs in comps.fresh_loads.items():
                pipe.pending_loads[part] = secs
        if waited[0] >= 0.05:
            pipe.pending_loads[IMPORT_WAIT_PART] = waited[0]
        pipe.memory = memory
        pipe.compile_mode = compile_mode
        return pipe


IMPORT_WAIT_PART = "model classes (import)"  # the probe's load part for the wait on the head start's import
RETIRE_WAIT_S = 300.0  # longest wait for a generation of a pipeline whose transformer changes precision


TE_FP8_VARIANT = "fp8-weights"  # the cache variant of a text encoder with fp8 weights (model_files.component_key)


def _components(source, device, dtype, te_on_host, fp8, classes_ready=None, te_keep_on=None) -> LoadedComponents:
    """The components for these files, with the transformer in the precision asked for (under _REGISTRY_LOCK).

    One transformer per set of files and device is kept, in one precision: fp8 is made from the loaded bf16
    weights in place (no second copy on the device), and bf16 comes back only by reading the file again (fp8
    cannot be undone exactly). Pipelines using it in the other precision are retired first: their loaders
    load their own when they run next. The text encoder of an fp8 policy with `text_encoder` is a cache entry of
    its own (a bf16 pipeline never gets it); the other precision's encoder is dropped when the precision changes.
    """
    te_variant = TE_FP8_VARIANT if fp8 is not None and fp8.text_encoder else ""
    comps = load_components(source, device, dtype, te_on_host, classes_ready, te_variant)
    have = fp8_mode.policy_of(comps.transformer.module)
    if have == fp8:
        _text_encoder_precision(comps, te_variant, device, te_keep_on)
        return comps
    import contextlib

    with contextlib.ExitStack() as held:
        _retire(comps.transformer, held)
        other_te = component_key("text_encoder", source_files(source)["text_encoder"], dtype, device,
                                             "" if te_variant else TE_FP8_VARIANT)
        # The retired pipelines' encoder, if it was the other precision's, unless a pipeline of other transformer
        # files still uses it (the same encoder file beside two transformers): dropped from the cache while in use,
        # it would be read again, and held twice, by the next loader of that precision.
        if other_te not in _keys_in_use():
            COMPONENTS.drop([other_te])
        if have is not None:
            key = comps.transformer.key
            comps.transformer.state = None
            comps = None  # nothing refers to the fp8 weights any more: they go before the file is read again
            COMPONENTS.drop([key])
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            comps = load_components(source, device, dtype, te_on_host, te_variant=te_variant)
        if fp8 is not None:
            _plain_weights(comps.transformer)
            t0 = time.perf_counter()
            chosen = fp8_mode.quantize(comps.transformer.module, fp8)
            log.info("zimage_turbo: %s (%.1f s)", chosen.summary(), time.perf_counter() - t0)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _text_encoder_precision(comps, te_variant, device, te_keep_on)
    return comps


def _text_encoder_precision(comps: LoadedComponents, te_variant: str, device, keep_on) -> None:
    """Convert a text encoder loaded for the fp8 variant (after the transformer is fp8: the peak stays low)."""
    te = comps.text_encoder.module
    if te_variant != TE_FP8_VARIANT or fp8_mode.text_encoder_fp8_layers(te):
        return
    t0 = time.perf_counter()
    n = fp8_mode.quantize_text_encoder(te, device, keep_on if keep_on is not None else device)
    comps.text_encoder.state = None  # prompt embeddings cached for the bf16 weights, if any, are not these
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.info("zimage_turbo: text encoder: %d Linear layers with fp8 weights (%.1f s)", n, time.perf_counter() - t0)


def _retire(transformer: CachedComponent, held) -> None:
    """Take the pipelines using this transformer out of the registry; their locks stay held (in `held`) until its
    weights have changed, so a generation waiting for one then sees the change and stops."""
    victims = [k for k, p in _PIPELINES.items() if p.comps.transformer is transformer]
    for k in victims:
        pipe = _PIPELINES[k]
        if not pipe.lock.acquire(timeout=RETIRE_WAIT_S):
            raise InvalidSettingError("another generation with these model files is still running in the other "
                                      "precision: queue the prompt again when it is done.")
        held.callback(pipe.lock.release)
        del _PIPELINES[k]
        pipe.warmup.cancel()
        if pipe.warmup.status()["state"] == "compiling":
            log.info("zimage_turbo: waiting for a background compile of the %s pipeline before its weights change",
                     "fp8" if pipe.fp8 is not None else "bf16")
        pipe.warmup.wait()  # no background compile may trace weights that are about to change


def _plain_weights(component: CachedComponent) -> None:
    """The transformer as loaded: LoRAs restored, streaming stopped (weights on the device), not compiled.

    Its LoRA state is dropped: a pipeline made next starts a new one for the new weights.
    """
    st = getattr(component, "state", None)
    if st is not None:
        st.lora.remove_all()
        if st.streamer is not None:
            st.streamer.remove(back_to_device=True)
            st.streamer = None
        component.state = None
    if acceleration.is_compiled(component.module):
        acceleration.set_transformer(component.module, False)


def _shape_signature(*modules) -> str:
    """The model's architecture as its parameter names and shapes (for the compile cache's key)."""
    import hashlib

    h = hashlib.sha1()
    for m in modules:
        for name, t in m.named_parameters():
            h.update(f"{name}{tuple(t.shape)}".encode())
    return h.hexdigest()


def cached_pipelines() -> list[TurboPipeline]:
    with _REGISTRY_LOCK:
        return list(_PIPELINES.values())


def release_all() -> int:
    """Forget every pipeline, component and LoRA file: memory goes back to the device and the OS."""
    with _REGISTRY_LOCK:
        n = COMPONENTS.clear()
        for pipe in _PIPELINES.values():
            pipe.drop_streamers()
        _PIPELINES.clear()
        LORA_FILES.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n


def release_pipeline(pipe: TurboPipeline, collect: bool = True) -> int:
    """Forget one pipeline and the components no other pipeline uses.

    collect=False skips gc.collect(), for callers inside someone else's bookkeeping loop.
    """
    with _REGISTRY_LOCK:
        victims = [k for k, p in _PIPELINES.items() if p is pipe]
        return _release(victims, collect)


def _keys_in_use() -> set:
    """The component cache keys some registered pipeline holds (under _REGISTRY_LOCK)."""
    return {ck for p in _PIPELINES.values() for ck in p.comps.keys}


def _release(victims: list[tuple], collect: bool = True) -> int:
    with _REGISTRY_LOCK:
        keys = set()
        for k in victims:
            pipe = _PIPELINES.pop(k)
            pipe.drop_streamers()
            keys.update(pipe.comps.keys)
        n = COMPONENTS.drop(keys - _keys_in_use())
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n
