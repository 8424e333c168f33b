"""LoRA tensors and adapter slots live on the compute device, wherever the base weights sit at the time.

In low_vram the transformer's blocks stream: between blocks their weights are in host memory. Slots built
"where the weights are" then sat on the CPU while the activations were on the GPU (seen on the GPU machine:
the first LoRA of a low_vram pipeline). On a CPU machine the meta device stands in for "the GPU".
"""

import pytest
import torch

from devtools import model_builder
from devtools.model_builder import TINY
from zimage_turbo.engine.lora import LoraManager, LoraSpec


@pytest.fixture(scope="module")
def transformer(tiny):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel.from_pretrained(str(tiny["built"].diffusers_dir / "transformer")).eval()


def test_adapter_slots_are_built_on_the_compute_device_not_where_the_weights_are(tiny, transformer, tmp_path):
    path = tmp_path / "style.safetensors"
    model_builder.build_random_lora(path, TINY.transformer, "diffusers", rank=4, alpha=2.0, seed=3)
    manager = LoraManager(transformer, device=torch.device("meta"))
    manager.allow_merge = False  # as while the blocks stream (low_vram): the adapter path
    try:
        report = manager.apply([LoraSpec(path, 0.7)])
        assert report.path == "adapters"
        slots = [p for layer in manager.layers for part in (layer.lora_A, layer.lora_B) for p in part.parameters()]
        assert slots and all(p.device.type == "meta" for p in slots)
        assert all(s.device.type == "meta" for layer in manager.layers for s in layer.scaling.values())
        # The base weights were not moved: they stay where the loader (or the streamer) put them.
        assert all(lin.weight.device.type == "cpu" for lin in manager.linears.values())
    finally:
        manager.remove_all()
