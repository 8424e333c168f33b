"""fp8 (fast) vs bf16, and the cost curve over image sizes, in one run (issue 11).

  python -m bench.fp8_cost --root /tmp/zfull --out DIR          # GPU, true-size random model (bench/build_model.py)
  python -m bench.fp8_cost --root ROOT --out DIR --quick        # CPU smoke run on the tiny model (fp8 refused there)
  python -m bench.fp8_cost --quality-only --comfyui PATH/TO/ComfyUI --out DIR     # your real weights, see below

Sections, in this order; <out>/<date>-<device>.json, .md and .png are written after every section and every size,
so a run cut off at the command's time limit keeps what it measured:
  env         device, compute capability, versions, whether fp8 can run here
  bf16        this package in bf16 (resident, compiled; the first image waits for the compile): end to end, ms/step,
              VAE decode, peak memory at 1024²; the reference images of the quality section
  anatomy     bf16: one step's kernels by kind (GEMM, attention, fused, other) and the GPU's idle time per step, a
              CUDA graph of one step against the normal call, VAE decode variants (bench/step_anatomy.py)
  fp8         the same in fp8 (fast): conversion and compile time, the same figures, the offload_text_encoder peak,
              and fp8 vs bf16 on the same prompts and seeds: latent relative error, PSNR and SSIM of the decoded
              images (torchmetrics; nothing that downloads weights)
  sizes_fp8   end to end, ms/step, VAE and peak at 512² .. 2048² and batch 1/2/4 at 1024² (and likewise below)
  fp8_lora    LoRAs in fp8 mode: apply/switch time (bf16's merged switch is measured in the bf16 section), ms/step
              with a LoRA on, all-off bit-identical; and what folding (dequantise + merge + re-quantise every
              targeted weight) would cost per switch instead
  sizes_bf16, sizes_comfyui, sizes_diffusers
              the same curve for bf16, ComfyUI's native graph in process (bench/comfy_inprocess.py) and diffusers'
              ZImagePipeline (eager); each system alone on the GPU while it is measured
Top-level keys: e2e_s, step_ms, vae_ms, peak_gib (bf16), fp8_e2e_s, fp8_step_ms, fp8_vae_ms, fp8_peak_gib,
fp8_offload_peak_gib, fp8_compile_s, fp8_psnr_db, fp8_ssim, fp8_latent_rel_err, sizes (one entry per size, batch and
system), plus the analytic share of attention in each step's FLOPs.

Weights from bench/build_model.py are RANDOM: latency and memory are real, images are noise, and the quality figures
(PSNR/SSIM/latent error) only say how far fp8 moves a random network, not how real images look.

--quality-only is the script for users with the real weights: it loads their files (ComfyUI's split files, or a
diffusers folder), makes each prompt x seed in bf16 and in fp8 (fast) on the same GPU, and writes PSNR, SSIM and the
latent error per image and on average, with both images as PNG side by side, to <out>/fp8-quality-<date>-<device>.*:
  python -m bench.fp8_cost --quality-only --comfyui ~/ComfyUI --out fp8_quality \\
      [--prompts my_prompts.txt] [--seeds 1,2,3] [--size 1024] [--policy default,conservative]
  python -m bench.fp8_cost --quality-only --model z_image_turbo_bf16.safetensors --text-encoder qwen_3_4b.safetensors \\
      --vae ae.safetensors --tokenizer ComfyUI/comfy/text_encoders/qwen25_tokenizer --out fp8_quality
It needs a GPU with fp8 tensor cores (compute capability 8.9+), torchao and torchmetrics (pip install torchao
torchmetrics) in the Python that runs it, and this repository's folder as the working directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3
SIZES = (512, 768, 1024, 1536, 2048)
BATCHES = (1, 2, 4)
QUICK_SIZES = (64, 96)
QUICK_BATCHES = (1, 2)
PROMPT = ("A cinematic portrait photograph of a young woman on the Bund in Shanghai at dusk, wearing an embroidered "
          "silk qipao, soft golden backlight, film grain, shallow depth of field, city lights on the river, "
          "孙珍妮,旗袍,上海外滩,黄昏,胶片颗粒, take {i}")
QUALITY_PROMPTS = (
    "a lighthouse on a cliff at dawn, waves breaking on the rocks, soft light, 灯塔, 清晨",
    "Sugar面部,纯欲甜妹脸部,淡颜系清甜长相,清透水光肌,微醺蜜桃腮红,薄涂裸粉唇釉",
    "a cat sitting on a windowsill, morning light, photo, 35mm, shallow depth of field",
    "一幅为名为造相的项目设计的创意海报, bold typography, neon colours, night market",
)
QUALITY_SEEDS = (11, 12)
QUICK_NOTE = "TINY random model on the CPU: a smoke run of the harness, not a benchmark"
SECTIONS = ("env", "bf16", "anatomy", "eager_anatomy", "fp8", "sizes_fp8", "fp8_lora", "sizes_bf16", "sizes_comfyui", "sizes_diffusers")
RANDOM_NOTE = ("RANDOM weights (bench/build_model.py): quality figures measure how far fp8 moves a random network, "
               "not how real images look; run --quality-only on the real weights for those")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attention_share(width: int, height: int, batch: int = 1, caption_tokens: int = 96, dim: int = 3840,
                    ffn: int = 10240) -> float:
    """Share of attention in the FLOPs of one main block: 4·s²·d over that plus 2·s·(4d² + 3d·ffn) (per image)."""
    image_tokens = (width // 16) * (height // 16)
    s = -(-image_tokens // 32) * 32 + caption_tokens
    attn = 4 * s * s * dim
    linear = 2 * s * (4 * dim * dim + 3 * dim * ffn)
    return attn / (attn + linear)


# ------------------------------------------------------------------ metrics


def image_metrics(pred: torch.Tensor, ref: torch.Tensor) -> dict:
    """PSNR (dB) and SSIM of images [B, H, W, 3] in 0..1, per image; torchmetrics, or PSNR by formula without it."""
    p = pred.permute(0, 3, 1, 2).float()
    r = ref.permute(0, 3, 1, 2).float()
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    except ImportError as exc:
        mse = ((p - r) ** 2).flatten(1).mean(1)
        psnr = [float("inf") if m == 0 else 10 * math.log10(1.0 / float(m)) for m in mse]
        return {"psnr_db": psnr, "ssim": [None] * len(psnr), "metrics": f"PSNR by formula; no SSIM ({exc})"}
    psnr, ssim = [], []
    for i in range(p.shape[0]):
        psnr.append(float(peak_signal_noise_ratio(p[i:i + 1], r[i:i + 1], data_range=1.0)))
        ssim.append(float(structural_similarity_index_measure(p[i:i + 1], r[i:i + 1], data_range=1.0)))
    import torchmetrics

    return {"psnr_db": psnr, "ssim": ssim, "metrics": f"torchmetrics {torchmetrics.__version__}"}


def latent_rel_err(pred: torch.Tensor, ref: torch.Tensor) -> list[float]:
    return [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(pred, ref)]


def finite_mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


# ------------------------------------------------------------------ sources


def find_source(root: Path):
    """The model under `root`: bench/build_model.py's split files, else the (one) diffusers folder in root/diffusers."""
    from devtools import graphs
    from zimage_turbo.engine.files.model_files import DiffusersFolder, SplitFiles

    split = [root / sub / name for sub, name in graphs.MODEL_FILES.items()]
    if all(p.is_file() for p in split) and (root / "qwen_tokenizer").is_dir():
        return SplitFiles(split[0], split[1], split[2], root / "qwen_tokenizer")
    folders = sorted(p for p in (root / "diffusers").glob("*") if (p / "model_index.json").is_file())
    if not folders:
        raise SystemExit(f"{root}: no model (split files of bench/build_model.py, or a diffusers folder in diffusers/)")
    return DiffusersFolder(folders[0])


