"""Side-by-side benchmark on one GPU, in one process, alternating between the systems:

  (a) diffusers  ZImagePipeline.from_pretrained(...).to("cuda"), eager bf16, as documented
  (b) comfyui    ComfyUI 0.3.75's own Z-Image graph (UNETLoader -> ModelSamplingAuraFlow 3 ->
                 KSampler 8 steps cfg 1 res_multistep simple; CLIPLoader lumina2; VAELoader;
                 VAEDecode), run by ComfyUI's executor
  (c) ours       this package's nodes (Loader -> LoRA Stack -> Sampler) in the same ComfyUI

Weights are random (bench/build_model.py): latency and memory are real, images are noise.
Every end-to-end run uses a new prompt and a new seed, so no system can reuse a text
encoding or a cached result; each time is synchronised with the GPU. Writes
<out>/<date>-<device>.json and .md, after every section (a partial run keeps its results).

  python -m bench.run_bench --root /tmp/zfull --out bench/results
  python -m bench.run_bench --root /tmp/zsmall --tiny --out /tmp/res    # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.comfy_inprocess import InProcessComfy, link_models, link_package
from bench.report_md import render
from devtools import graphs

REPO = Path(__file__).resolve().parent.parent

GIB = 1024**3
PROMPT = ("A cinematic portrait photograph of a young woman on the Bund in Shanghai at dusk, wearing an embroidered "
          "silk qipao, soft golden backlight, film grain, shallow depth of field, city lights on the river, "
          "孙珍妮,旗袍,上海外滩,黄昏,胶片颗粒, take {i}")
LONG_PROMPT = ("An extremely detailed wide-angle photograph of a busy night market in Taipei after rain, dozens of food "
               "stalls with glowing lanterns and handwritten signs, steam rising from noodle pots, reflections in "
               "puddles, a couple sharing bubble tea, a cat sleeping on a stack of crates, neon signs in Chinese, "
               "夜市,灯笼,雨后,霓虹灯,热气腾腾的面摊, shot on 35mm film, take {i}")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def median(xs):
    return statistics.median(xs) if xs else None


def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "all": xs}


def module_bytes(modules, device_type="cuda") -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.device.type == device_type and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def evict_from_page_cache(paths) -> None:
    """Drop files from the page cache (a cold read follows), without root: posix_fadvise(DONTNEED)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(paths, block=64 << 20, limit=None) -> float:
    """Read files (warms the page cache), at most `limit` bytes each; returns bytes/second."""
    total, t0 = 0, time.perf_counter()
    buf = bytearray(block)
    for p in paths:
        done = 0
        with open(p, "rb", buffering=0) as f:
            while limit is None or done < limit:
                n = f.readinto(buf)
                if not n:
                    break
                done += n
        total += done
    return total / max(time.perf_counter() - t0, 1e-9)


