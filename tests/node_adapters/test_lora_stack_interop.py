"""The LoRA Stack and Sampler nodes with ComfyUI's common LORA_STACK and trigger words (ComfyUI stood in for)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from devtools import lora_formats
from devtools.model_builder import TINY
from model_names import TEXT_ENCODER, VAE


def nodes(pack):
    return pack.NODE_CLASS_MAPPINGS


def style(pack, name, metadata=None, layout="kohya_split", seed=3):
    path = pack.models / "loras" / name
    lora_formats.build_lora(path, TINY.transformer, layout, seed=seed, metadata=metadata)
    return path


def rows(*items):
    return json.dumps([{"lora": n, "strength": s, "on": on} for n, s, on in items])


def test_the_new_inputs_and_outputs_keep_saved_workflows_working(pack):
    stack, sampler = nodes(pack)["ZImageTurboLoraStack"], nodes(pack)["ZImageTurboSampler"]
    # Outputs are linked by index in saved workflows: the stack's own type stays first.
    assert stack.RETURN_TYPES == ("ZIMAGE_LORA_STACK", "STRING", "LORA_STACK")
    assert stack.RETURN_NAMES == ("lora_stack", "trigger_words", "LORA_STACK")
    spec = sampler.INPUT_TYPES()
    # The required inputs (and so the widgets of saved workflows, in order) are what they were.
    assert list(spec["required"]) == ["pipe", "prompt", "negative_prompt", "width", "height", "steps", "cfg", "shift",
                                      "seed", "batch_size"]
    # The new widget is optional, last, and off by default: a prompt without it runs as before.
    assert list(spec["optional"]) == ["lora_stack", "LORA_STACK", "prepend_trigger_words"]
    assert spec["optional"]["prepend_trigger_words"][0] == "BOOLEAN"
    assert spec["optional"]["prepend_trigger_words"][1]["default"] is False
    for node in (stack, sampler):
        tip = node.INPUT_TYPES()["optional"]["LORA_STACK"][1]["tooltip"]
        assert "clip_strength has no meaning here" in tip and "models/loras" in tip


def test_a_common_lora_stack_goes_in_and_ours_comes_out(pack):
    style(pack, "a.safetensors", {"modelspec.trigger_phrase": "alpha style"})
    (pack.models / "loras" / "sub").mkdir()
    style(pack, "sub/b.safetensors", {"trigger_words": "beta"})
    style(pack, "c.safetensors", {"trigger_words": "gamma"})
    node = nodes(pack)["ZImageTurboLoraStack"]()
    common = [("sub/b.safetensors", 0.6, 0.2), ("None", 1.0, 1.0)]  # "None": those packs' empty slot
    front = node.stack(rows(("a.safetensors", 0.5, True)))[0]
    stack, words, out = node.stack(rows(("c.safetensors", 1.0, True), ("a.safetensors", 1.0, False)),
                                   lora_stack=front, LORA_STACK=common)
    # Order: the chained stack, the LORA_STACK input, this node's rows; clip_strength ignored.
    assert [(s.name, s.strength) for s in stack] == [("a.safetensors", 0.5), ("sub/b.safetensors", 0.6),
                                                     ("c.safetensors", 1.0)]
    assert words == "alpha style, beta, gamma"
    assert out == [("a.safetensors", 0.5, 0.5), ("sub/b.safetensors", 0.6, 0.6), ("c.safetensors", 1.0, 1.0)]
    assert all(isinstance(e, tuple) and len(e) == 3 for e in out)
    # What we emit, another pack (or our own input) reads back unchanged.
    again = node.stack("[]", LORA_STACK=out)
    assert [(s.name, s.strength) for s in again[0]] == [(n, s) for n, s, _ in out] and again[2] == out


@pytest.mark.parametrize("entry,message", [
    (("/etc/passwd", 1.0, 1.0), "/etc/passwd: only files inside ComfyUI's models/loras folders can be used"),
    (("../secrets.safetensors", 1.0, 1.0), "../secrets.safetensors: only files inside ComfyUI's models/loras"),
    (("gone.safetensors", 1.0, 1.0), "gone.safetensors was not found in models/loras"),
    (("a.safetensors", 1.0), "LORA_STACK entry 1 is ('a.safetensors', 1.0): an entry is (lora_name, model_strength, "
                             "clip_strength)"),
    (("a.safetensors", "strong", 1.0), "model_strength must be a number"),
])
def test_bad_common_stack_entries_are_refused_without_server_paths(pack, entry, message):
    style(pack, "a.safetensors")
    for node, call in ((nodes(pack)["ZImageTurboLoraStack"](), lambda n: n.stack("[]", LORA_STACK=[entry])),
                       (nodes(pack)["ZImageTurboSampler"](), lambda n: n.sample(None, "p", "", 32, 32, 1, 0.0, 3.0, 1, 1,
                                                                                LORA_STACK=[entry]))):
        with pytest.raises(Exception) as err:
            call(node)
        assert message in str(err.value)
        assert str(pack.models) not in str(err.value)


def test_a_lora_in_the_common_stack_and_in_the_rows_is_refused(pack):
    style(pack, "a.safetensors")
    with pytest.raises(Exception, match="a.safetensors is switched on twice in the LoRA stack"):
        nodes(pack)["ZImageTurboLoraStack"]().stack(rows(("a.safetensors", 0.4, True)),
                                                    LORA_STACK=[("a.safetensors", 0.8, 0.8)])


def place(pack, tiny):
    shutil.copytree(tiny["built"].diffusers_dir, pack.models / "diffusers" / tiny["built"].diffusers_dir.name)
    (pipe,) = nodes(pack)["ZImageTurboLoader"]().load(f"[diffusers] {tiny['built'].diffusers_dir.name}", TEXT_ENCODER,
                                                      VAE, "fp32", "auto", "resident", "off")
    return pipe


ARGS = dict(negative_prompt="", width=32, height=32, steps=2, cfg=0.0, shift=3.0, seed=5, batch_size=1)


def test_the_sampler_takes_a_common_stack_and_prepends_trigger_words_only_when_asked(pack, tiny):
    pipe = place(pack, tiny)
    style(pack, "trig.safetensors", {"modelspec.trigger_phrase": "zit glow"}, layout="lokr_w2_factored", seed=9)
    sampler = nodes(pack)["ZImageTurboSampler"]()
    ours = nodes(pack)["ZImageTurboLoraStack"]().stack(rows(("trig.safetensors", 0.9, True)))[0]
    common = [("trig.safetensors", 0.9, 0.0)]

    plain = sampler.sample(pipe, "a cat", lora_stack=ours, **ARGS)[0]
    by_common = sampler.sample(pipe, "a cat", LORA_STACK=common, **ARGS)[0]
    assert torch.equal(plain, by_common)  # the same LoRA at the same strength, whichever stack type brought it
    off = sampler.sample(pipe, "a cat", lora_stack=ours, prepend_trigger_words=False, **ARGS)[0]
    assert torch.equal(off, plain)  # the default is off
    on = sampler.sample(pipe, "a cat", lora_stack=ours, prepend_trigger_words=True, **ARGS)[0]
    typed = sampler.sample(pipe, "zit glow, a cat", lora_stack=ours, **ARGS)[0]
    assert torch.equal(on, typed) and not torch.equal(on, plain)
    already = sampler.sample(pipe, "zit glow, a cat", LORA_STACK=common, prepend_trigger_words=True, **ARGS)[0]
    assert torch.equal(already, typed)  # a trigger already in the prompt is not added twice
