"""Memory and device figures: torch's allocator, NVML for NVIDIA GPUs, RSS on the CPU.

NVML numbers the GPUs in PCI order, torch in CUDA_VISIBLE_DEVICES order: the NVML
handle is looked up by the device's PCI bus id (or UUID), never by index, so a
pipeline pinned to cuda:1 reports cuda:1's card even on multi-GPU machines.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

_nvml_lock = threading.Lock()
_nvml_state = {"tried": False, "ok": False, "error": ""}


def _nvml():
    """The pynvml module, initialised once; None (with the reason kept) where unavailable."""
    with _nvml_lock:
        if not _nvml_state["tried"]:
            _nvml_state["tried"] = True
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_state["ok"] = True
            except Exception as exc:  # no driver, no library, no GPU
                _nvml_state["error"] = f"{type(exc).__name__}: {exc}"
        if not _nvml_state["ok"]:
            return None
        import pynvml

        return pynvml


def _nvml_handle(nvml, device: torch.device):
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        text = text if text.startswith("GPU-") else f"GPU-{text}"
        try:
            return nvml.nvmlDeviceGetHandleByUUID(text)
        except Exception:
            pass
    bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    return nvml.nvmlDeviceGetHandleByPciBusId(bus)


def nvml_snapshot(device: torch.device) -> dict:
    """Used/total memory, utilisation and temperature of the card behind `device`.

    {"available": False, "reason": ...} when there is no NVIDIA GPU or no NVML.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return {"available": False, "reason": "no NVIDIA GPU (device is CPU)"}
    nvml = _nvml()
    if nvml is None:
        return {"available": False, "reason": f"NVML unavailable ({_nvml_state['error']})"}
    try:
        h = _nvml_handle(nvml, device)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        util = nvml.nvmlDeviceGetUtilizationRates(h)
        name = nvml.nvmlDeviceGetName(h)
        return {
            "available": True,
            "name": name.decode() if isinstance(name, bytes) else name,
            "used_bytes": int(mem.used),
            "total_bytes": int(mem.total),
            "utilization_pct": int(util.gpu),
            "temperature_c": int(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
        }
    except Exception as exc:
        return {"available": False, "reason": f"NVML query failed ({type(exc).__name__}: {exc})"}


def torch_memory(device: torch.device) -> dict:
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    return {
        "allocated_bytes": torch.cuda.memory_allocated(device),
        "reserved_bytes": torch.cuda.memory_reserved(device),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
    }


def reset_peak(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def process_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except Exception:
            return 0


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def current_device(device: torch.device):
    """A context in which `device` is torch's current CUDA device (nothing to do for a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
