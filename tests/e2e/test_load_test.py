"""bench/load_test.py against the real ComfyUI server of the `comfy` fixture (tiny model under the real names)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from bench import load_test
from devtools.graphs import LOADER, MODEL, SAMPLER, TEXT_ENCODER, VAE
from graphs import api_prompt

REPO = load_test.REPO
NOTE = "tiny random-weight model of the test fixture"
LEVELS, REQUESTS = [1, 2], 3


def tiny_graph(**overrides) -> dict:
    settings = {"model": MODEL, "text_encoder": TEXT_ENCODER, "vae": VAE, "width": 64, "height": 64, "steps": 2,
                **overrides}
    return load_test.default_graph(**settings)


@pytest.fixture(scope="module")
def report(comfy):
    workflow = load_test.Workflow.from_graph(tiny_graph())
    return load_test.run_load_test(comfy.client, workflow, LEVELS, REQUESTS, model_note=NOTE, timeout_s=120,
                                   log=lambda *_: None)


def test_every_request_succeeds_with_its_own_seed_and_prompt(report):
    requests = report["requests"]
    assert [(r["level"], r["index"]) for r in requests] == [(lvl, i) for lvl in LEVELS for i in range(REQUESTS)]
    assert {r["status"] for r in requests} == {"success"}
    assert all(r["error"] is None and r["images"] == 1 for r in requests)
    everything = requests + report["warmup"]
    assert len({r["seed"] for r in everything}) == len(everything)
    assert len({r["prompt"] for r in everything}) == len(everything)
    assert len({r["prompt_id"] for r in everything}) == len(everything)
    for lvl in report["levels"]:
        assert (lvl["succeeded"], lvl["failed"], lvl["error_rate"], lvl["images"]) == (REQUESTS, 0, 0.0, REQUESTS)


def test_nothing_was_served_from_a_cache(report):
    for r in report["requests"]:
        assert SAMPLER not in r["cached_nodes"], "the sampler output came from ComfyUI's cache"
        assert LOADER in r["cached_nodes"], "the loader should stay cached: the model is loaded once"
        assert r["probe"]["embedding_cache_hit"] is False
    assert all(lvl["result_cache_hits"] == lvl["embedding_cache_hits"] == 0 for lvl in report["levels"])
    assert report["warnings"] == []


def test_each_level_keeps_exactly_its_concurrency_in_flight(report):
    for lvl in report["levels"]:
        in_flight = [r["in_flight_when_queued"] for r in report["requests"] if r["level"] == lvl["level"]]
        assert max(in_flight) == lvl["max_in_flight"] == lvl["level"]
    # At level 2 the first two go out together; ComfyUI runs one at a time, so the second one waits.
    second = next(r for r in report["requests"] if r["level"] == 2 and r["index"] == 1)
    first = next(r for r in report["requests"] if r["level"] == 2 and r["index"] == 0)
    assert second["queued_at_s"] < first["latency_s"] and second["started_s"] > first["started_s"]


def test_timings_are_positive_ordered_and_match_the_summary(report):
    for r in report["requests"]:
        assert 0 < r["accepted_s"] and 0 < r["started_s"] < r["first_progress_s"] < r["latency_s"]
        assert r["probe"]["total_s"] > 0
    for lvl in report["levels"]:
        latencies = sorted(r["latency_s"] for r in report["requests"] if r["level"] == lvl["level"])
        assert 0 < lvl["latency_p50_s"] <= lvl["latency_p95_s"] <= lvl["latency_max_s"]
        assert lvl["latency_p50_s"] == latencies[1] and lvl["latency_max_s"] == latencies[-1]  # 3 samples
        assert lvl["images_per_s"] > 0 and lvl["wall_s"] >= lvl["latency_max_s"]
        assert lvl["images_per_s"] == pytest.approx(REQUESTS / lvl["wall_s"])
        assert 0 < lvl["first_progress_p50_s"] < lvl["latency_max_s"]


def test_probe_figures_and_warmup_are_reported(report):
    assert report["device_name"] == "cpu" and report["dtype"] == "bf16" and report["is_cpu"] is True
    assert report["model_note"] == NOTE
    assert report["model_files"][0]["model"] == MODEL
    for lvl in report["levels"]:
        assert lvl["peak_memory_kind"] == "process_rss" and lvl["peak_memory_bytes"] > 10 * 2**20
    (warm,) = report["warmup"]
    assert warm["status"] == "success" and warm["level"] == 0
    assert all(r["level"] > 0 for r in report["requests"])


def test_markdown_json_and_png_are_written(comfy, report, tmp_path):
    paths = load_test.write_outputs(report, tmp_path)
    assert {p.parent for p in paths.values()} == {tmp_path}
    assert paths["json"].name.startswith("load_") and "_cpu" in paths["json"].name
    md = paths["markdown"].read_text()
    assert NOTE in md and "**CPU run:**" in md and "server process RSS" in md
    rows = [line for line in md.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and all(" 3 | 3 | 0 (0%) |" in row for row in rows)
    data = json.loads(paths["json"].read_text())
    for key in ("date", "device_name", "dtype", "comfyui", "model_note", "model_files", "workflow", "settings",
                "warmup", "levels", "requests"):
        assert key in data, key
    assert data["comfyui"]["url"] == report["comfyui"]["url"] and data["comfyui"]["version"]
    assert data["workflow"]["graph"][SAMPLER]["class_type"] == "ZImageTurboSampler"
    # The built-in graph gets any loader input it does not set from the server, so it stays valid.
    loader_spec = comfy.client.object_info()["ZImageTurboLoader"]["input"]["required"]
    assert set(loader_spec) <= set(data["workflow"]["graph"][LOADER]["inputs"])
    assert len(data["requests"]) == len(LEVELS) * REQUESTS
    with Image.open(paths["png"]) as img:
        img.verify()
    with Image.open(paths["png"]) as img:
        assert img.format == "PNG" and img.size == (1200, 580)
        assert len(img.convert("RGB").getcolors(1 << 16)) > 10  # something was drawn


def test_rejected_and_failing_prompts_count_as_errors_with_their_messages(comfy, tmp_path):
    missing = load_test.Workflow.from_graph(tiny_graph(model="no_such_model.safetensors"))
    rejected = load_test.run_load_test(comfy.client, missing, [1], 2, warmup=0, log=lambda *_: None)
    assert [r["status"] for r in rejected["requests"]] == ["rejected", "rejected"]
    assert "no_such_model.safetensors" in rejected["requests"][0]["error"]
    assert rejected["levels"][0]["error_rate"] == 1.0 and rejected["levels"][0]["images_per_s"] == 0.0

    bad_size = load_test.Workflow.from_graph(tiny_graph(width=72))  # fails inside the sampler, not at queue time
    failed = load_test.run_load_test(comfy.client, bad_size, [2], 2, warmup=0, log=lambda *_: None)
    assert [r["status"] for r in failed["requests"]] == ["error", "error"]
    assert "multiple of 16" in failed["requests"][0]["error"] and failed["requests"][0]["latency_s"] > 0
    md = load_test.render_markdown(failed)
    assert "## Errors" in md and "multiple of 16" in md
    load_test.write_outputs(failed, tmp_path, stem="failed")  # a report with no successes still renders
    assert (tmp_path / "failed.png").stat().st_size > 0

    with pytest.raises(load_test.LoadTestError, match="warm-up failed"):
        load_test.run_load_test(comfy.client, bad_size, [1], 1, log=lambda *_: None)

    # A prompt can never finish within 10 ms: both time out, and are taken off the server again.
    slow = load_test.Workflow.from_graph(tiny_graph(width=128, height=128, steps=8))
    timed_out = load_test.run_load_test(comfy.client, slow, [2], 2, warmup=0, timeout_s=0.01, log=lambda *_: None)
    assert [r["status"] for r in timed_out["requests"]] == ["timeout", "timeout"]
    assert "no result within 0.01 s" in timed_out["requests"][1]["error"]
    assert load_test._wait_until_idle(comfy.client, timeout_s=30)


def test_workflow_files_are_checked(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(load_test.LoadTestError, match="Export \\(API\\)"):
        load_test.load_workflow(ui)
    linked = api_prompt()
    linked["3"]["inputs"]["seed"] = ["9", 0]
    with pytest.raises(load_test.LoadTestError, match="seed of sampler node 3 is linked"):
        load_test.Workflow.from_graph(linked)
    no_sampler = {k: v for k, v in api_prompt().items() if k != "3"}
    with pytest.raises(load_test.LoadTestError, match="no ZImageTurboSampler"):
        load_test.Workflow.from_graph(no_sampler)


def test_cli_with_an_api_workflow_file(comfy, tmp_path):
    workflow = tmp_path / "workflow_api.json"
    # bf16 reuses the pipeline the server holds.
    workflow.write_text(json.dumps(api_prompt(width=64, height=48, steps=2, dtype="bf16")))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.load_test", "--port", str(comfy.port), "--workflow", str(workflow),
         "--levels", "1,2", "--requests", "2", "--out", str(out), "--label", "cli test", "--model-note", NOTE],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model files (loader node 1): model={MODEL}, text_encoder={TEXT_ENCODER}, vae={VAE}" in proc.stdout
    assert "| 2 | 2 | 2 | 0 (0%) |" in proc.stdout
    (json_path,) = out.glob("load_*_cpu_cli-test.json")
    assert json_path.with_suffix(".md").is_file() and json_path.with_suffix(".png").is_file()
    data = json.loads(json_path.read_text())
    assert data["workflow"]["source"] == str(workflow) and data["workflow"]["probe_node"] == "4"
    assert data["label"] == "cli test" and data["model_note"] == NOTE
    assert {r["probe"]["width"] for r in data["requests"]} == {64}
    assert [lvl["succeeded"] for lvl in data["levels"]] == [2, 2]


def test_gpu_probe_figures_become_peak_vram(report):
    """What a GPU server's probe sends (torch and NVML figures) turns into peak VRAM, without a GPU here."""
    gib = 2**30
    probe_output = {"device_name": "cuda:0 (NVIDIA H100 80GB HBM3)", "dtype": "bf16", "total_s": 1.0,
                    "torch_memory": {"peak_allocated_bytes": 20 * gib, "peak_reserved_bytes": 24 * gib},
                    "nvml_during": {"available": True, "name": "NVIDIA H100 80GB HBM3", "used_bytes": 26 * gib},
                    "nvml_after": {"available": True, "name": "NVIDIA H100 80GB HBM3", "used_bytes": 25 * gib},
                    "process_rss_bytes": 3 * gib}
    probe = load_test._probe_summary({"outputs": {"3": {"zimage_probe": [probe_output]}}}, "3")
    assert (probe["torch_peak_allocated_bytes"], probe["nvml_used_bytes"]) == (20 * gib, 26 * gib)
    records = [load_test.RequestRecord(1, i, i, f"p{i}", status="success", latency_s=1.0 + i, images=1,
                                       probe={**probe, "torch_peak_allocated_bytes": (20 + i) * gib})
               for i in range(3)]
    summary = load_test.summarize_level(1, records, 3.0, ["2"])
    assert (summary["peak_memory_kind"], summary["peak_memory_bytes"]) == ("torch_peak_allocated", 22 * gib)
    assert summary["images_per_s"] == 1.0 and summary["latency_p50_s"] == 2.0
    gpu = {**report, "device_name": probe["device_name"], "is_cpu": False, "model_note": "", "levels": [summary],
           "requests": [load_test.asdict(r) for r in records]}
    md = load_test.render_markdown(gpu)
    assert "peak VRAM (torch max allocated)" in md and "| 22.00 GiB |" in md
    assert "CPU run" not in md and "no --model-note given" in md
    assert "_nvidia-h100-80gb-hbm3" in load_test.default_stem(gpu)
