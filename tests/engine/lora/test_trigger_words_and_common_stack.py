"""Trigger words read from real LoRA files (metadata and side files), and ComfyUI's common LORA_STACK rows."""

from __future__ import annotations

import json

import pytest

from devtools import lora_formats
from devtools.model_builder import TINY
from zimage_turbo.engine.errors import InvalidSettingError
from zimage_turbo.engine.lora import (
    LoraSpec,
    common_stack_of,
    common_stack_rows,
    prompt_with_trigger_words,
    read_trigger_words,
    stack_trigger_words,
)


def lora(tmp_path, name, metadata=None):
    path = tmp_path / f"{name}.safetensors"
    lora_formats.build_lora(path, TINY.transformer, "kohya_split", seed=len(name), metadata=metadata)
    return path


KOHYA_TAGS = json.dumps({"10_sks woman": {"sks woman": 12, "smiling": 5, "red dress": 12, "outdoors": 3},
                         "5_sks woman closeup": {"sks woman": 7, "closeup": 7}})
KOHYA_DIRS = json.dumps({"10_sks woman": {"n_repeats": 10, "img_count": 12},
                         "5_sks woman closeup": {"n_repeats": 5, "img_count": 8}})

METADATA_CASES = {
    "modelspec": ({"modelspec.trigger_phrase": "Sugar面部"}, ["Sugar面部"], "modelspec.trigger_phrase"),
    "comma list": ({"trigger_words": "sun zhen ni, 孙珍妮，旗袍"}, ["sun zhen ni", "孙珍妮", "旗袍"], "trigger_words"),
    "json list": ({"trained_words": json.dumps(["niannian style", "soft light", "niannian style"])},
                  ["niannian style", "soft light"], "trained_words"),
    "activation text": ({"activation text": "  pastel   anime  "}, ["pastel anime"], "activation text"),
    # in every caption of its dataset: "sks woman" and "red dress" of 12 images; the closeup set has 8 images,
    # where "sks woman" and "closeup" appear 7 times: not every caption
    "kohya tags": ({"ss_tag_frequency": KOHYA_TAGS, "ss_dataset_dirs": KOHYA_DIRS}, ["sks woman", "red dress"],
                   "ss_tag_frequency (tags in every caption)"),
    "kohya tags without counts": ({"ss_tag_frequency": json.dumps({"1_x": {"zit style": 4, "cat": 2}})}, ["zit style"],
                                  "ss_tag_frequency (tags in every caption)"),
    "kohya folders": ({"ss_dataset_dirs": json.dumps({"20_ohwx man": {"n_repeats": 20, "img_count": 9}}),
                       "ss_tag_frequency": "{}"}, ["ohwx man"], "ss_dataset_dirs (kohya folder names)"),
    "explicit beats kohya": ({"modelspec.trigger_phrase": "zit", "ss_tag_frequency": KOHYA_TAGS}, ["zit"],
                             "modelspec.trigger_phrase"),
    "none": ({"ss_network_dim": "4"}, [], ""),
}


@pytest.mark.parametrize("case", METADATA_CASES)
def test_trigger_words_from_the_files_metadata(tmp_path, case):
    metadata, words, source = METADATA_CASES[case]
    found = read_trigger_words(lora(tmp_path, "style", metadata))
    assert list(found.words) == words and found.source == source


@pytest.mark.parametrize("suffix,content,words", [
    (".json", {"activation text": "chibi, big eyes", "description": "x"}, ["chibi", "big eyes"]),
    (".metadata.json", {"civitai": {"trainedWords": ["lm_style", "ink wash"]}}, ["lm_style", "ink wash"]),
    (".civitai.info", {"trainedWords": ["civ word"], "id": 1}, ["civ word"]),
])
def test_side_files_of_download_tools_win_over_the_files_metadata(tmp_path, suffix, content, words):
    path = lora(tmp_path, "style", {"modelspec.trigger_phrase": "from metadata"})
    (tmp_path / f"style{suffix}").write_text(json.dumps(content), encoding="utf-8")
    found = read_trigger_words(path)
    assert list(found.words) == words and found.source.startswith(f"style{suffix}")


