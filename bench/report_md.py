"""Renders a benchmark result (the JSON run_bench.py writes) as markdown, with the targets of issue 4."""

from __future__ import annotations

import json
import sys


def _g(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d or d[k] is None:
            return default
        d = d[k]
    return d


def ms(x):
    return "n/a" if x is None else f"{x * 1000:.0f} ms"


def sec(x):
    return "n/a" if x is None else f"{x:.2f} s"


def gib(x):
    return "n/a" if x is None else f"{x:.1f} GiB"


def verdict(ok):
    return "n/a" if ok is None else ("**met**" if ok else "missed")


def render(res: dict) -> str:
    s = res.get("sections", {})
    alt, ph, mem = s.get("alternating", {}), s.get("phases", {}), s.get("memory", {})
    lines = [
        f"# {res.get('title')}",
        "",
        f"- **Date:** {res.get('date')}  **Device:** {res.get('device')}",
        f"- **Weights:** {res.get('weights')}",
        f"- **Settings:** {json.dumps(res.get('settings'), ensure_ascii=False)}",
        f"- **Software:** {json.dumps(res.get('software'))}",
        "",
        "## End to end, side by side (same GPU, same process, alternating runs)",
        "",
        "| system | median | min | max | per step | text encode | VAE decode | peak allocated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ours_ph = alt.get("ours_phases_median") or {}
    rows = [
        ("(a) diffusers ZImagePipeline, eager", "diffusers", _g(ph, "diffusers", "step_s"), _g(ph, "diffusers", "text_encode_s"),
         _g(ph, "diffusers", "vae_decode_s")),
        ("(b) ComfyUI 0.3.75 native graph", "comfyui", _g(ph, "comfyui", "step_s"), _g(ph, "comfyui", "text_encode_s"),
         _g(ph, "comfyui", "vae_decode_s")),
        ("(c) this package (compiled, resident)", "ours", _g(alt, "ours_step_s", "median"), ours_ph.get("text_encode_s"),
         ours_ph.get("vae_decode_s")),
    ]
    for label, key, step, te, vae in rows:
        st = alt.get(key) or {}
        lines.append(f"| {label} | {sec(st.get('median'))} | {sec(st.get('min'))} | {sec(st.get('max'))} | {ms(step)} | "
                     f"{ms(te)} | {ms(vae)} | {gib(_g(mem, key, 'peak_allocated_gib'))} |")
    if alt.get("speedup_vs_diffusers"):
        lines += ["", f"Speed-up of (c): **{alt['speedup_vs_diffusers']:.2f}x** vs diffusers eager, "
                      f"**{alt['speedup_vs_comfyui']:.2f}x** vs ComfyUI native."]
    fc = s.get("first_calls", {})
    lo, ld = s.get("load_ours", {}), s.get("load_diffusers", {})
    disk = s.get("disk", {})
    lines += [
        "",
        "## Loading and first calls",
        "",
        "| what | time |",
        "|---|---|",
        f"| ours: warm load (page cache) of transformer + text encoder + VAE to the GPU | {sec(_g(lo, 'warm_s', 'median'))} "
        f"({(lo.get('bytes') or 0) / 1e9:.1f} GB) |",
        f"| ours: cold load (page cache dropped) | {sec(lo.get('cold_s'))} |",
        f"| disk read speed, cold / page cache | {_g(disk, 'cold_read_gb_s', default=0):.2f} / "
        f"{_g(disk, 'page_cache_read_gb_s', default=0):.2f} GB/s |",
        f"| diffusers: `from_pretrained(...).to('cuda')`, warm | {sec(ld.get('warm_s'))} |",
        f"| ours: first call (compiles the blocks) / second call | {sec(fc.get('ours_first_call_s'))} / "
        f"{sec(fc.get('ours_second_call_s'))} |",
        f"| ComfyUI: first call (loads the models) / second call | {sec(fc.get('comfyui_first_call_s'))} / "
        f"{sec(fc.get('comfyui_second_call_s'))} |",
        f"| diffusers: first call | {sec(fc.get('diffusers_first_call_s'))} |",
    ]
    lora = s.get("lora", {})
    lines += [
        "",
        "## LoRA (ours; rank-32 LoRA on every attention and feed-forward layer)",
        "",
        "| what | time |",
        "|---|---|",
        f"| LoRA file size | {(lora.get('lora_file_bytes') or 0) / 1e6:.0f} MB |",
        f"| first LoRA of the session (slots built; compiled: one recompile) | apply {sec(lora.get('first_lora_apply_s'))}, "
        f"end to end {sec(lora.get('first_lora_e2e_s'))} |",
        f"| strength change (apply) | {ms(_g(lora, 'strength_change_apply_s', 'median'))} |",
        f"| switch off (apply) | {ms(_g(lora, 'toggle_off_apply_s', 'median'))} |",
        f"| another cached file into the slot (apply) | {ms(_g(lora, 'other_file_into_slot_apply_s', 'median'))} |",
        f"| a never-read file: read + apply | {ms(lora.get('new_file_read_and_apply_s'))} |",
        f"| per step with the LoRA on / without | {ms(_g(lora, 'step_with_lora_s', 'median'))} / "
        f"{ms(_g(alt, 'ours_step_s', 'median'))} |",
        f"| base bit-identical after removing all LoRAs | {lora.get('bit_identical_after_removing')} |",
    ]
    mm = s.get("memory_modes", {})
    lines += [
        "",
        "## Memory modes (ours)",
        "",
        "| mode | end to end (new prompt every run) | peak allocated | text encode |",
        "|---|---|---|---|",
        f"| resident | {sec(_g(alt, 'ours', 'median'))} | {gib(_g(mem, 'ours', 'peak_allocated_gib'))} | "
        f"{ms(ours_ph.get('text_encode_s'))} |",
    ]
    for mode in ("offload_text_encoder", "low_vram"):
        m = mm.get(mode, {})
        lines.append(f"| {mode} | {sec(_g(m, 'e2e_s', 'median'))} | {gib(m.get('peak_allocated_gib'))} | "
                     f"{ms(m.get('text_encode_s'))} |")
    if mm:
        lines.append("")
        lines.append("Peaks are ours alone (the other systems' resident weights are subtracted).")
    lev, corr, shp = s.get("levers", {}), s.get("correctness", {}), s.get("shapes", {})
    lines += [
        "",
        "## Levers, one at a time (ours)",
        "",
        "| lever | without | with |",
        "|---|---|---|",
        f"| torch.compile of the transformer blocks, with RoPE in real arithmetic (per step) | {ms(lev.get('eager_step_s'))} | "
        f"{ms(_g(alt, 'ours_step_s', 'median'))} |",
        f"| torch.compile of the text encoder layers (text encode) | {ms(lev.get('eager_text_encode_s'))} | "
        f"{ms(ours_ph.get('text_encode_s'))} |",
        f"| torch.compile of the VAE decoder (decode) | {ms(lev.get('eager_vae_decode_s'))} | {ms(ours_ph.get('vae_decode_s'))} |",
        f"| all compiled vs all eager, end to end | {sec(lev.get('eager_e2e_s'))} | {sec(_g(alt, 'ours', 'median'))} |",
        f"| text encoding at the prompt's length ({lev.get('prompt_tokens')} tokens) vs padded to 512 | "
        f"{ms(lev.get('text_encode_padded_512_s'))} | {ms(lev.get('text_encode_own_length_s'))} |",
        f"| embedding cache (same prompt again), end to end | {sec(_g(alt, 'ours', 'median'))} | {sec(lev.get('cached_prompt_e2e_s'))} |",
        "",
        f"Around generate() (ComfyUI's executor and the node code): {ms(_g(alt, 'ours_outside_generate_s', 'median'))} per run; "
        f"of that, fetching the cached pipeline {ms(alt.get('ours_get_pipeline_s'))} and registering it with ComfyUI's "
        f"model manager {ms(alt.get('ours_register_with_comfy_s'))}.",
        "",
        f"Attention kernels on Z-Image's shape: flash {lev.get('attention_flash_ms', 0):.1f} ms "
        f"({lev.get('attention_flash_tflops', 0):.0f} TFLOP/s), cuDNN {lev.get('attention_cudnn_ms', 0):.1f} ms "
        f"({lev.get('attention_cudnn_tflops', 0):.0f} TFLOP/s); bf16 matmul 8192³: {lev.get('matmul_8192_tflops', 0):.0f} TFLOP/s.",
        "",
        f"New prompt length ({shp.get('long_prompt_tokens')} tokens): {sec(shp.get('long_prompt_e2e_s'))} end to end; "
        f"new size {shp.get('other_size')}²: first {sec(shp.get('other_size_first_e2e_s'))}, then "
        f"{sec(shp.get('other_size_second_e2e_s'))} (dynamic shapes: no recompile).",
        "",
        "## Correctness",
        "",
        f"Our image vs diffusers' on the same weights, prompt and seed (bf16): relative error "
        f"{corr.get('relative_error', float('nan')):.2e} (target ≤ 2e-2: {verdict(corr.get('ok'))}); "
        f"max abs diff {corr.get('max_abs_diff', float('nan')):.3f}; both finite: {corr.get('both_finite')}.",
    ]
    o = _g(alt, "ours", "median")
    step = _g(alt, "ours_step_s", "median")
    warm = _g(lo, "warm_s", "median")
    off = _g(mm, "offload_text_encoder", "e2e_s", "median")
    overhead = None
    if _g(lora, "step_with_lora_s", "median") and step:
        overhead = _g(lora, "step_with_lora_s", "median") / step - 1
    lines += [
        "",
        "## Targets (1024², 8 steps, batch 1)",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| end to end ≤ 0.70 s | {sec(o)} | {verdict(None if o is None else o <= 0.70)} |",
        f"| ≥ 1.85x diffusers eager | {alt.get('speedup_vs_diffusers', 0):.2f}x | "
        f"{verdict(alt.get('speedup_vs_diffusers', 0) >= 1.85 if alt else None)} |",
        f"| ≥ 1.5x ComfyUI native | {alt.get('speedup_vs_comfyui', 0):.2f}x | "
        f"{verdict(alt.get('speedup_vs_comfyui', 0) >= 1.5 if alt else None)} |",
        f"| ≤ 80 ms per step | {ms(step)} | {verdict(None if step is None else step <= 0.080)} |",
        f"| warm load ≤ 2.0 s | {sec(warm)} | {verdict(None if warm is None else warm <= 2.0)} |",
        f"| LoRA strength change / toggle ≤ 50 ms | {ms(_g(lora, 'strength_change_apply_s', 'median'))} / "
        f"{ms(_g(lora, 'toggle_off_apply_s', 'median'))} | "
        f"{verdict(None if not lora else max(_g(lora, 'strength_change_apply_s', 'median', default=9), _g(lora, 'toggle_off_apply_s', 'median', default=9)) <= 0.05)} |",
        f"| LoRA per-step overhead ≤ 3 % | {'n/a' if overhead is None else f'{overhead * 100:.1f} %'} | "
        f"{verdict(None if overhead is None else overhead <= 0.03)} |",
        f"| new 160 MB LoRA ≤ 0.5 s | {sec(lora.get('new_file_read_and_apply_s'))} | "
        f"{verdict(None if lora.get('new_file_read_and_apply_s') is None else lora['new_file_read_and_apply_s'] <= 0.5)} |",
        f"| base bit-identical after removing LoRAs | {lora.get('bit_identical_after_removing')} | "
        f"{verdict(lora.get('bit_identical_after_removing'))} |",
        f"| peak ≤ 22 GiB resident | {gib(_g(mem, 'ours', 'peak_allocated_gib'))} | "
        f"{verdict(None if not mem else _g(mem, 'ours', 'peak_allocated_gib', default=99) <= 22)} |",
        f"| text-encoder offload: peak ≤ 15 GiB | {gib(_g(mm, 'offload_text_encoder', 'peak_allocated_gib'))} | "
        f"{verdict(None if not mm else _g(mm, 'offload_text_encoder', 'peak_allocated_gib', default=99) <= 15)} |",
        f"| text-encoder offload: end to end ≤ 1.2x resident | "
        f"{'n/a' if not (off and o) else f'{off / o:.2f}x'} | {verdict(None if not (off and o) else off / o <= 1.2)} |",
        f"| relative error vs diffusers ≤ 2e-2 | {corr.get('relative_error', float('nan')):.2e} | {verdict(corr.get('ok'))} |",
    ]
    if res.get("errors"):
        lines += ["", "## Sections that failed", ""]
        for k, v in res["errors"].items():
            lines.append(f"- `{k}`: {v.splitlines()[0][:300]}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(json.load(open(sys.argv[1]))))