class Bench:
    def __init__(self, args):
        self.args = args
        self.root = Path(args.root)
        self.size = args.size
        self.steps = 8
        self.device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        self.run_counter = 0
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
        self.device_name = name
        stamp = dt.date.today().isoformat()
        slug = name.replace("NVIDIA ", "").replace(" ", "-").lower()
        self.out_base = Path(args.out) / f"{stamp}-{slug}{'-tiny' if args.tiny else ''}"
        self.res = {
            "title": "Z-Image-Turbo: diffusers vs ComfyUI native vs this package",
            "date": stamp,
            "device": name,
            "weights": "RANDOM weights at the true Z-Image-Turbo size (latency and memory are real, images are noise)"
            if not args.tiny else "TINY random model on CPU: a smoke run of the harness, not a benchmark",
            "settings": {"size": self.size, "steps": self.steps, "batch": 1, "dtype": str(self.dtype),
                         "runs": args.runs, "warmup": args.warmup,
                         "prompt": "a new ~70-token prompt and a new seed for every run"},
            "software": self.versions(),
            "sections": {},
            "errors": {},
        }

    # -------------------------------------------------------------- output

    def versions(self):
        import diffusers
        import transformers

        v = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
             "transformers": transformers.__version__}
        try:
            import peft

            v["peft"] = peft.__version__
        except ImportError:
            pass
        if torch.cuda.is_available():
            v["cuda"] = torch.version.cuda
            v["driver_gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
        return v

    def save(self):
        self.out_base.parent.mkdir(parents=True, exist_ok=True)
        self.out_base.with_suffix(".json").write_text(json.dumps(self.res, indent=1, default=str))
        self.out_base.with_suffix(".md").write_text(render(self.res))

    def section(self, name, fn):
        print(f"\n=== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            self.res["sections"][name] = fn()
        except Exception as exc:  # a failing section is reported, the others still run
            self.res["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
            print(self.res["errors"][name], flush=True)
        print(f"    ({time.perf_counter() - t0:.1f}s) {json.dumps(self.res['sections'].get(name), default=str)[:600]}",
              flush=True)
        self.save()

    def next_prompt(self, template=PROMPT):
        self.run_counter += 1
        return template.format(i=self.run_counter), 1000 + self.run_counter

    # ------------------------------------------------------------- systems

    def split_files(self):
        return [self.root / sub / name for sub, name in graphs.MODEL_FILES.items()]

    def source(self):
        f = self.split_files()
        return self.eng("files.model_files").SplitFiles(f[0], f[1], f[2], self.root / "qwen_tokenizer")

    def start_comfy(self):
        base = Path(self.args.work) / "comfy_base"
        link_models(base, self.root)
        link_package(base, REPO)
        extra = ["--cpu"] if self.device.type == "cpu" else []
        self.comfy = InProcessComfy(Path(self.args.comfy_dir), base, extra)

    # --------------------------------------------------------------- runs

    def ours_run(self, prompt, seed, loras=(), memory="resident", compile_mode="auto"):
        """Our nodes up to the sampler (no probe, no saving): seconds and the generation's report."""
        graph = graphs.api_graph(prompt=prompt, seed=seed, width=self.size, height=self.size, steps=self.steps,
                                 loras=loras, memory=memory, compile=compile_mode,
                                 dtype="fp32" if self.args.tiny else "bf16")
        seconds = self.comfy.run(graph, [graphs.SAMPLER], executor="ours")
        return seconds, self.ours_pipe().last_report

    def eng(self, name: str):
        """An engine module as the nodes use it inside ComfyUI (ComfyUI imports this package under its own name)."""
        return self.comfy.package_module(f"zimage_turbo.engine.{name}")

    def ours_pipe(self):
        pipes = self.eng("sampling.pipeline").cached_pipelines()
        return pipes[0] if pipes else None

    def native_run(self, prompt, seed, upto="decode"):
        graph = graphs.native_graph(prompt=prompt, seed=seed, width=self.size, height=self.size, steps=self.steps)
        return self.comfy.run(graph, [graphs.NATIVE[upto]], executor="native")

    def diffusers_run(self, prompt, seed):
        gen = torch.Generator("cpu").manual_seed(seed)
        out = self.dpipe(prompt=prompt, height=self.size, width=self.size, num_inference_steps=self.steps,
                         guidance_scale=0.0, generator=gen, output_type="pt")
        return out.images.float().cpu()

    # ------------------------------------------------------------ sections

    def s_disk(self):
        files = self.split_files()
        evict_from_page_cache(files[:1])
        cold = read_through(files[:1], limit=4 << 30)
        warm = read_through(files[:1], limit=4 << 30)
        return {"file": files[0].name, "bytes": files[0].stat().st_size, "cold_read_gb_s": cold / 1e9,
                "page_cache_read_gb_s": warm / 1e9}

    def s_load_ours(self):
        COMPONENTS = self.eng("files.model_files").COMPONENTS
        pipeline = self.eng("sampling.pipeline")
        get_pipeline, release_all = pipeline.get_pipeline, pipeline.release_all

        files = self.split_files()
        release_all()
        evict_from_page_cache(files)
        cold, _ = timed(lambda: get_pipeline(self.source(), self.device, self.dtype, "resident", "off"))
        release_all()
        gc.collect()
        read_through(files)
        warm = []
        for _ in range(3):
            t, pipe = timed(lambda: get_pipeline(self.source(), self.device, self.dtype, "resident", "off"))
            warm.append(t)
            where = {str(p.device) for m in (pipe.transformer, pipe.text_encoder, pipe.vae) for p in m.parameters()}
            del pipe
            release_all()
            gc.collect()
        return {"cold_s": cold, "warm_s": stats(warm), "bytes": sum(f.stat().st_size for f in files),
                "weights_on": sorted(where), "component_loads": COMPONENTS.loads,
                "note": "transformer + text encoder (35 of 36 layers: the last is never used) + VAE, "
                        "from ComfyUI's split files straight to the GPU"}

    def s_load_diffusers(self):
        from diffusers import ZImagePipeline

        folder = self.root / "diffusers" / "Z-Image-Turbo"
        read_through([p for p in folder.rglob("*.safetensors")])
        t, pipe = timed(lambda: ZImagePipeline.from_pretrained(str(folder), torch_dtype=self.dtype).to(self.device))
        self.dpipe = pipe
        self.dpipe.set_progress_bar_config(disable=True)
        return {"warm_s": t, "how": "ZImagePipeline.from_pretrained(folder, torch_dtype).to(device)"}

    def s_first_calls(self):
        out = {}
        # ours: the loader reads the weights, the first sampler call compiles the blocks
        p, s = self.next_prompt()
        t, rep = self.ours_run(p, s)
        out["ours_first_call_s"] = t
        out["ours_first_call_compiled"] = rep.compiled
        p, s = self.next_prompt()
        out["ours_second_call_s"], _ = self.ours_run(p, s)
        p, s = self.next_prompt()
        out["comfyui_first_call_s"] = self.native_run(p, s)
        p, s = self.next_prompt()
        out["comfyui_second_call_s"] = self.native_run(p, s)
        p, s = self.next_prompt()
        out["diffusers_first_call_s"], _ = timed(lambda: self.diffusers_run(p, s))
        return out

    def s_alternating(self):
        times = {"diffusers": [], "comfyui": [], "ours": []}
        ours_steps, ours_phases, outside = [], [], []
        for i in range(self.args.warmup + self.args.runs):
            for system in ("diffusers", "comfyui", "ours"):
                p, s = self.next_prompt()
                if system == "diffusers":
                    t, _ = timed(lambda: self.diffusers_run(p, s))
                elif system == "comfyui":
                    t = self.native_run(p, s)
                else:
                    t, rep = self.ours_run(p, s)
                    if i >= self.args.warmup:
                        outside.append(t - rep.total_s)
                        ours_steps += rep.step_s
                        ours_phases.append({"lora_s": rep.lora_s, "text_encode_s": rep.text_encode_s,
                                            "denoise_s": rep.denoise_s, "vae_decode_s": rep.vae_decode_s,
                                            "total_s": rep.total_s, "prompt_tokens": rep.prompt_tokens})
                if i >= self.args.warmup:
                    times[system].append(t)
                print(f"    run {i} {system}: {t * 1000:.1f} ms", flush=True)
        out = {k: stats(v) for k, v in times.items()}
        out["ours_step_s"] = stats(ours_steps)
        out["ours_outside_generate_s"] = stats(outside)  # ComfyUI executor + node code around generate()
        out.update(self.overhead_parts())
        out["ours_phases_median"] = {k: median([ph[k] for ph in ours_phases]) for k in ours_phases[0]} if ours_phases else None
        d, c, o = (out[k]["median"] for k in ("diffusers", "comfyui", "ours"))
        out["speedup_vs_diffusers"] = d / o
        out["speedup_vs_comfyui"] = c / o
        return out

    def overhead_parts(self):
        """What the sampler node does besides generate(): fetch the cached pipeline, tell ComfyUI it is loaded."""
        pipe = self.ours_pipe()
        runtime = self.comfy.package_module("zimage_turbo.nodes.comfy_runtime")
        get_pipeline = self.eng("sampling.pipeline").get_pipeline
        t_get = median([timed(lambda: get_pipeline(pipe.comps.source, pipe.device, pipe.dtype, pipe.memory,
                                                   pipe.compile_mode))[0] for _ in range(5)])
        t_reg = median([timed(lambda: runtime.register_with_model_manager(pipe))[0] for _ in range(5)])
        return {"ours_get_pipeline_s": t_get, "ours_register_with_comfy_s": t_reg}

    def s_phases(self):
        """Where the other two spend their time (ours reports its own phases)."""
        out = {}
        d = self.dpipe
        te, den, vae = [], [], []
        for _ in range(max(3, self.args.runs // 2)):
            p, s = self.next_prompt()
            t, (pe, _) = timed(lambda: d.encode_prompt(prompt=p, device=self.device, do_classifier_free_guidance=False))
            te.append(t)
            gen = torch.Generator("cpu").manual_seed(s)
            t, lat = timed(lambda: d(prompt_embeds=pe, height=self.size, width=self.size, num_inference_steps=self.steps,
                                     guidance_scale=0.0, generator=gen, output_type="latent").images)
            den.append(t)
            with torch.inference_mode():
                lat = lat.to(d.vae.dtype) / d.vae.config.scaling_factor + d.vae.config.shift_factor
                t, _ = timed(lambda: d.vae.decode(lat, return_dict=False)[0].float().cpu())
            vae.append(t)
        out["diffusers"] = {"text_encode_s": median(te), "denoise_s": median(den), "step_s": median(den) / self.steps,
                            "vae_decode_s": median(vae), "text_tokens": "padded to 512"}
        new_prompt, same_prompt, sample_only = [], [], []
        for _ in range(max(3, self.args.runs // 2)):
            p, s = self.next_prompt()
            new_prompt.append(self.native_run(p, s))
            same_prompt.append(self.native_run(p, s + 1))  # conditioning cached: no text encode
            sample_only.append(self.native_run(p, s + 2, upto="sample"))  # conditioning cached, no decode
        out["comfyui"] = {"text_encode_s": median(new_prompt) - median(same_prompt),
                          "denoise_s": median(sample_only), "step_s": median(sample_only) / self.steps,
                          "vae_decode_s": median(same_prompt) - median(sample_only),
                          "how": "differences of runs with a new prompt / the same prompt / up to KSampler only"}
        return out

    def s_memory(self):
        """Peak allocated during one run, minus what the other systems hold meanwhile."""
        out = {}
        own = {
            "diffusers": lambda: [self.dpipe.transformer, self.dpipe.text_encoder, self.dpipe.vae],
            "comfyui": lambda: self.comfy.loaded_modules(),
            "ours": lambda: [self.ours_pipe().transformer, self.ours_pipe().text_encoder, self.ours_pipe().vae],
        }
        runners = {
            "diffusers": lambda p, s: self.diffusers_run(p, s),
            "comfyui": lambda p, s: self.native_run(p, s),
            "ours": lambda p, s: self.ours_run(p, s),
        }
        for system in ("diffusers", "comfyui", "ours"):
            p, s = self.next_prompt()
            runners[system](p, s)  # models resident before measuring
            gc.collect()
            torch.cuda.empty_cache()
            sync()
            others = torch.cuda.memory_allocated() - module_bytes(own[system]())
            torch.cuda.reset_peak_memory_stats()
            p, s = self.next_prompt()
            runners[system](p, s)
            sync()
            peak = torch.cuda.max_memory_allocated() - others
            out[system] = {"peak_allocated_gib": peak / GIB, "weights_gib": module_bytes(own[system]()) / GIB}
        return out

    def s_lora(self):
        GenerationRequest = self.eng("sampling.pipeline").GenerationRequest

        loras = self.root / "loras"
        a, b = "style_a_r32.safetensors", "style_b_r32.safetensors"
        row = lambda name, s: [{"lora": name, "strength": s, "on": True}]
        out = {"lora_file_bytes": (loras / a).stat().st_size}
        p, s = self.next_prompt()
        t_first, rep = self.ours_run(p, s, loras=row(a, 0.8))
        out["first_lora_e2e_s"] = t_first
        out["first_lora_apply_s"] = rep.lora_s
        out["first_lora_slots_rebuilt"] = rep.lora_slots_rebuilt
        p, s = self.next_prompt()
        self.ours_run(p, s, loras=row(a, 0.8))  # the LoRA graph variant compiled and warm
        strength, switch_new, toggles, e2e_with, steps_with = [], [], [], [], []
        for i in range(self.args.runs):
            p, s = self.next_prompt()
            t, rep = self.ours_run(p, s, loras=row(a, 0.5 + 0.1 * (i % 3)))
            strength.append(rep.lora_s)
            e2e_with.append(t)
            steps_with += rep.step_s
            p, s = self.next_prompt()
            t, rep = self.ours_run(p, s, loras=row(b if i % 2 == 0 else a, 0.8))  # another file into the slot
            switch_new.append(rep.lora_s)
            p, s = self.next_prompt()
            t, rep = self.ours_run(p, s, loras=[{"lora": a, "strength": 0.8, "on": False}])
            toggles.append(rep.lora_s)
        out["strength_change_apply_s"] = stats(strength)
        out["other_file_into_slot_apply_s"] = stats(switch_new)
        out["toggle_off_apply_s"] = stats(toggles)
        out["e2e_with_lora_s"] = stats(e2e_with)
        out["step_with_lora_s"] = stats(steps_with)
        # a never-seen file: read from disk (page cache) + copied into a slot
        self.eng("lora").LORA_FILES.clear()
        p, s = self.next_prompt()
        t, rep = self.ours_run(p, s, loras=row(b, 0.7))
        out["new_file_read_and_apply_s"] = rep.lora_s
        # base bit-identical after removing all LoRAs (engine level, same seed and prompt)
        pipe = self.ours_pipe()
        req = GenerationRequest("bit identity check", width=self.size, height=self.size, seed=7)
        LoraSpec = self.eng("lora").LoraSpec

        base0 = pipe.generate(req, []).images
        pipe.generate(req, [LoraSpec(loras / a, 1.0)])
        base1 = pipe.generate(req, []).images
        out["bit_identical_after_removing"] = bool(torch.equal(base0, base1))
        return out

    def s_correctness(self):
        """Our image vs diffusers' on the same weights, prompt and seed (bf16)."""
        GenerationRequest = self.eng("sampling.pipeline").GenerationRequest

        prompt, seed = "a lighthouse on a cliff at dawn, 灯塔, 清晨", 1234
        ours = self.ours_pipe().generate(GenerationRequest(prompt, width=self.size, height=self.size, seed=seed)).images
        ref = self.diffusers_run(prompt, seed).permute(0, 2, 3, 1)
        rel = ((ours - ref).norm() / ref.norm()).item()
        return {"relative_error": rel, "max_abs_diff": (ours - ref).abs().max().item(), "target": 2e-2,
                "ok": rel <= 2e-2, "both_finite": bool(torch.isfinite(ours).all() and torch.isfinite(ref).all())}

    def s_shapes(self):
        """A much longer prompt and another resolution: dynamic shapes, so no recompile."""
        out = {}
        p, s = self.next_prompt(LONG_PROMPT)
        t, rep = self.ours_run(p, s)
        out["long_prompt_tokens"] = rep.prompt_tokens
        out["long_prompt_e2e_s"] = t
        size = self.size
        self.size = 768 if size >= 1024 else size // 2
        try:
            p, s = self.next_prompt()
            out["other_size"] = self.size
            out["other_size_first_e2e_s"], _ = self.ours_run(p, s)
            p, s = self.next_prompt()
            out["other_size_second_e2e_s"], _ = self.ours_run(p, s)
        finally:
            self.size = size
        return out

    def s_memory_modes(self):
        """Peaks are ours alone: the other systems' (static) allocations are subtracted, as in s_memory."""
        out = {}
        others_modules = [self.dpipe.transformer, self.dpipe.text_encoder, self.dpipe.vae] + self.comfy.loaded_modules()
        for mode in ("offload_text_encoder", "low_vram"):
            runs, peaks, steps = [], [], []
            n = self.args.runs if mode == "offload_text_encoder" else 1
            for i in range(n + 1):
                gc.collect()
                torch.cuda.empty_cache()
                others = module_bytes(others_modules)
                torch.cuda.reset_peak_memory_stats()
                p, s = self.next_prompt()
                t, rep = self.ours_run(p, s, memory=mode)
                if i > 0:
                    runs.append(t)
                    peaks.append((torch.cuda.max_memory_allocated() - others) / GIB)
                    steps += rep.step_s
            pipe = self.ours_pipe()
            out[mode] = {"e2e_s": stats(runs), "peak_allocated_gib": max(peaks) if peaks else None,
                         "step_s": median(steps), "text_encode_s": rep.text_encode_s,
                         "ours_on_gpu_gib": module_bytes([pipe.transformer, pipe.text_encoder, pipe.vae]) / GIB}
        p, s = self.next_prompt()
        self.ours_run(p, s, memory="resident")
        return out

    def s_levers(self):
        """Each speed lever on its own (ours), so the README can say what each is worth."""
        GenerationRequest = self.eng("sampling.pipeline").GenerationRequest

        out = {}
        pipe = self.ours_pipe()
        # compile off vs on: the same runs eager (transformer, text encoder and VAE decoder all eager)
        eager_reps, eager_e2e = [], []
        for _ in range(3):
            p, s = self.next_prompt()
            t, rep = self.ours_run(p, s, compile_mode="off")
            eager_reps.append(rep)
            eager_e2e.append(t)
        out["eager_step_s"] = median([x for r in eager_reps for x in r.step_s])
        out["eager_text_encode_s"] = median([r.text_encode_s for r in eager_reps])
        out["eager_vae_decode_s"] = median([r.vae_decode_s for r in eager_reps])
        out["eager_e2e_s"] = median(eager_e2e)
        p, s = self.next_prompt()
        t, rep = self.ours_run(p, s, compile_mode="auto")
        out["recompile_after_toggle_e2e_s"] = t
        # text encoding: own length vs padded to 512 like diffusers (compiled encoder)
        te = pipe.text_encoder
        ids = pipe.tokenizer(PROMPT.format(i=0)).input_ids
        for label, n in (("own_length", len(ids)), ("padded_512", 512)):
            x = torch.tensor([(ids + [151643] * 512)[:n]], device=self.device)
            with torch.inference_mode():
                te(input_ids=x)
                ts = [timed(lambda: te(input_ids=x))[0] for _ in range(5)]
            out[f"text_encode_{label}_s"] = median(ts)
        out["prompt_tokens"] = len(ids)
        # embedding cache: same prompt twice
        p, s = self.next_prompt()
        self.ours_run(p, s)
        t, rep = self.ours_run(p, s + 1)
        out["cached_prompt_e2e_s"] = t
        out["cached_prompt_text_encode_s"] = rep.text_encode_s
        # attention kernels on Z-Image's shape: 30 heads x 128, image + caption tokens
        if self.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            seq = (self.size // 16) ** 2 + 96
            q, k, v = (torch.randn(1, 30, seq, 128, device=self.device, dtype=self.dtype) for _ in range(3))
            flops = 4 * seq * seq * 128 * 30
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
                try:
                    with sdpa_kernel([backend]):
                        torch.nn.functional.scaled_dot_product_attention(q, k, v)
                        t = median([timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))[0]
                                    for _ in range(10)])
                    out[f"attention_{name}_ms"] = t * 1000
                    out[f"attention_{name}_tflops"] = flops / t / 1e12
                except Exception as exc:
                    out[f"attention_{name}_error"] = str(exc)[:200]
            a = torch.randn(8192, 8192, device=self.device, dtype=torch.bfloat16)
            torch.mm(a, a)
            t = median([timed(lambda: torch.mm(a, a))[0] for _ in range(10)])
            out["matmul_8192_tflops"] = 2 * 8192**3 / t / 1e12
            del a, q, k, v
        # one profiled compiled step: where the time goes
        if self.device.type == "cuda" and self.args.profile:
            from torch.profiler import ProfilerActivity, profile

            req = GenerationRequest(PROMPT.format(i=-1), width=self.size, height=self.size, seed=3, steps=2)
            pipe.generate(req)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                pipe.generate(req)
            rows = []
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:15]:
                rows.append({"name": e.key[:90], "cuda_ms": e.device_time_total / 1000 / 2, "calls": e.count // 2})
            out["profile_top_kernels_per_step"] = rows
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="model folder written by bench/build_model.py")
    ap.add_argument("--comfy-dir", default=str(REPO / ".build" / "ComfyUI"))
    ap.add_argument("--work", default="/tmp/zimage_bench_work")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny model (ComfyUI native skipped)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    args = ap.parse_args()
    if args.tiny:
        args.size = min(args.size, 64)

    b = Bench(args)
    only = set(filter(None, args.only.split(",")))
    want = lambda name: not only or name in only
    print(f"device {b.device_name}; out {b.out_base}", flush=True)
    if want("disk"):
        b.section("disk", b.s_disk)
    b.start_comfy()  # before loading: every section uses the engine ComfyUI imported (one copy in the process)
    if want("load"):
        b.section("load_ours", b.s_load_ours)
    b.section("load_diffusers", b.s_load_diffusers)
    if args.tiny:
        b.native_run = lambda p, s, upto="decode": b.ours_run(p, s)[0]  # ComfyUI cannot run the tiny model natively
        b.res["settings"]["note"] = "tiny smoke run: 'comfyui' rows re-run ours (ComfyUI's loaders need the true size)"
    b.section("first_calls", b.s_first_calls)
    b.section("alternating", b.s_alternating)
    for name, fn in (("phases", b.s_phases), ("correctness", b.s_correctness), ("lora", b.s_lora),
                     ("shapes", b.s_shapes), ("levers", b.s_levers)):
        if want(name):
            b.section(name, fn)
    if b.device.type == "cuda":
        if want("memory"):
            b.section("memory", b.s_memory)
        if want("memory_modes"):
            b.section("memory_modes", b.s_memory_modes)
    print(f"\nwrote {b.out_base}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