def test_a_broken_side_file_is_passed_over(tmp_path):
    path = lora(tmp_path, "style", {"modelspec.trigger_phrase": "from metadata"})
    (tmp_path / "style.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "style.civitai.info").write_text(json.dumps({"trainedWords": "not a list but a string"}))
    assert list(read_trigger_words(path).words) == ["not a list but a string"]
    (tmp_path / "style.civitai.info").unlink()
    assert list(read_trigger_words(path).words) == ["from metadata"]


def test_stack_trigger_words_in_order_of_the_rows_that_are_on(tmp_path):
    a = lora(tmp_path, "a", {"modelspec.trigger_phrase": "alpha word"})
    b = lora(tmp_path, "b", {"trigger_words": "beta, Alpha Word"})
    c = lora(tmp_path, "c", {"trigger_words": "gamma"})
    d = lora(tmp_path, "d", {"trigger_words": "delta"})
    specs = [LoraSpec(b, 0.5), LoraSpec(a, 1.0), LoraSpec(c, 0.7, enabled=False), LoraSpec(d, 0.0)]
    assert stack_trigger_words(specs) == ["beta", "Alpha Word"]  # c is off, d at strength 0; each word once
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 3)
    assert stack_trigger_words([LoraSpec(broken, 1.0), LoraSpec(a, 1.0)]) == ["alpha word"]


@pytest.mark.parametrize("prompt,words,want", [
    ("a cat", ["sks style"], "sks style, a cat"),
    ("Sugar面部, 微笑", ["Sugar面部", "清透"], "清透, Sugar面部, 微笑"),  # already there: not repeated
    ("portrait of SUN ZHEN NI", ["sun zhen ni"], "portrait of SUN ZHEN NI"),
    ("", ["a", "b"], "a, b"),
    ("a cat", [], "a cat"),
])
def test_prompt_with_trigger_words(prompt, words, want):
    assert prompt_with_trigger_words(prompt, words) == want


def test_common_lora_stack_rows_as_other_packs_make_them():
    value = [("styles/a.safetensors", 0.8, 1.0), ["b.safetensors", -1, 0], ("None", 1.0, 1.0), ("c.safetensors", 0, 0)]
    assert common_stack_rows(value) == [("styles/a.safetensors", 0.8), ("b.safetensors", -1.0), ("c.safetensors", 0.0)]
    assert common_stack_rows(None) == [] and common_stack_rows([]) == []


@pytest.mark.parametrize("value,message", [
    ("a.safetensors", "LORA_STACK must be a list of (lora_name, model_strength, clip_strength) entries, not str"),
    ([("a.safetensors", 1.0)], "LORA_STACK entry 1 is ('a.safetensors', 1.0): an entry is (lora_name, model_strength"),
    ([("a.safetensors", 1, 1), (None, 1, 1)], "LORA_STACK entry 2: the LoRA name must be a file name in models/loras, not None"),
    ([("a.safetensors", "0.8", 1)], "LORA_STACK entry 1 (a.safetensors): model_strength must be a number, not '0.8'"),
    ([("a.safetensors", True, 1)], "model_strength must be a number, not True"),
    ([("a.safetensors", float("nan"), 1)], "LORA_STACK entry 1 (a.safetensors): strength nan is not a finite number"),
    ([("a.safetensors", 25, 1)], "strength 25 is outside -20..20"),
])
def test_malformed_common_stacks_are_refused_naming_the_entry(value, message):
    with pytest.raises(InvalidSettingError) as err:
        common_stack_rows(value)
    assert message in str(err.value)


def test_our_stack_as_a_common_lora_stack(tmp_path):
    specs = [LoraSpec(tmp_path / "a.safetensors", 0.8, True, "styles/a.safetensors"),
             LoraSpec(tmp_path / "b.safetensors", 0.5, False, "b.safetensors"), LoraSpec(tmp_path / "c.safetensors", -1.0)]
    assert common_stack_of(specs) == [("styles/a.safetensors", 0.8, 0.8), ("c.safetensors", -1.0, -1.0)]
