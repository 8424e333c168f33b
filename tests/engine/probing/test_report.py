import json
import types

import numpy as np
import torch

from zimage_turbo.engine.probing import device_stats
from zimage_turbo.engine.files.model_files import DiffusersFolder
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline


def test_report_text_json_and_chart(tiny, fresh_engine):
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), torch.device("cpu"), torch.float32)
    rep = pipe.generate(GenerationRequest("a boat", width=32, height=32, seed=1)).report
    assert set(rep.load_s) == {"transformer", "text_encoder", "vae"} and rep.base_reloaded
    assert len(rep.step_s) == 8 and all(s > 0 for s in rep.step_s)
    phases = rep.phases()
    assert abs(sum(v for _, v in phases[1:]) - rep.total_s) < 0.05  # the phases cover the run
    text = rep.to_text()
    for word in ("load", "LoRA apply", "text encode", "denoise", "VAE decode", "total", "no NVIDIA GPU", "RSS"):
        assert word in text
    data = json.loads(rep.to_json())
    assert data["steps"] == 8 and data["mean_step_s"] == rep.mean_step_s and data["process_rss_bytes"] > 0
    chart = rep.chart()
    assert chart.shape == (320, 640, 3) and chart.dtype == np.float32 and 0 <= chart.min() and chart.max() <= 1
    second = pipe.generate(GenerationRequest("a boat", width=32, height=32, seed=2)).report
    assert second.load_s == {} and not second.base_reloaded and second.embedding_cache_hit


class FakeNVML:
    """Stands in for pynvml on a machine without NVIDIA GPUs: two cards, looked up by UUID only."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self):
        self.cards = {"GPU-aaaa": ("Card A", 10, 80), "GPU-bbbb": ("Card B", 30, 80)}

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return uuid

    def nvmlDeviceGetHandleByIndex(self, i):  # index order differs from CUDA's: must not be used
        raise AssertionError("looked up by index")

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=self.cards[h][1] * 2**30, total=self.cards[h][2] * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=55 if h == "GPU-bbbb" else 5)

    def nvmlDeviceGetName(self, h):
        return self.cards[h][0]

    def nvmlDeviceGetTemperature(self, h, kind):
        return 61


def test_nvml_figures_come_from_the_pipelines_own_card(monkeypatch):
    fake = FakeNVML()
    monkeypatch.setattr(device_stats, "_nvml", lambda: fake)
    props = {1: types.SimpleNamespace(uuid="bbbb", pci_domain_id=0, pci_bus_id=0x41, pci_device_id=0)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props[torch.device(d).index])
    snap = device_stats.nvml_snapshot(torch.device("cuda:1"))
    assert snap == {"available": True, "name": "Card B", "used_bytes": 30 * 2**30, "total_bytes": 80 * 2**30,
                    "utilization_pct": 55, "temperature_c": 61}


def test_no_gpu_is_a_plain_line_not_a_crash(monkeypatch):
    assert device_stats.nvml_snapshot(torch.device("cpu")) == {"available": False, "reason": "no NVIDIA GPU (device is CPU)"}
    monkeypatch.setattr(device_stats, "_nvml", lambda: None)
    snap = device_stats.nvml_snapshot(torch.device("cuda:0"))
    assert snap["available"] is False and "NVML unavailable" in snap["reason"]
