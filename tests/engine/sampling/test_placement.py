"""The one owner of weight placement: what each memory mode means, on a GPU and on the CPU."""

import pytest
import torch

from zimage_turbo.engine.errors import InvalidSettingError
from zimage_turbo.engine.sampling.placement import MEMORY_MODES, plan_for

CUDA = torch.device("cuda", 0)  # a device object only: nothing here touches a GPU


@pytest.mark.parametrize(
    "memory, te_host, stream_te, stream_tr, merge",
    [
        ("resident", False, False, False, True),
        ("offload_text_encoder", True, True, False, True),
        ("low_vram", True, True, True, False),
    ],
)
def test_each_memory_mode_on_a_gpu(memory, te_host, stream_te, stream_tr, merge):
    plan = plan_for(CUDA, memory)
    assert (plan.text_encoder_loads_to_host, plan.stream_text_encoder, plan.stream_transformer,
            plan.lora_may_merge) == (te_host, stream_te, stream_tr, merge)


@pytest.mark.parametrize("memory", MEMORY_MODES)
def test_on_the_cpu_nothing_streams_and_loras_merge(memory):
    plan = plan_for(torch.device("cpu"), memory)
    assert not (plan.text_encoder_loads_to_host or plan.stream_text_encoder or plan.stream_transformer)
    assert plan.lora_may_merge


def test_an_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(InvalidSettingError, match="resident, offload_text_encoder, low_vram"):
        plan_for(CUDA, "lowvram")
