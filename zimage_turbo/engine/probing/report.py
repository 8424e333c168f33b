"""What one generation cost: phase timings, memory, device figures; as text, JSON and a chart."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from . import device_stats

GIB = 1024**3


@dataclass
class RunReport:
    device: str = ""
    device_name: str = ""
    dtype: str = ""
    fp8: str = ""  # the fp8 mode's policy and layer counts ("" when off)
    memory_mode: str = ""
    source: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    batch_size: int = 0
    cfg: float = 0.0
    seed: int = 0
    started_at: str = ""
    # phases, seconds
    load_s: dict = field(default_factory=dict)  # component -> seconds, read from disk since the last run
    lora_s: float = 0.0
    text_encode_s: float = 0.0
    denoise_s: float = 0.0
    step_s: list = field(default_factory=list)
    vae_decode_s: float = 0.0
    total_s: float = 0.0
    # what happened
    base_reloaded: bool = False
    component_loads_total: int = 0
    lora: list = field(default_factory=list)
    lora_changed: bool = False
    lora_files_read: int = 0
    lora_adapters_injected: int = 0
    embedding_cache_hit: bool = False
    prompt_tokens: int = 0
    prompt_truncated: bool = False
    vae_fp32_fallback: bool = False
    compiled: bool = False  # the compiled code ran
    compile_path: str = ""  # eager (compile off) / eager (compiling in the background) / compiled / ...
    lora_slots_rebuilt: bool = False
    lora_path: str = ""  # merged (no cost per step) / adapters (beside the base layers) / "" (none on)
    lora_why_adapters: str = ""
    # memory
    torch_memory: dict = field(default_factory=dict)
    nvml_during: dict = field(default_factory=dict)
    nvml_after: dict = field(default_factory=dict)
    process_rss_bytes: int = 0

    @classmethod
    def start(cls, pipe, req) -> "RunReport":
        from ..files.model_files import DTYPE_NAMES
        from ..sampling.fp8_mode import FP8_CHOICE

        return cls(
            device=str(pipe.device),
            device_name=device_stats.device_name(pipe.device),
            dtype=FP8_CHOICE if getattr(pipe, "fp8", None) is not None else DTYPE_NAMES[pipe.dtype],
            fp8=getattr(pipe, "fp8_summary", ""),
            memory_mode=pipe.memory,
            source=pipe.comps.source.describe(),
            width=req.width,
            height=req.height,
            steps=req.steps,
            batch_size=req.batch_size,
            cfg=req.cfg,
            seed=req.seed,
            started_at=_dt.datetime.now().isoformat(timespec="seconds"),
        )

    def set_lora(self, rep, seconds: float) -> None:
        self.lora_s = seconds
        self.lora = rep.active
        self.lora_changed = rep.changed
        self.lora_files_read = rep.files_read
        self.lora_adapters_injected = rep.adapters_injected
        self.lora_slots_rebuilt = rep.slots_rebuilt
        self.lora_path = rep.path
        self.lora_why_adapters = rep.why_adapters

    def finish(self, pipe) -> None:
        from ..files.model_files import COMPONENTS

        self.base_reloaded = "transformer" in self.load_s
        self.component_loads_total = COMPONENTS.loads
        self.torch_memory = device_stats.torch_memory(pipe.device)
        self.nvml_after = device_stats.nvml_snapshot(pipe.device)
        self.process_rss_bytes = device_stats.process_rss_bytes()

    # ------------------------------------------------------------ outputs

    @property
    def load_total_s(self) -> float:
        return float(sum(self.load_s.values()))

    @property
    def mean_step_s(self) -> float:
        return float(np.mean(self.step_s)) if self.step_s else 0.0

    def phases(self) -> list[tuple[str, float]]:
        return [
            ("load", self.load_total_s),
            ("LoRA apply", self.lora_s),
            ("text encode", self.text_encode_s),
            ("denoise", self.denoise_s),
            ("VAE decode", self.vae_decode_s),
        ]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["load_total_s"] = self.load_total_s
        d["mean_step_s"] = self.mean_step_s
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    def to_text(self) -> str:
        ms = lambda s: f"{s * 1000:8.1f} ms"
        lines = [
            f"Z-Image-Turbo on {self.device_name}, {self.dtype}, memory {self.memory_mode}, "
            f"{self.compile_path or ('compiled' if self.compiled else 'eager')}",
            f"{self.width}x{self.height}, {self.steps} steps, batch {self.batch_size}, cfg {self.cfg:g}, seed {self.seed}",
            "",
            "phase            time",
        ]
        if self.fp8:
            lines.insert(2, self.fp8)
        load_note = ", ".join(f"{k} {v:.2f}s" for k, v in self.load_s.items()) or "cached, nothing read"
        lines.append(f"load         {ms(self.load_total_s)}   ({load_note})")
        lora_note = ", ".join(f"{x['file']}@{x['strength']:g}" for x in self.lora) or "none"
        extra = []
        if self.lora_files_read:
            extra.append(f"{self.lora_files_read} file(s) read")
        if self.lora_adapters_injected:
            extra.append(f"{self.lora_adapters_injected} file(s) put in a slot")
        if self.lora_path == "merged":
            extra.append("merged into the weights: no cost per step")
        elif self.lora_path == "adapters":
            extra.append("run beside the base layers" + (f": {self.lora_why_adapters}" if self.lora_why_adapters else ""))
        lines.append(f"LoRA apply   {ms(self.lora_s)}   ({lora_note}{'; ' + ', '.join(extra) if extra else ''})")
        te_note = "embedding cache hit" if self.embedding_cache_hit else f"{self.prompt_tokens} tokens"
        if self.prompt_truncated:
            te_note += f", prompt TRUNCATED to {self.prompt_tokens} tokens"
        lines.append(f"text encode  {ms(self.text_encode_s)}   ({te_note})")
        lines.append(f"denoise      {ms(self.denoise_s)}   ({self.steps} steps, {self.mean_step_s * 1000:.1f} ms/step)")
        lines.append(
            f"VAE decode   {ms(self.vae_decode_s)}" + ("   (fp16 overflow: decoded in fp32)" if self.vae_fp32_fallback else "")
        )
        lines.append(f"total        {ms(self.total_s)}")
        lines.append("")
        lines.append(f"base model reloaded: {'YES' if self.base_reloaded else 'no'}")
        tm = self.torch_memory
        if tm:
            lines.append(
                f"torch memory: peak allocated {tm['peak_allocated_bytes'] / GIB:.2f} GiB, peak reserved "
                f"{tm['peak_reserved_bytes'] / GIB:.2f} GiB, now allocated {tm['allocated_bytes'] / GIB:.2f} GiB, "
                f"reserved {tm['reserved_bytes'] / GIB:.2f} GiB"
            )
        nv = self.nvml_during if self.nvml_during.get("available") else self.nvml_after
        if nv.get("available"):
            lines.append(
                f"GPU {nv['name']}: {nv['used_bytes'] / GIB:.2f} / {nv['total_bytes'] / GIB:.2f} GiB used, "
                f"utilization {nv['utilization_pct']}% (while denoising), {nv['temperature_c']} C"
            )
        else:
            lines.append(f"{nv.get('reason', 'no NVIDIA GPU')}; process RSS {self.process_rss_bytes / GIB:.2f} GiB")
        return "\n".join(lines)

    def chart(self, width: int = 640, height: int = 320) -> np.ndarray:
        """A bar chart of the phase times as an HxWx3 float image in 0..1."""
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (width, height), (24, 26, 30))
        draw = ImageDraw.Draw(img)
        phases = self.phases()
        longest = max([v for _, v in phases] + [1e-9])
        colors = [(120, 144, 156), (171, 71, 188), (66, 165, 245), (102, 187, 106), (255, 167, 38)]
        top, left, bar_h = 40, 110, (height - 70) // len(phases)
        draw.text((10, 10), f"{self.device_name}  {self.width}x{self.height}  total {self.total_s * 1000:.0f} ms", fill=(230, 230, 230))
        for i, ((label, secs), color) in enumerate(zip(phases, colors)):
            y = top + i * bar_h
            w = int((width - left - 90) * secs / longest)
            draw.text((10, y + bar_h // 3), label, fill=(220, 220, 220))
            draw.rectangle([left, y + 4, left + max(w, 1), y + bar_h - 6], fill=color)
            draw.text((left + w + 6, y + bar_h // 3), f"{secs * 1000:.1f} ms", fill=(220, 220, 220))
        return np.asarray(img, dtype=np.float32) / 255.0
