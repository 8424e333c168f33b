"""bench/fp8_cost.py --quick on the CPU with the tiny model: it runs, refuses fp8 cleanly, and writes every key.

A second run passes this CPU off as an fp8 GPU (as test_fp8_mode.py does), so the fp8 sections of the benchmark
(conversion, quality against bf16, LoRA switching, the folding cost, the fp8 sweep) run here before they cost GPU
time.
"""

from __future__ import annotations

import json

import pytest

from bench import fp8_cost
from zimage_turbo.engine.sampling import fp8_mode

KEYS = ("e2e_s", "step_ms", "vae_ms", "fp8_e2e_s", "fp8_peak_gib", "fp8_psnr_db", "fp8_latent_rel_err", "sizes")


def run(tiny, tmp_path, *extra) -> dict:
    out = tmp_path / "out"
    assert fp8_cost.main(["--quick", "--root", str(tiny["root"]), "--out", str(out), "--work", str(tmp_path / "w"),
                          *extra]) == 0
    (path,) = out.glob("*-quick.json")
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").stat().st_size > 1000
    return json.loads(path.read_text())


def test_quick_run_refuses_fp8_on_the_cpu_and_writes_every_key(tiny, fresh_engine, tmp_path):
    res = run(tiny, tmp_path)
    assert set(KEYS) <= set(res)
    assert res["e2e_s"] > 0 and res["step_ms"] > 0 and res["vae_ms"] > 0
    assert res["fp8_e2e_s"] is None and res["fp8_psnr_db"] is None
    assert "the CPU" in res["fp8_refused"] and res["sections"]["fp8"] == {"refused": res["fp8_refused"]}
    systems = {(e["system"], e["width"], e["batch"]) for e in res["sizes"]}
    assert {("ours-bf16", 64, 1), ("ours-bf16", 96, 1), ("ours-bf16", 64, 2), ("diffusers", 96, 1)} <= systems
    assert all(0 <= e["attention_share_flops"] < 1 for e in res["sizes"])
    assert res["errors"] == {}, res["errors"]
    assert "comfyui" in json.dumps(res["sections"]["sizes_comfyui"]) or res["sections"]["sizes_comfyui"]["skipped"]


def test_quick_run_with_fp8_simulated_fills_the_fp8_figures(tiny, fresh_engine, tmp_path, monkeypatch):
    try:
        import torchao.quantization.quant_api as quant_api
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"torchao is not importable here ({type(exc).__name__})")
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *a, **k: None)
    monkeypatch.setattr(fp8_mode, "device_capability", lambda device: (9, 0))
    # The tiny model has 2 main blocks: the default policy keeps both; "all_blocks" quantises what the kernels take.
    res = run(tiny, tmp_path, "--policy", "all_blocks", "--sections", "bf16,fp8,fp8_lora,sizes_fp8")
    assert res["errors"] == {}, res["errors"]
    assert res["fp8_e2e_s"] > 0 and res["fp8_step_ms"] > 0
    assert 0 < res["fp8_latent_rel_err"] < 0.2 and 10 < res["fp8_psnr_db"] < 100 and 0 < res["fp8_ssim"] <= 1
    fp8 = res["sections"]["fp8"]
    assert fp8["summary"].startswith("fp8 (fast): fp8 all_blocks:") and fp8["quality"]["metrics"].startswith("torchmetrics")
    lora = res["sections"]["fp8_lora"]
    assert lora["path"] == "adapters" and lora["all_off_image_bit_identical"] and lora["fp8_weights_bit_identical"]
    assert lora["fold_requant"]["layers"] > 0 and lora["fold_requant"]["ms"] > 0
    assert {("ours-fp8", 64, 1), ("ours-fp8", 96, 1), ("ours-fp8", 64, 2)} <= {
        (e["system"], e["width"], e["batch"]) for e in res["sizes"]}
    assert "sizes_bf16" not in res["sections"]  # --sections
