import struct

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import ModelFileError
from engine.safetensors_io import list_tensors, load_file, read_header, refuse_pickle


@pytest.fixture()
def sample(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(12, dtype=torch.int64).reshape(3, 4), "c": torch.randn(7).bfloat16()}
    path = tmp_path / "sample.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_reads_tensors_exactly(sample):
    path, tensors = sample
    out = load_file(path)
    assert out.keys() == tensors.keys()
    for k in tensors:
        assert out[k].dtype == tensors[k].dtype and torch.equal(out[k], tensors[k])


def test_converts_floating_tensors_only(sample):
    path, tensors = sample
    out = load_file(path, dtype=torch.float16)
    assert out["a"].dtype == torch.float16 and torch.equal(out["a"], tensors["a"].half())
    assert out["c"].dtype == torch.float16 and torch.equal(out["c"], tensors["c"].half())
    assert out["b"].dtype == torch.int64 and torch.equal(out["b"], tensors["b"])


def test_select_reads_only_chosen(sample):
    path, _ = sample
    assert set(load_file(path, select=lambda n: n != "b")) == {"a", "c"}


def test_entries_are_in_file_order_with_absolute_offsets(sample):
    path, tensors = sample
    entries = list_tensors(path)
    assert [e.start for e in entries] == sorted(e.start for e in entries)
    header, data_start = read_header(path)
    assert all(e.start >= data_start for e in entries)
    assert {e.name: e.shape for e in entries} == {k: tuple(v.shape) for k, v in tensors.items()}


def test_truncated_file_is_reported_as_corrupt(sample, tmp_path):
    path, _ = sample
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        read_header(bad)


def test_garbage_file_is_reported(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**12) + b"not json")
    with pytest.raises(ModelFileError, match="not a valid safetensors"):
        read_header(bad)
    bad.write_bytes(struct.pack("<Q", 8) + b"{notjson")
    with pytest.raises(ModelFileError, match="corrupt safetensors header"):
        read_header(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        read_header(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl"])
def test_pickle_checkpoints_are_refused_by_name(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ModelFileError, match="pickle checkpoints .* are refused"):
        read_header(path)


def test_pickle_disguised_as_safetensors_is_refused(tmp_path):
    path = tmp_path / "disguised.safetensors"
    torch.save({"w": torch.zeros(2)}, path)  # a zip/pickle archive
    with pytest.raises(ModelFileError, match="pickle/zip checkpoint despite its name"):
        refuse_pickle(path)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_loads_inside_inference_mode(sample, dtype):
    """ComfyUI runs nodes under inference mode; the reader threads must follow it."""
    path, tensors = sample
    with torch.inference_mode():
        out = load_file(path, dtype=dtype)
    assert torch.equal(out["a"].float(), tensors["a"].to(dtype or torch.float32).float())
