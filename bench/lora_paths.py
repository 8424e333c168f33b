"""What a LoRA costs in process, at true size: per step (merged vs adapters), per switch, per strength change.

    python -m bench.lora_paths --root /tmp/zfull --out bench/results

Uses bench/build_model.py's random weights and its two rank-32 LoRAs (style_a: diffusers
format, style_b: kohya). Compiled bf16, 1024², 8 steps. For each path (merged, adapters):
the median step time with no LoRA and with one LoRA on, the seconds of a strength change, of a
switch to the other (cached) file, and of a file not read before; and whether all-off gives the
bits of the no-LoRA image. Writes <out>/<date>-<device>-lora.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from devtools.graphs import MODEL, TEXT_ENCODER, VAE
from zimage_turbo.engine.files.model_files import SplitFiles
from zimage_turbo.engine.lora import LORA_FILES, LoraSpec
from zimage_turbo.engine.sampling import pipeline as engine_pipeline
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    root = Path(args.root)
    src = SplitFiles(root / "diffusion_models" / MODEL, root / "text_encoders" / TEXT_ENCODER, root / "vae" / VAE,
                     root / "qwen_tokenizer")
    dev = torch.device("cuda:0")
    a, b = root / "loras" / "style_a_r32.safetensors", root / "loras" / "style_b_r32.safetensors"
    fresh = Path("/tmp/zimage_lora_fresh")  # copies with a new identity: "a file not read before"
    fresh.mkdir(exist_ok=True)
    pipe = get_pipeline(src, dev, torch.bfloat16, "resident", "on")
    n = [0]

    def gen(stack):
        n[0] += 1
        req = GenerationRequest(f"a lighthouse at dusk, take {n[0]}", width=args.size, height=args.size, seed=n[0])
        return pipe.generate(req, stack).report

    t0 = time.perf_counter()
    gen([])  # "on": waits for the whole warm-up
    result = {"device": torch.cuda.get_device_name(dev), "date": dt.date.today().isoformat(),
              "torch": torch.__version__, "size": args.size, "runs": args.runs,
              "warmup_s": time.perf_counter() - t0, "note": "random weights; compiled bf16; in process", "paths": {}}
    fixed = GenerationRequest("a fixed prompt for the bit check", width=args.size, height=args.size, seed=7)
    base_image = pipe.generate(fixed).images
    # Is the compiled no-LoRA image reproducible at all in this process? (all_off_bit_identical
    # below is only meaningful if it is.)
    result["base_repeatable"] = bool(torch.equal(pipe.generate(fixed).images, base_image))
    for path_name in ("merged", "adapters"):
        pipe.tstate.lora.mode = "merge" if path_name == "merged" else "adapters"
        LORA_FILES.clear()
        gen([LoraSpec(a, 0.8)])  # variant compiled / copies made, outside the figures
        gen([])
        r = {"all_off_after_first_lora": bool(torch.equal(pipe.generate(fixed).images, base_image))}
        r["step_ms_base"] = statistics.median(statistics.median(gen([]).step_s) for _ in range(args.runs)) * 1000
        reps = [gen([LoraSpec(a, 0.8)]) for _ in range(args.runs)]
        assert all(x.lora_path == path_name for x in reps), [x.lora_path for x in reps]
        r["step_ms_lora"] = statistics.median(statistics.median(x.step_s) for x in reps) * 1000
        r["lora_step_overhead_pct"] = 100 * (r["step_ms_lora"] / r["step_ms_base"] - 1)
        r["strength_change_s"] = statistics.median(gen([LoraSpec(a, s)]).lora_s for s in (0.5, 0.9, 1.1))
        gen([LoraSpec(b, 0.8)])
        r["switch_cached_s"] = statistics.median(gen([LoraSpec(x, 0.8)]).lora_s for x in (a, b, a))
        new = []  # files not read before (fresh copies: a new identity, the bytes in the page cache)
        for k in range(args.runs):
            copy = fresh / f"new_{path_name}_{n[0]}_{k}.safetensors"
            shutil.copyfile(b if k % 2 == 0 else a, copy)
            rep = gen([LoraSpec(copy, 0.8)])
            new.append(rep.lora_s)
        r["new_file_s"] = statistics.median(new)
        r["new_file_all_s"] = new
        r["new_file_mb"] = copy.stat().st_size / 1e6
        r["all_off_bit_identical"] = bool(torch.equal(pipe.generate(fixed).images, base_image))
        r["compile_path"] = rep.compile_path
        result["paths"][path_name] = r
        print(path_name, json.dumps(r), flush=True)
    engine_pipeline.release_all()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = result["device"].replace("NVIDIA ", "").split()[0].lower()
    stem = out / f"{result['date']}-{slug}-lora"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# LoRA cost in process — {result['device']}, {result['date']}", "",
             f"True-size Z-Image-Turbo, RANDOM weights, compiled bf16, {args.size}², 8 steps, torch {result['torch']}; "
             f"medians of {args.runs}. Strength/switch/new-file: the LoRA apply phase of the probe.", "",
             "| path | step, no LoRA | step, LoRA on | per-step cost | strength change | switch (cached) | "
             "new file | all-off bit-identical |", "|---|---|---|---|---|---|---|---|"]
    for name, r in result["paths"].items():
        lines.append(f"| {name} | {r['step_ms_base']:.1f} ms | {r['step_ms_lora']:.1f} ms | "
                     f"{r['lora_step_overhead_pct']:+.1f} % | {r['strength_change_s'] * 1000:.0f} ms | "
                     f"{r['switch_cached_s'] * 1000:.0f} ms | {r['new_file_s'] * 1000:.0f} ms ({r['new_file_mb']:.0f} MB) | "
                     f"{r['all_off_bit_identical']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("wrote", stem.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
