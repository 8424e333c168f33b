"""bench/soak.py in its short form: two real ComfyUI servers of its own (not the shared `comfy` fixture, whose
cache and LoRA state would mix in), the tiny model of the `tiny` fixture, 80 prompts from 3 clients with invalid
prompts, /interrupt and /free mixed in, then every valid prompt again alone on a fresh server."""

from __future__ import annotations

import json

import pytest

from bench import soak


@pytest.fixture(scope="module")
def result(tiny, tmp_path_factory):
    from scripts.comfy_client import COMFY_DIR

    if not (COMFY_DIR / "main.py").is_file():
        pytest.fail(f"ComfyUI is not set up in {COMFY_DIR}: run `make test` (or scripts/setup.sh) first.")
    work = tmp_path_factory.mktemp("soak")
    setup = soak.tiny_setup(work, built=tiny["built"], lora_paths=[p for p, _ in tiny["loras"].values()])
    cfg = soak.SoakConfig.short(server_threads=1)
    out = soak.run_soak(cfg, setup, work, cpu=True, log=lambda *_: None)
    paths = soak.write_outputs(out, work / "results")
    out["_paths"] = paths
    return out


def _why(result) -> str:
    return "; ".join(result["failures"]) or "no failures"


def test_result_file_has_the_keys_asked_for(result):
    data = json.loads(result["_paths"]["json"].read_text())
    for key in ("prompts", "valid", "invalid", "server_deaths", "lost", "mismatched_images", "rss_drift_pct",
                "vram_drift_pct", "lora_switches", "base_bit_identical_after_switches"):
        assert key in data, key
    assert data["vram_drift_pct"] is None  # CPU
    assert data["device"] == "cpu-tiny"
    assert result["_paths"]["json"].name == f"{data['date']}-cpu-tiny-short.json"
    assert "## Invalid prompts" in result["_paths"]["markdown"].read_text()


def test_the_mix_was_what_the_short_form_promises(result):
    assert result["prompts"] >= 60 and result["invalid"] >= len(soak.INVALID_CASES)
    assert set(result["invalid_cases"]) == set(soak.INVALID_CASES)  # every kind of invalid prompt was sent
    assert result["clients"] == 3
    assert result["interrupts_sent"] >= 1
    assert {f["kind"] for f in result["frees"]} == {"free_unload", "free_cache"}
    assert all(f["status"] == 200 for f in result["frees"])
    assert result["not_run"] == 0, _why(result)


def test_the_server_never_died_and_no_valid_prompt_was_lost(result):
    assert result["server_deaths"] == 0, result["deaths"]
    assert result["lost"] == 0, [j for j in result["jobs"] if j["outcome"] == "lost"]


def test_every_image_equals_the_same_prompt_run_alone(result):
    assert result["images_compared"] == result["valid"]
    assert result["reference_failed"] == 0, _why(result)
    assert result["mismatched_images"] == 0, [j for j in result["jobs"] if j.get("reference", {}).get("equal") is False]


def test_every_invalid_prompt_ends_in_a_clear_error(result):
    bad = {case: c for case, c in result["invalid_cases"].items()
           if set(c["outcomes"]) - {"clear_rejection", "clear_error"}}
    assert not bad, bad
    assert result["invalid_succeeded"] == 0 and result["unclear_errors"] == 0 and result["invalid_lost"] == 0


def test_server_memory_is_flat(result):
    assert result["rss_drift_pct"] is not None and result["rss_drift_pct"] <= 5.0, result["rss"]


def test_no_lora_baseline_is_bit_identical_after_the_switches(result):
    assert result["lora_switches"] >= result["config"]["min_switches"]
    assert result["base_bit_identical_after_switches"] is True, _why(result)


def test_it_passed_as_a_whole(result):
    assert result["passed"], _why(result)