def diffusers_folder(root: Path) -> Path | None:
    folders = sorted(p for p in (root / "diffusers").glob("*") if (p / "model_index.json").is_file())
    return folders[0] if folders else None


def user_source(args):
    """--quality-only: the user's files (--comfyui folder with the usual names, or each file named)."""
    from zimage_turbo.engine.files.model_files import DiffusersFolder, SplitFiles

    if args.model and Path(args.model).is_dir():
        return DiffusersFolder(Path(args.model))
    comfy = Path(args.comfyui).expanduser() if args.comfyui else None
    model = Path(args.model) if args.model else (comfy / "models" / "diffusion_models" / "z_image_turbo_bf16.safetensors"
                                                 if comfy else None)
    te = Path(args.text_encoder) if args.text_encoder else (comfy / "models" / "text_encoders" / "qwen_3_4b.safetensors"
                                                           if comfy else None)
    vae = Path(args.vae) if args.vae else (comfy / "models" / "vae" / "ae.safetensors" if comfy else None)
    tok = Path(args.tokenizer) if args.tokenizer else (comfy / "comfy" / "text_encoders" / "qwen25_tokenizer"
                                                       if comfy else None)
    missing = [n for n, p in (("--model", model), ("--text-encoder", te), ("--vae", vae), ("--tokenizer", tok))
               if p is None or not p.exists()]
    if missing:
        raise SystemExit(f"not found: {', '.join(missing)} (name the files, or --comfyui with the usual file names)")
    return SplitFiles(model, te, vae, tok)


# ------------------------------------------------------------------ the run


class Fp8Cost:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.quick = args.quick
        cuda = torch.cuda.is_available() and not args.quick
        self.device = torch.device("cuda:0" if cuda else "cpu")
        self.dtype = torch.bfloat16
        self.steps = 2 if args.quick else 8
        self.runs = 1 if args.quick else args.runs
        self.size = QUICK_SIZES[0] if args.quick else 1024
        self.sizes = QUICK_SIZES if args.quick else tuple(args.sizes)
        self.batches = QUICK_BATCHES if args.quick else tuple(args.batches)
        self.compile_mode = "off" if (args.quick or args.no_compile) else "on"
        self.counter = 0
        self.pipe = None
        self.refs = None  # bf16 reference (latents, images) of the quality prompts
        name = torch.cuda.get_device_name(self.device) if cuda else (platform.processor() or "cpu")
        stamp = dt.date.today().isoformat()
        slug = name.replace("NVIDIA ", "").replace(" ", "-").lower()
        prefix = "fp8-quality-" if args.quality_only else ""
        self.out_base = Path(args.out) / f"{prefix}{stamp}-{slug}{'-quick' if args.quick else ''}"
        self.res = {"title": "fp8 (fast) vs bf16, and the cost over image sizes (issue 11)", "date": stamp,
                    "device": name, "weights": (QUICK_NOTE if args.quick else RANDOM_NOTE) if not args.quality_only
                    else "the user's weights",
                    "settings": {"steps": self.steps, "runs": self.runs, "size": self.size, "compile": self.compile_mode,
                                 "policy": args.policy, "quick": args.quick},
                    "e2e_s": None, "step_ms": None, "vae_ms": None, "peak_gib": None,
                    "fp8_e2e_s": None, "fp8_step_ms": None, "fp8_vae_ms": None, "fp8_peak_gib": None,
                    "fp8_offload_peak_gib": None, "fp8_compile_s": None, "fp8_psnr_db": None, "fp8_ssim": None,
                    "fp8_latent_rel_err": None, "sizes": [], "sections": {}, "errors": {}, "skipped": {}}
        if args.merge_from:
            mine = {k: self.res[k] for k in ("date", "settings", "device", "title")}
            merge_into(self.res, json.loads(Path(args.merge_from).read_text()))
            self.res.update(mine, merged_from=str(args.merge_from))

    # -------------------------------------------------------------- output

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self) -> bool:
        return self.args.budget_s is not None and self.elapsed() > self.args.budget_s

    def save(self) -> None:
        self.out_base.parent.mkdir(parents=True, exist_ok=True)
        self.res["elapsed_s"] = self.elapsed()
        self.out_base.with_suffix(".json").write_text(json.dumps(self.res, indent=1, default=str, ensure_ascii=False))
        self.out_base.with_suffix(".md").write_text(render(self.res))
        try:
            plot(self.res, self.out_base.with_suffix(".png"))
        except Exception as exc:  # noqa: BLE001 - a plot never costs the figures
            self.res["errors"]["plot"] = f"{type(exc).__name__}: {exc}"

    def section(self, name: str, fn) -> None:
        wanted = self.args.sections
        if wanted and name not in wanted:
            return
        if self.out_of_time():
            self.res["skipped"][name] = f"time budget of {self.args.budget_s:.0f} s spent"
            print(f"=== {name}: skipped (time budget)", flush=True)
            self.save()
            return
        print(f"\n=== {name} ({self.elapsed():.0f} s in)", flush=True)
        t0 = time.perf_counter()
        try:
            out = fn()
            if out is not None:
                self.res["sections"][name] = out
        except Exception as exc:  # noqa: BLE001 - a failing section is reported, the others still run
            self.res["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
            print(self.res["errors"][name], flush=True)
        print(f"    ({time.perf_counter() - t0:.1f} s) "
              f"{json.dumps(self.res['sections'].get(name), default=str, ensure_ascii=False)[:500]}", flush=True)
        self.save()

    # -------------------------------------------------------------- engine

    def pipeline(self, fp8=None, memory="resident", compile_mode=None):
        from zimage_turbo.engine.sampling.pipeline import get_pipeline

        self.pipe = None  # a retired pipeline's weights must not stay alive through the switch
        free_memory(self.device)
        with torch.inference_mode():
            self.pipe = get_pipeline(self.source, self.device, self.dtype, memory, compile_mode or self.compile_mode,
                                     fp8=fp8)
        return self.pipe

    def request(self, size=None, batch=1, seed=None, prompt=None, steps=None):
        from zimage_turbo.engine.sampling.pipeline import GenerationRequest

        self.counter += 1
        size = size or self.size
        return GenerationRequest(prompt or PROMPT.format(i=self.counter), width=size, height=size,
                                 steps=steps or self.steps,
                                 seed=seed if seed is not None else 1000 + self.counter, batch_size=batch)

    def timed_generate(self, req, loras=(), memory=None):
        sync(self.device)
        t0 = time.perf_counter()
        result = self.pipe.generate(req, list(loras), memory=memory)
        sync(self.device)
        return time.perf_counter() - t0, result

    def measure(self, size=None, batch=1, runs=None, warm=1, memory=None) -> dict:
        """Median end to end (a new prompt and seed each run), ms/step, VAE and text-encode ms, peak GiB."""
        e2e, steps, vae, te, peaks = [], [], [], [], []
        for i in range(warm + (runs or self.runs)):
            free_memory(self.device)
            peak_reset(self.device)
            t, result = self.timed_generate(self.request(size, batch), memory=memory)
            if i < warm:
                continue
            rep = result.report
            e2e.append(t)
            steps += rep.step_s
            vae.append(rep.vae_decode_s)
            te.append(rep.text_encode_s)
            peaks.append(peak_gib(self.device))
        return {"e2e_s": median(e2e), "e2e_all_s": e2e, "step_ms": median(steps) * 1000, "vae_ms": median(vae) * 1000,
                "text_encode_ms": median(te) * 1000, "peak_gib": max(peaks) if peaks[0] is not None else None,
                "compile_path": result.report.compile_path, "runs": len(e2e)}

    def first_call(self) -> dict:
        """The first image on a fresh pipeline: with compile "on" it waits for the compile (every padding case)."""
        t, result = self.timed_generate(self.request())
        st = self.pipe.compile_status()
        out = {"first_image_s": t, "compile_path": result.report.compile_path, "compile_s": st.get("seconds"),
               "compile_state": st.get("state"), "compile_error": st.get("error"), "load_s": result.report.load_s}
        if self.compile_mode != "off":
            from torch._dynamo.utils import counters

            out["dynamo_unique_graphs"] = counters["stats"]["unique_graphs"]  # across the process, so far
        return out

    def quality_images(self, prompts, seeds, size) -> dict:
        out = {"latents": [], "images": []}
        for prompt in prompts:
            for seed in seeds:
                result = self.pipe.generate(self.request(size, 1, seed=seed, prompt=prompt))
                out["latents"].append(result.latents[0].cpu())
                out["images"].append(result.images[0].cpu())
        return out

    def compare(self, got: dict, ref: dict) -> dict:
        lat = latent_rel_err(got["latents"], ref["latents"])
        m = image_metrics(torch.stack(got["images"]), torch.stack(ref["images"]))
        return {"latent_rel_err": lat, "psnr_db": m["psnr_db"], "ssim": m["ssim"], "metrics": m["metrics"],
                "latent_rel_err_mean": finite_mean(lat), "psnr_db_mean": finite_mean(m["psnr_db"]),
                "ssim_mean": finite_mean(m["ssim"])}

    def compile_cache_files(self) -> dict:
        from zimage_turbo.engine.sampling import compile_cache

        folder = compile_cache.folder()
        if folder is None or not folder.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in sorted(folder.glob("*.bin"))}

    # ------------------------------------------------------------ sections

    def s_env(self) -> dict:
        from zimage_turbo.engine.sampling import fp8_mode

        import diffusers
        import transformers

        out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
               "transformers": transformers.__version__, "device": str(self.device),
               "source": self.source.describe()}
        try:
            out["torchao"] = fp8_mode.torchao_version()
        except Exception as exc:  # noqa: BLE001
            out["torchao"] = f"not usable: {str(exc)[:200]}"
        try:
            import torchmetrics

            out["torchmetrics"] = torchmetrics.__version__
        except ImportError:
            out["torchmetrics"] = None
        if self.device.type == "cuda":
            out["cuda"] = torch.version.cuda
            out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(self.device)))
            out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(self.device).total_memory / GIB, 1)
        out["fp8_unsupported_reason"] = fp8_mode.unsupported_reason(self.device)
        out["policy"] = self.policy.describe()
        return out

    def s_bf16(self) -> dict:
        t0 = time.perf_counter()
        self.pipeline()
        out = {"get_pipeline_s": time.perf_counter() - t0}
        out["first_call"] = self.first_call()
        out["compile_cache_files"] = self.compile_cache_files()
        out["at_size"] = self.measure()
        if self.device.type == "cuda":
            from bench import step_anatomy

            out["text_encode"] = step_anatomy.text_encode_profile(self.pipe, True)
        self.refs = self.quality_images(self.quality_prompts, self.quality_seeds, self.size)
        out["quality_refs"] = len(self.refs["images"])
        out["lora"] = self.lora_switches()
        self.res["bf16_lora_switch_ms"] = out["lora"].get("switch_file_ms")
        r = out["at_size"]
        self.res.update(e2e_s=r["e2e_s"], step_ms=r["step_ms"], vae_ms=r["vae_ms"], peak_gib=r["peak_gib"],
                        bf16_compile_s=out["first_call"]["compile_s"])
        self.res["sizes"].append(self.size_entry("ours-bf16", self.size, 1, r))
        return out

    def s_anatomy(self) -> dict:
        """bf16: one step's kernels by kind, GPU idle per step, CUDA graphs for the step, VAE decode variants."""
        from bench import step_anatomy

        if self.pipe is None or self.pipe.fp8 is not None:
            self.pipeline()
            self.first_call()
        cuda = self.device.type == "cuda"
        out = {"profile": step_anatomy.profile_steps(self.pipe, self.request, cuda,
                                                     steps=(self.steps, max(1, self.steps // 2)))}
        self.save()
        out["text_encode"] = step_anatomy.text_encode_profile(self.pipe, cuda)
        out["cuda_graphs"] = step_anatomy.cuda_graph_step(self.pipe, self.size) if cuda else {"skipped": "CPU"}
        out["vae"] = step_anatomy.vae_variants(self.pipe, self.size, cuda)
        return out

    def s_eager_anatomy(self) -> dict:
        """The eager bf16 step: what a first image after a start runs, and every image until the background compile
        is ready. With our attention processor (installed on the "auto" path before its compile is ready) and with
        diffusers' own; kernels by kind, GPU busy against the step's wall time, and the step without the profiler."""
        from bench import step_anatomy
        from zimage_turbo.engine.sampling import fast_attention

        cuda = self.device.type == "cuda"
        pipe = self.pipeline(compile_mode="off")
        out = {}
        for name, ours in (("fast_attention", True), ("diffusers_attention", False)):
            (fast_attention.install if ours else fast_attention.uninstall)(pipe.transformer)
            prof = step_anatomy.profile_steps(pipe, self.request, cuda, steps=(self.steps, max(1, self.steps // 2)))
            plain = [pipe.generate(self.request()).report for _ in range(3)]
            steps = sorted(s for r in plain for s in r.step_s[1:])
            prof["step_ms_unprofiled"] = 1000 * steps[len(steps) // 2]
            prof["e2e_s_unprofiled"] = sorted(r.total_s for r in plain)[1]
            out[name] = prof
            self.save()
        fast_attention.uninstall(pipe.transformer)
        self.pipe = None
        return out

    def fp8_refusal(self) -> str | None:
        from zimage_turbo.engine.errors import Fp8UnsupportedError
        from zimage_turbo.engine.sampling import fp8_mode

        try:
            fp8_mode.check_supported(self.device, self.dtype, "resident")
        except Fp8UnsupportedError as exc:
            return str(exc)
        return None

    def s_fp8(self) -> dict:
        refused = self.fp8_refusal()
        if refused:
            self.res["fp8_refused"] = refused
            return {"refused": refused}
        t0 = time.perf_counter()
        self.pipeline(fp8=self.policy)
        out = {"convert_s": time.perf_counter() - t0, "summary": self.pipe.fp8_summary,
               "transformer_gib": sum(_bytes(p) for p in self.pipe.transformer.parameters()) / GIB}
        out["first_call"] = self.first_call()
        out["compile_cache_files"] = self.compile_cache_files()
        out["at_size"] = r = self.measure()
        self.res.update(fp8_e2e_s=r["e2e_s"], fp8_step_ms=r["step_ms"], fp8_vae_ms=r["vae_ms"],
                        fp8_peak_gib=r["peak_gib"], fp8_compile_s=out["first_call"]["compile_s"])
        self.res["sizes"].append(self.size_entry("ours-fp8", self.size, 1, r))
        self.save()
        if self.refs is not None:
            got = self.quality_images(self.quality_prompts, self.quality_seeds, self.size)
            q = self.compare(got, self.refs)
            q["note"] = self.res["weights"]
            out["quality"] = q
            self.res.update(fp8_psnr_db=q["psnr_db_mean"], fp8_ssim=q["ssim_mean"],
                            fp8_latent_rel_err=q["latent_rel_err_mean"])
            self.save()
        if self.device.type == "cuda":
            from bench import step_anatomy

            out["text_encode"] = step_anatomy.text_encode_profile(self.pipe, True)  # the fp8-weight encoder's
            off = self.measure(memory="offload_text_encoder", runs=max(1, self.runs // 2))
            out["offload_text_encoder"] = off
            self.res["fp8_offload_peak_gib"] = off["peak_gib"]
            self.measure(memory="resident", runs=1, warm=0)  # back to resident for what follows
        return out

    def s_fp8_lora(self) -> dict:
        from zimage_turbo.engine.lora import LORA_FILES, LoraSpec
        from zimage_turbo.engine.sampling import fp8_mode

        if self.res.get("fp8_refused"):
            return {"refused": self.res["fp8_refused"]}
        if self.pipe is None or self.pipe.fp8 is None:
            self.pipeline(fp8=self.policy)
        files = self.lora_files()
        if len(files) < 2:
            return {"skipped": "fewer than two LoRA files under the root's loras/"}
        a, b = files[0], files[1]
        pipe = self.pipe
        before = {n: (q.clone(), s.clone()) for n, (q, s) in fp8_mode.fp8_state(pipe.transformer).items()}
        same = self.request()
        base = pipe.generate(same).images
        LORA_FILES.clear()
        t_first, first = self.timed_generate(self.request(), [LoraSpec(a, 0.8)])
        out = {"first_apply_s": first.report.lora_s, "path": first.report.lora_path,
               "why": first.report.lora_why_adapters, "first_e2e_s": t_first}
        strength, switch, steps_on, steps_off, e2e_on = [], [], [], [], []
        for i in range(max(2, self.runs)):
            t, r = self.timed_generate(self.request(), [LoraSpec(a, 0.5 + 0.1 * i)])
            strength.append(r.report.lora_s)
            steps_on += r.report.step_s
            e2e_on.append(t)
            _, r = self.timed_generate(self.request(), [LoraSpec(b if i % 2 == 0 else a, 0.8)])
            switch.append(r.report.lora_s)
            _, r = self.timed_generate(self.request(), [])
            steps_off += r.report.step_s
        off = pipe.generate(same, []).images
        after = fp8_mode.fp8_state(pipe.transformer)
        identical = all(torch.equal(after[n][0].view(torch.uint8), q.view(torch.uint8)) and torch.equal(after[n][1], s)
                        for n, (q, s) in before.items())
        out.update(strength_change_ms=median(strength) * 1000, switch_file_ms=median(switch) * 1000,
                   step_ms_lora_on=median(steps_on) * 1000, step_ms_lora_off=median(steps_off) * 1000,
                   e2e_lora_on_s=median(e2e_on), all_off_image_bit_identical=bool(torch.equal(off, base)),
                   fp8_weights_bit_identical=identical)
        out["fold_requant"] = fold_requant_cost(pipe, a)
        self.res.update(fp8_lora_switch_ms=out["switch_file_ms"], fp8_lora_step_ms=out["step_ms_lora_on"],
                        fold_requant_ms=out["fold_requant"].get("ms"))
        return out

    def lora_files(self) -> list[Path]:
        folder = Path(self.args.root) / "loras"
        preferred = [folder / n for n in ("style_a_r32.safetensors", "style_b_r32.safetensors",
                                          "tiny_diffusers.safetensors", "tiny_kohya_fused.safetensors")]
        return [p for p in preferred if p.is_file()] or sorted(folder.glob("*.safetensors"))

    def lora_switches(self) -> dict:
        """bf16 for comparison: a strength change and a switch of file (merged: no recompile), then all off."""
        from zimage_turbo.engine.lora import LoraSpec

        files = self.lora_files()
        if len(files) < 2:
            return {"skipped": "fewer than two LoRA files under the root's loras/"}
        a, b = files[0], files[1]
        self.timed_generate(self.request(), [LoraSpec(a, 0.8)])  # read, on the device, merged once
        strength, switch, steps_on = [], [], []
        for i in range(max(2, self.runs)):
            _, r = self.timed_generate(self.request(), [LoraSpec(a, 0.5 + 0.1 * i)])
            strength.append(r.report.lora_s)
            steps_on += r.report.step_s
            _, r = self.timed_generate(self.request(), [LoraSpec(b if i % 2 == 0 else a, 0.8)])
            switch.append(r.report.lora_s)
        _, r = self.timed_generate(self.request(), [])
        return {"path": r.report.lora_path or "merged", "strength_change_ms": median(strength) * 1000,
                "switch_file_ms": median(switch) * 1000, "step_ms_lora_on": median(steps_on) * 1000,
                "all_off_ms": r.report.lora_s * 1000}

    def size_entry(self, system: str, size: int, batch: int, r: dict) -> dict:
        return {"system": system, "width": size, "height": size, "batch": batch, "e2e_s": r.get("e2e_s"),
                "step_ms": r.get("step_ms"), "vae_ms": r.get("vae_ms"), "peak_gib": r.get("peak_gib"),
                "attention_share_flops": attention_share(size, size)}

    def sweep(self, system: str, run_one) -> dict:
        """run_one(size, batch) -> figures, for every size (batch 1) and every batch at the main size."""
        cases = [(s, 1) for s in self.sizes] + [(self.size, b) for b in self.batches if b != 1]
        done = {(e["system"], e["width"], e["batch"]) for e in self.res["sizes"]}
        out = {}
        for size, batch in cases:
            key = f"{size}x{size}xb{batch}"
            if (system, size, batch) in done:
                out[key] = "measured above"
                continue
            if self.out_of_time():
                out[key] = "skipped: time budget spent"
                continue
            try:
                r = run_one(size, batch)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at 2048² batch 4: the next case still runs
                out[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
                free_memory(self.device)
                continue
            out[key] = r
            self.res["sizes"].append(self.size_entry(system, size, batch, r))
            print(f"    {system} {key}: {r.get('e2e_s')}", flush=True)
            self.save()
        return out

    def runs_at(self, size: int) -> int:
        return 1 if size >= 1536 else self.runs

    def s_sizes_ours(self, fp8: bool):
        if fp8:
            if self.res.get("fp8_refused"):
                return {"refused": self.res["fp8_refused"]}
            if self.pipe is None or self.pipe.fp8 is None:
                self.pipeline(fp8=self.policy)
        else:
            if self.pipe is None or self.pipe.fp8 is not None:
                t0 = time.perf_counter()
                self.pipeline()
                self.first_call()
                self.res["bf16_switch_back_s"] = time.perf_counter() - t0
        return self.sweep("ours-fp8" if fp8 else "ours-bf16",
                          lambda size, batch: self.measure(size, batch, runs=self.runs_at(size)))

    def s_sizes_comfyui(self):
        if self.quick:
            return {"skipped": "ComfyUI's loaders need the true-size model"}
        from bench.comfy_inprocess import InProcessComfy, link_models
        from devtools import graphs
        from zimage_turbo.engine.sampling import pipeline

        self.pipe = None
        pipeline.release_all()
        free_memory(self.device)
        base = Path(self.args.work) / "comfy_base"
        link_models(base, self.args.root)
        cf = InProcessComfy(Path(self.args.comfy_dir), base, [])

        def one(size, batch):
            times, peaks = [], []
            for i in range(1 + self.runs_at(size)):
                self.counter += 1
                graph = graphs.native_graph(prompt=PROMPT.format(i=self.counter), seed=2000 + self.counter, width=size,
                                            height=size, steps=self.steps)
                graph[graphs.NATIVE["latent"]]["inputs"]["batch_size"] = batch
                peak_reset(self.device)
                t = cf.run(graph, [graphs.NATIVE["decode"]], executor="native")
                if i:
                    times.append(t)
                    peaks.append(peak_gib(self.device))
            return {"e2e_s": median(times), "e2e_all_s": times, "peak_gib": max(peaks), "step_ms": None, "vae_ms": None}

        try:
            return self.sweep("comfyui", one)
        finally:
            import comfy.model_management as mm

            cf.executors.clear()
            mm.unload_all_models()
            mm.soft_empty_cache()
            free_memory(self.device)

    def s_sizes_diffusers(self):
        from diffusers import ZImagePipeline

        from zimage_turbo.engine.sampling import pipeline

        folder = diffusers_folder(self.args.root)
        if folder is None:
            return {"skipped": "no diffusers folder under the root"}
        self.pipe = None
        pipeline.release_all()
        free_memory(self.device)
        d = ZImagePipeline.from_pretrained(str(folder), torch_dtype=self.dtype).to(self.device)
        d.set_progress_bar_config(disable=True)

        def one(size, batch):
            times, peaks = [], []
            for i in range(1 + self.runs_at(size)):
                self.counter += 1
                gen = torch.Generator("cpu").manual_seed(3000 + self.counter)
                peak_reset(self.device)
                sync(self.device)
                t0 = time.perf_counter()
                d(prompt=PROMPT.format(i=self.counter), height=size, width=size, num_inference_steps=self.steps,
                  guidance_scale=0.0, generator=gen, num_images_per_prompt=batch, output_type="pt")
                sync(self.device)
                if i:
                    times.append(time.perf_counter() - t0)
                    peaks.append(peak_gib(self.device))
            return {"e2e_s": median(times), "e2e_all_s": times, "peak_gib": max(peaks) if peaks[0] is not None else None,
                    "step_ms": None, "vae_ms": None}

        try:
            return self.sweep("diffusers", one)
        finally:
            d = one = None  # the pipeline's 20 GB go before anything else runs
            free_memory(self.device)

    # --------------------------------------------------------------- main

    def run(self) -> None:
        args = self.args
        from zimage_turbo.engine.sampling import compile_cache, fp8_mode

        if not os.environ.get(compile_cache.ENV_VAR):
            compile_cache.configure(Path(args.work) / "compile_cache")
        self.policy = fp8_mode.policy_named(args.policy)
        self.source = find_source(Path(args.root))
        self.quality_prompts = QUALITY_PROMPTS[:2] if self.quick else QUALITY_PROMPTS
        self.quality_seeds = QUALITY_SEEDS[:1] if self.quick else QUALITY_SEEDS
        print(f"device {self.res['device']}; out {self.out_base}", flush=True)
        self.section("env", self.s_env)
        self.section("bf16", self.s_bf16)
        self.section("anatomy", self.s_anatomy)
        self.section("eager_anatomy", self.s_eager_anatomy)
        self.section("fp8", self.s_fp8)
        self.section("sizes_fp8", lambda: self.s_sizes_ours(True))
        self.section("fp8_lora", self.s_fp8_lora)  # its first LoRA compiles the adapter variant: after the curve
        self.section("sizes_bf16", lambda: self.s_sizes_ours(False))
        self.section("sizes_comfyui", self.s_sizes_comfyui)
        self.section("sizes_diffusers", self.s_sizes_diffusers)
        print(f"\nwrote {self.out_base}.json, .md and .png ({self.elapsed():.0f} s)", flush=True)

    def run_quality_only(self) -> None:
        """The user's weights: bf16 and fp8 (fast) images of the same prompts and seeds, and their distance."""
        from zimage_turbo.engine.sampling import fp8_mode

        args = self.args
        self.source = user_source(args)
        refused = self.fp8_refusal()
        if refused:
            raise SystemExit(refused)
        prompts = ([line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
                   if args.prompts else list(QUALITY_PROMPTS))
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
        size = args.size
        policies = [fp8_mode.policy_named(p.strip()) for p in args.policy.split(",") if p.strip()]
        self.res["settings"].update(prompts=prompts, seeds=seeds, size=size, policies=[p.name for p in policies])
        self.res["weights"] = f"the user's files: {self.source.describe()}"
        img_dir = self.out_base.parent / (self.out_base.name + "-images")
        img_dir.mkdir(parents=True, exist_ok=True)
        self.compile_mode = args.quality_compile
        self.policy = policies[0]
        self.section("env", self.s_env)
        self.pipeline()
        self.refs = self.quality_images(prompts, seeds, size)
        save_pngs(self.refs["images"], img_dir, "bf16")
        for policy in policies:
            self.policy = policy
            self.pipeline(fp8=policy)
            got = self.quality_images(prompts, seeds, size)
            save_pngs(got["images"], img_dir, f"fp8-{policy.name}")
            q = self.compare(got, self.refs)
            q["summary"] = self.pipe.fp8_summary
            q["cases"] = [{"prompt": p, "seed": s} for p in prompts for s in seeds]
            self.res["sections"][f"quality_{policy.name}"] = q
            if policy is policies[0]:
                self.res.update(fp8_psnr_db=q["psnr_db_mean"], fp8_ssim=q["ssim_mean"],
                                fp8_latent_rel_err=q["latent_rel_err_mean"])
            print(f"{policy.name}: PSNR {_f(q['psnr_db_mean'], '{:.2f} dB', 'identical')}, SSIM "
                  f"{_f(q['ssim_mean'], '{:.4f}')}, latent error {_f(q['latent_rel_err_mean'], '{:.4f}')}", flush=True)
            self.save()
        print(f"wrote {self.out_base}.json / .md and the images in {img_dir}", flush=True)


def _bytes(t) -> int:
    from zimage_turbo.engine.sampling import fp8_mode

    return fp8_mode.tensor_bytes(t)


def save_pngs(images, folder: Path, tag: str) -> None:
    import numpy as np
    from PIL import Image

    for i, img in enumerate(images):
        arr = (img.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:02d}-{tag}.png")


def fold_requant_cost(pipe, lora_path: Path) -> dict:
    """What the other LoRA design would cost per switch: for every fp8 weight the LoRA targets, dequantise, add
    B·A (one GEMM) and quantise again (torchao's own row quantiser). Timed only; the weights are not changed."""
    from zimage_turbo.engine.sampling import fp8_mode

    try:
        from torchao.quantization import Float8Tensor
        from torchao.quantization.granularity import PerRow
    except ImportError as exc:
        return {"skipped": f"torchao: {exc}"}
    lora = pipe.tstate.lora
    parsed, _ = lora.files.get(lora_path, lora.modules, lora.signature, lora.biased)
    tensors = lora._on_device(parsed)
    fp8_layers = {n: layer for n, layer in lora.linears.items() if fp8_mode.is_fp8(layer.weight)}
    todo = [(fp8_layers[m], e) for m, e in tensors.items() if m in fp8_layers and e.down is not None]
    if not todo:
        return {"skipped": "the LoRA targets no fp8 layer"}
    dev = pipe.device

    def once():
        for layer, e in todo:
            w = layer.weight.dequantize().float()
            w.addmm_(e.up.float(), e.down.float())
            Float8Tensor.from_hp(w.to(torch.bfloat16), granularity=PerRow())

    with torch.inference_mode():
        once()
        sync(dev)
        t0 = time.perf_counter()
        once()
        sync(dev)
    spare = sum(fp8_mode.tensor_bytes(layer.weight) for layer, _ in todo)
    return {"ms": (time.perf_counter() - t0) * 1000, "layers": len(todo), "spare_copy_gib": spare / GIB,
            "note": "dequantise + merge + re-quantise every fp8 weight the LoRA targets, once; exact restore would "
                    "also need this spare copy of the fp8 weights"}


# -------------------------------------------------------------- markdown, plot


def _f(x, fmt="{:.2f}", none="n/a"):
    return none if x is None else fmt.format(x)


def render(res: dict) -> str:
    s = res.get("sections", {})
    lines = [f"# {res.get('title')}", "", f"- **Date:** {res.get('date')}  **Device:** {res.get('device')}",
             f"- **Weights:** {res.get('weights')}",
             f"- **Settings:** {json.dumps(res.get('settings'), ensure_ascii=False)}",
             f"- **Software:** {json.dumps(s.get('env', {}), ensure_ascii=False)}", ""]
    if res.get("fp8_refused"):
        lines += [f"**fp8 (fast) refused here:** {res['fp8_refused']}", ""]
    st = res.get("settings", {})
    lines += [f"## {st.get('size')}², {st.get('steps')} steps, batch 1 (targets at 1024², 8 steps: bf16 ≤ 0.75 s, "
              "≤ 85 ms/step, VAE ≤ 35 ms; fp8 ≤ 0.62 s, ≤ 14 GiB)", "",
              "| | end to end | per step | VAE decode | peak allocated | compile |", "|---|---|---|---|---|---|",
              f"| bf16 | {_f(res.get('e2e_s'), '{:.3f} s')} | {_f(res.get('step_ms'), '{:.1f} ms')} | "
              f"{_f(res.get('vae_ms'), '{:.1f} ms')} | {_f(res.get('peak_gib'), '{:.1f} GiB')} | "
              f"{_f(res.get('bf16_compile_s'), '{:.0f} s')} |",
              f"| fp8 (fast) | {_f(res.get('fp8_e2e_s'), '{:.3f} s')} | {_f(res.get('fp8_step_ms'), '{:.1f} ms')} | "
              f"{_f(res.get('fp8_vae_ms'), '{:.1f} ms')} | {_f(res.get('fp8_peak_gib'), '{:.1f} GiB')} "
              f"(offload_text_encoder: {_f(res.get('fp8_offload_peak_gib'), '{:.1f} GiB')}) | "
              f"{_f(res.get('fp8_compile_s'), '{:.0f} s')} |", ""]
    fp8 = s.get("fp8", {})
    if fp8.get("summary"):
        lines += [f"- {fp8['summary']}", f"- transformer weights in fp8 mode: {_f(fp8.get('transformer_gib'))} GiB; "
                  f"conversion {_f(fp8.get('convert_s'))} s", ""]
    q = fp8.get("quality") or {}
    for key, sec in s.items():
        if key.startswith("quality_"):
            q = sec
            lines += [f"### {key}: {sec.get('summary', '')}", ""]
    if q:
        lines += ["## fp8 vs bf16, same prompts and seeds", "", f"_{q.get('note', res.get('weights'))}_", "",
                  f"- latent relative error: mean {_f(q.get('latent_rel_err_mean'), '{:.4f}')} "
                  f"({', '.join(_f(x, '{:.4f}') for x in q.get('latent_rel_err', []))})",
                  f"- PSNR: mean {_f(q.get('psnr_db_mean'), '{:.2f} dB')} "
                  f"({', '.join(_f(x, '{:.1f}') for x in q.get('psnr_db', []))})",
                  f"- SSIM: mean {_f(q.get('ssim_mean'), '{:.4f}')} ({q.get('metrics')})", ""]
    lines += render_anatomy(s.get("anatomy") or {})
    lines += render_eager_anatomy(s.get("eager_anatomy") or {})
    lo = s.get("fp8_lora") or {}
    if lo and "strength_change_ms" in lo:
        fr = lo.get("fold_requant") or {}
        lines += ["## LoRAs in fp8 mode (bf16 beside the fp8 product)", "",
                  f"- path: {lo.get('path')} ({lo.get('why')})",
                  f"- strength change {_f(lo.get('strength_change_ms'), '{:.1f} ms')}, other file "
                  f"{_f(lo.get('switch_file_ms'), '{:.1f} ms')} (bf16, merged: "
                  f"{_f(res.get('bf16_lora_switch_ms'), '{:.1f} ms')}), first apply "
                  f"{_f(lo.get('first_apply_s'), '{:.2f} s')}",
                  f"- per step: LoRA on {_f(lo.get('step_ms_lora_on'), '{:.1f} ms')}, off "
                  f"{_f(lo.get('step_ms_lora_off'), '{:.1f} ms')}",
                  f"- all off: image bit-identical {lo.get('all_off_image_bit_identical')}, fp8 weights bit-identical "
                  f"{lo.get('fp8_weights_bit_identical')}",
                  f"- folding instead (dequantise + merge + re-quantise {fr.get('layers')} layers): "
                  f"{_f(fr.get('ms'), '{:.0f} ms')} per switch, plus a {_f(fr.get('spare_copy_gib'))} GiB spare copy",
                  ""]
    if res.get("sizes"):
        lines += ["## Cost over sizes", "",
                  "| system | size | batch | end to end | per step | VAE | peak | attention share of a block's FLOPs |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in sorted(res["sizes"], key=lambda e: (e["system"], e["batch"], e["width"])):
            lines.append(f"| {e['system']} | {e['width']}² | {e['batch']} | {_f(e.get('e2e_s'), '{:.3f} s')} | "
                         f"{_f(e.get('step_ms'), '{:.1f} ms')} | {_f(e.get('vae_ms'), '{:.1f} ms')} | "
                         f"{_f(e.get('peak_gib'), '{:.1f} GiB')} | {_f(e.get('attention_share_flops'), '{:.0%}')} |")
        lines += ["", "Attention's FLOPs pass the Linear layers' at about 23,000 tokens per image (~2400²); weighted by "
                  "what each runs at (cuDNN attention ~585 TFLOP/s vs bf16 GEMMs ~760, fp8 ~1200), attention's time "
                  "passes the GEMMs' from ~2100² in bf16 and ~1700² in fp8 (analytic; the per-step times above are "
                  "the measurement).", ""]
    if res.get("notes"):
        lines += ["## Notes (by hand)", ""] + [f"- {n}" for n in res["notes"]] + [""]
    for key in ("skipped", "errors"):
        if res.get(key):
            lines += [f"## {key}", ""] + [f"- {k}: {str(v).splitlines()[0][:300]}" for k, v in res[key].items()] + [""]
    return "\n".join(lines)


KIND_ORDER = ("gemm", "attention", "conv", "triton_fused", "copy", "other")


def render_eager_anatomy(a: dict) -> list[str]:
    if not a:
        return []
    lines = ["## The eager bf16 step (first images, and images while the background compile runs)", "",
             "| | " + " | ".join(KIND_ORDER) + " | GPU busy | step wall (profiled) | idle | step unprofiled (ms) "
             "| end to end unprofiled (s) |", "|---|" + "---:|" * (len(KIND_ORDER) + 5)]
    for name, p in a.items():
        if not isinstance(p, dict) or "per_step_ms" not in p:
            continue
        ps = p["per_step_ms"]
        lines.append(f"| {name} | " + " | ".join(_f(ps.get(k), "{:.1f}") for k in KIND_ORDER)
                     + f" | {_f(p.get('busy_ms_per_step'), '{:.1f}')} | {_f(p.get('step_wall_ms'), '{:.1f}')} | "
                     f"{_f(p.get('idle_ms_per_step'), '{:.1f}')} | {_f(p.get('step_ms_unprofiled'), '{:.1f}')} | "
                     f"{_f(p.get('e2e_s_unprofiled'), '{:.3f}')} |")
    for name, p in a.items():
        if isinstance(p, dict) and p.get("top_kernels_per_step"):
            lines.append(f"- {name}, top kernels per step: " + "; ".join(
                f"{x['name'][:60]} ({x['kind']}) {_f(x['ms'], '{:.2f}')} ms" for x in p["top_kernels_per_step"][:8]))
    return lines + [""]


def render_anatomy(a: dict) -> list[str]:
    if not a.get("profile"):
        return []
    p = a["profile"]
    ps = p.get("per_step_ms") or {}
    lines = ["## Where a bf16 step goes (profile)", "", f"_{p.get('how')}_", "",
             "| kind | ms per step |", "|---|---:|"]
    lines += [f"| {k} | {_f(v, '{:.1f}')} |" for k, v in ps.items()]
    lines += [f"| **GPU busy** | {_f(p.get('busy_ms_per_step'), '{:.1f}')} |",
              f"| step wall (CUDA events) | {_f(p.get('step_wall_ms'), '{:.1f}')} |",
              f"| idle (launch gaps) | {_f(p.get('idle_ms_per_step'), '{:.1f}')} |", "",
              "Outside the steps (text encode + decode), ms by kind: "
              + ", ".join(f"{k} {_f(v, '{:.1f}')}" for k, v in (p.get("outside_steps_ms") or {}).items()), "",
              "Top kernels per step: " + "; ".join(f"{x['name'][:60]} ({x['kind']}) {_f(x['ms'], '{:.2f}')} ms"
                                                   for x in (p.get("top_kernels_per_step") or [])[:10]), ""]
    g = a.get("cuda_graphs") or {}
    if g:
        lines += [f"- CUDA graph of one step's denoiser call: normal {_f(g.get('normal_ms'), '{:.1f} ms')}, replay "
                  f"{_f(g.get('graph_ms'), '{:.1f} ms')} (saves {_f(g.get('saved_ms_per_step'), '{:.1f} ms')} a "
                  f"step; bit-identical {g.get('bit_identical')}, max diff {g.get('max_abs_diff_vs_normal')})"
                  + (f"; capture failed: {g['capture_error']}" if g.get("capture_error") else "")
                  + (f"; {g['skipped']}" if g.get("skipped") else "")]
    te = a.get("text_encode") or {}
    if te:
        lines += [f"- text encode of a new {te.get('tokens')}-token prompt ({'compiled' if te.get('compiled') else 'eager'}): "
                  f"{_f(te.get('wall_ms'), '{:.1f} ms')} wall; under the profiler {_f(te.get('profiled_wall_ms'), '{:.1f} ms')} "
                  f"of which the GPU was busy {_f(te.get('gpu_busy_ms'), '{:.1f} ms')} ({te.get('kernels')} kernels: "
                  + ", ".join(f"{k} {_f(x, '{:.1f}')}" for k, x in (te.get("kernels_ms") or {}).items()) + ")"]
    v = a.get("vae") or {}
    if v:
        lines += [f"- VAE decode: as run {_f(v.get('as_run_ms'), '{:.1f} ms')} (kernels: "
                  + ", ".join(f"{k} {_f(x, '{:.1f}')}" for k, x in (v.get("as_run_kernels_ms") or {}).items())
                  + f"), eager {_f(v.get('eager_ms'), '{:.1f} ms')}, channels-last eager "
                  f"{_f(v.get('channels_last_eager_ms'), '{:.1f} ms')}, channels-last compiled "
                  f"{_f(v.get('channels_last_compiled_ms'), '{:.1f} ms')} (max diff "
                  f"{v.get('channels_last_max_abs_diff')})"]
    return lines + [""]


def plot(res: dict, path: Path) -> None:
    entries = [e for e in res.get("sizes", []) if e.get("batch") == 1 and e.get("e2e_s") is not None]
    if not entries:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in sorted({e["system"] for e in entries}):
        pts = sorted((e["width"] * e["height"] / 1e6, e["e2e_s"], e.get("peak_gib")) for e in entries
                     if e["system"] == system)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
        if any(p[2] is not None for p in pts):
            ax2.plot([p[0] for p in pts if p[2] is not None], [p[2] for p in pts if p[2] is not None], marker="o",
                     label=system)
    ax1.set(xlabel="megapixels (batch 1)", ylabel="end to end, s", title="time per image", yscale="log")
    ax2.set(xlabel="megapixels (batch 1)", ylabel="peak allocated, GiB", title="memory")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no GPU memory figures (CPU run)", ha="center", transform=ax.transAxes)
    fig.suptitle(f"{res.get('device')} — {res.get('date')} (random weights)" if "RANDOM" in str(res.get("weights"))
                 else f"{res.get('device')} — {res.get('date')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, help="model folder written by bench/build_model.py (or any with diffusers/)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--work", default="/tmp/zimage_fp8_work")
    ap.add_argument("--comfy-dir", default=str(REPO / ".build" / "ComfyUI"))
    ap.add_argument("--runs", type=int, default=3, help="timed runs per case (1536² and up: 1)")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.replace("+", ",").split(",")], default=list(SIZES))
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.replace("+", ",").split(",")], default=list(BATCHES))
    ap.add_argument("--policy", default="default", help="fp8 policy (engine/sampling/fp8_mode.py POLICIES); "
                    "--quality-only takes a comma list to compare")
    ap.add_argument("--sections", type=lambda s: set(s.replace("+", ",").split(",")), default=None,
                    help=f"only these sections ({', '.join(SECTIONS)}); env always helps the others")
    ap.add_argument("--merge-from", type=Path, help="start from an earlier run's JSON (its figures are kept)")
    ap.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                    help="no run: merge these results (later ones win) into <out>/<first's name>.json/.md/.png")
    ap.add_argument("--budget-s", type=float, default=None, help="skip what starts after this many seconds")
    ap.add_argument("--no-compile", action="store_true", help="eager only (compile off)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on the tiny model: fp8 refused, no ComfyUI")
    q = ap.add_argument_group("--quality-only (your own weights)")
    q.add_argument("--quality-only", action="store_true")
    q.add_argument("--comfyui", help="a ComfyUI folder holding the usual file names")
    q.add_argument("--model", help="z_image_turbo_bf16.safetensors, or a diffusers folder")
    q.add_argument("--text-encoder")
    q.add_argument("--vae")
    q.add_argument("--tokenizer", help="the Qwen tokenizer folder (ComfyUI/comfy/text_encoders/qwen25_tokenizer)")
    q.add_argument("--prompts", help="a text file, one prompt per line")
    q.add_argument("--seeds", default="1,2")
    q.add_argument("--size", type=int, default=1024)
    q.add_argument("--quality-compile", default="off", choices=("off", "on"),
                   help="compile both (off: the eager paths, precision alone differs)")
    args = ap.parse_args(argv)
    if not args.quality_only and args.root is None and not args.render:
        ap.error("--root is required (or --quality-only with your files)")
    if args.sections and "env" not in args.sections:
        args.sections.add("env")
    return args


def merge_into(res: dict, part: dict) -> dict:
    """`part`'s figures into `res`: size entries by (system, size, batch), sections by name; a null never
    overwrites a figure."""
    for k, v in part.items():
        if k == "sizes":
            keep = {(e["system"], e["width"], e["batch"]) for e in v}
            res["sizes"] = [e for e in res.get("sizes", []) if (e["system"], e["width"], e["batch"]) not in keep] + v
        elif isinstance(v, dict) and isinstance(res.get(k), dict):
            res[k] = {**res[k], **v}
        elif v is not None or k not in res:
            res[k] = v
    return res


def merge_results(paths) -> dict:
    """Results of several calls (e.g. ours in one, ComfyUI and diffusers in the next) as one: later figures win."""
    res: dict = {}
    for path in paths:
        merge_into(res, json.loads(Path(path).read_text()))
    res["merged_from"] = [Path(p).name for p in paths]
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        res = merge_results(args.render)
        base = Path(args.out) / Path(args.render[0]).stem
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str, ensure_ascii=False))
        base.with_suffix(".md").write_text(render(res))
        plot(res, base.with_suffix(".png"))
        print(f"wrote {base}.json, .md and .png")
        return 0
    run = Fp8Cost(args)
    if args.quality_only:
        run.run_quality_only()
    else:
        run.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
