import json
import os
import pickle
import struct
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

from zimage_turbo.engine.files import safetensors_io
from zimage_turbo.engine.errors import ModelFileError
from zimage_turbo.engine.files.safetensors_io import list_tensors, load_entries, load_file, read_header, refuse_pickle


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
    _, data_start = read_header(path)
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


# --------------------------------------------------------------------------- regressions
# Each test below failed on the reader before it parsed files as safetensors first and
# validated every tensor before allocating.

def _header_len(path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _save_with_header_len(path, tensors, residue, modulus):
    """Write `tensors` with the safetensors library, padding the metadata until header length % modulus == residue."""
    save_file(tensors, str(path), metadata={"pad": ""})
    base = _header_len(path)
    # The library pads the header to a multiple of 8, so every step of 8 pad characters moves it by 8.
    need = (residue - base) % modulus
    for extra in range(need, need + 16):
        save_file(tensors, str(path), metadata={"pad": "x" * extra})
        if _header_len(path) % modulus == residue:
            return path
    raise AssertionError("could not reach the header length")


def _assert_loads_exactly(path, tensors):
    out = load_file(path)
    assert out.keys() == tensors.keys()
    for k, t in tensors.items():
        assert out[k].dtype == t.dtype and torch.equal(out[k], t)


@pytest.mark.parametrize(
    "residue, modulus, first_bytes",
    [(0x80, 256, b"\x80"), (0x4B50, 65536, b"PK")],
    ids=["first-byte-0x80", "first-bytes-PK"],
)
def test_valid_file_whose_length_bytes_look_like_pickle_or_zip_loads(tmp_path, residue, modulus, first_bytes):
    tensors = {"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int32)}
    path = _save_with_header_len(tmp_path / "lookalike.safetensors", tensors, residue, modulus)
    assert path.read_bytes().startswith(first_bytes)
    refuse_pickle(path)  # a valid safetensors file is never refused
    header, _ = read_header(path)
    assert header["__metadata__"]["pad"].startswith("x")
    _assert_loads_exactly(path, tensors)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_torch_save_under_safetensors_name_gets_pickle_message(tmp_path, zip_format):
    path = tmp_path / "disguised.safetensors"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=zip_format)
    for call in (refuse_pickle, read_header, list_tensors, load_file):
        with pytest.raises(ModelFileError, match="pickle/zip checkpoint despite its name.*run arbitrary code"):
            call(path)


def test_plain_pickle_under_safetensors_name_gets_pickle_message(tmp_path):
    path = tmp_path / "disguised.safetensors"
    path.write_bytes(pickle.dumps({"w": [1, 2, 3]}, protocol=4))
    with pytest.raises(ModelFileError, match="pickle/zip checkpoint despite its name"):
        load_file(path)


def test_damaged_safetensors_that_starts_like_a_pickle_is_called_corrupt_not_pickle(tmp_path):
    tensors = {"w": torch.randn(64)}
    path = _save_with_header_len(tmp_path / "damaged.safetensors", tensors, 0x0280, 65536)
    raw = path.read_bytes()
    assert raw[:2] == b"\x80\x02"  # the PROTO opcode of a protocol-2 pickle
    for cut in (20, 8 + _header_len(path) + 10):  # inside the header, inside the data
        path.write_bytes(raw[:cut])
        refuse_pickle(path)
        with pytest.raises(ModelFileError, match="corrupt or truncated") as info:
            load_file(path)
        assert "pickle" not in str(info.value)


def _write_raw(path, header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


class _AllocationRecorder:
    """Patch torch.empty: record every requested byte size, and refuse (loudly) any larger than `limit`."""

    def __init__(self, limit):
        self.limit = limit
        self.sizes = []
        self._real = torch.empty

    def __call__(self, *size, dtype=None, **kwargs):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        n = 1
        for d in shape:
            n *= int(d)
        nbytes = n * (dtype or torch.get_default_dtype()).itemsize
        self.sizes.append(nbytes)
        assert nbytes <= self.limit, f"asked torch for {nbytes} bytes, the file has {self.limit}"
        return self._real(*size, dtype=dtype, **kwargs)

    def __enter__(self):
        self._patch = mock.patch.object(torch, "empty", self)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        return self._patch.__exit__(*exc)


def test_shape_far_larger_than_the_data_is_refused_before_allocating(tmp_path):
    path = _write_raw(
        tmp_path / "liar.safetensors", {"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 8]}}, b"\0" * 8
    )
    expected = r"'w'.*shape \[1099511627776\].*need 4398046511104 bytes.*gives it 8"
    with _AllocationRecorder(limit=path.stat().st_size) as rec, pytest.raises(ModelFileError, match=expected):
        load_file(path)
    assert rec.sizes == []


_OK = {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"w": {**_OK, "shape": [-1]}}, b"\0\0", "invalid shape \\[-1\\]"),
        ({"w": {**_OK, "shape": ["abc"]}}, b"\0\0", "invalid shape \\['abc'\\]"),
        ({"w": {**_OK, "shape": [True, 2]}}, b"\0\0", "invalid shape \\[True, 2\\]"),
        ({"w": {**_OK, "shape": [2.0]}}, b"\0\0", "invalid shape \\[2.0\\]"),
        ({"w": {**_OK, "shape": 2}}, b"\0\0", "invalid shape 2 "),
        ({"w": {**_OK, "shape": {"0": 2}}}, b"\0\0", "invalid shape"),
        ({"w": {**_OK, "shape": [0, 2**62, 2]}}, b"", "impossible shape"),
        ({"w": {**_OK, "dtype": "Q7"}}, b"\0\0", "unknown dtype 'Q7'"),
        ({"w": {**_OK, "dtype": ["U8"]}}, b"\0\0", "unknown dtype \\['U8'\\]"),
        ({"w": {**_OK, "dtype": "F4"}}, b"\0\0", "unsupported dtype F4 .*saved in BF16, F16 or F32"),
        ({"w": {**_OK, "dtype": "F32"}}, b"\0\0", "need 8 bytes but the header gives it 2"),
        ({"w": {**_OK, "data_offsets": [0, 3]}}, b"\0\0", "points outside the file"),
        ({"w": {**_OK, "data_offsets": [-2, 0]}}, b"\0\0", "points outside the file"),
        ({"w": {**_OK, "data_offsets": [2, 0]}}, b"\0\0", "points outside the file"),
        ({"w": {**_OK, "data_offsets": [0, 2, 2]}}, b"\0\0", "invalid data_offsets"),
        ({"w": {**_OK, "data_offsets": [False, 2]}}, b"\0\0", "invalid data_offsets"),
        ({"w": {**_OK, "data_offsets": "0,2"}}, b"\0\0", "invalid data_offsets"),
        ({"w": {"dtype": "U8", "shape": [2]}}, b"\0\0", "'w' has no 'data_offsets'"),
        ({"w": [1, 2]}, b"", "'w' is not described by a JSON object"),
        ({"a": _OK, "b": {**_OK, "data_offsets": [1, 3]}}, b"\0\0\0", "tensors 'a' and 'b' overlap"),
        ({"a": _OK, "b": _OK}, b"\0\0", "tensors 'a' and 'b' overlap"),
        ({"a": _OK, "b": {**_OK, "data_offsets": [3, 5]}}, b"\0" * 5, "bytes 2..3 of the data belong to no tensor"),
        ({"w": _OK}, b"\0\0\0", "holds 1 bytes after its last tensor"),
        ({"__metadata__": {"k": 1}, "w": _OK}, b"\0\0", "__metadata__ must map text to text"),
        ({"__metadata__": ["k", "v"], "w": _OK}, b"\0\0", "__metadata__ must map text to text"),
        ({"__metadata__": {"k": {"x": "y"}}}, b"", "__metadata__ must map text to text"),
        (["w"], b"", "not a JSON object"),
        (b'{"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "w": {}}', b"\0\0", "'w' appears twice"),
        (b'{"\\ud800": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}', b"\0\0", "not valid text"),
        (b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", "nested too deeply"),
        (b'{"w": 1' + b"9" * 5000 + b"}", b"", "invalid JSON"),
        (b'{"w": "\xff\xfe"}', b"", "not UTF-8"),
        (b'{"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2], "x": NaN}}', b"\0\0", "NaN is not JSON"),
        ('{"w": 1}'.encode("utf-16"), b"", "corrupt safetensors header"),
    ],
)
def test_lying_or_malformed_header_is_refused_with_a_helpful_message(tmp_path, header, data, message):
    path = _write_raw(tmp_path / "bad.safetensors", header, data)
    with _AllocationRecorder(limit=path.stat().st_size):
        for call in (read_header, list_tensors, load_file):
            with pytest.raises(ModelFileError, match=message) as info:
                call(path)
            text = str(info.value)
            assert text.startswith("bad.safetensors: ") and str(tmp_path) not in text
            assert "download it again" in text or "saved in BF16" in text


def _count_reads(monkeypatch):
    """Record every byte the reader asks the OS for; fail on any buffered open()."""
    asked = []
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd, n, offset):
        asked.append((offset, n))
        return real_pread(fd, n, offset)

    def preadv(fd, buffers, offset):
        asked.append((offset, sum(len(b) for b in buffers)))
        return real_preadv(fd, buffers, offset)

    def no_open(*args, **kwargs):
        raise AssertionError("the reader must not use buffered open(): it reads ahead")

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "read", lambda *a: no_open())
    monkeypatch.setattr(safetensors_io, "open", no_open, raising=False)
    return asked


def test_text_file_is_refused_after_reading_8_bytes(tmp_path, monkeypatch):
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n" * 500)
    link = tmp_path / "model.safetensors"
    link.symlink_to(text)
    asked = _count_reads(monkeypatch)
    for call in (read_header, list_tensors, load_file, refuse_pickle):
        asked.clear()
        if call is refuse_pickle:
            call(link)  # not a pickle: left to read_header
        else:
            with pytest.raises(ModelFileError, match="not a valid safetensors file .*not a model file") as info:
                call(link)
            assert str(tmp_path) not in str(info.value)
        assert asked == [(0, 8)]


def test_read_header_reads_the_length_then_the_header_only(sample, monkeypatch):
    path, _ = sample
    header_len = _header_len(path)
    asked = _count_reads(monkeypatch)
    read_header(path)
    assert asked == [(0, 8), (8, header_len)]


def test_missing_file_message_has_no_directory(tmp_path):
    with pytest.raises(ModelFileError, match="^nope.safetensors: file not found") as info:
        load_file(tmp_path / "nope.safetensors")
    assert str(tmp_path) not in str(info.value)


@pytest.mark.timeout(20)
def test_directory_and_fifo_are_refused(tmp_path):
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    for path in (folder, fifo):
        with pytest.raises(ModelFileError, match="not a regular file"):
            read_header(path)
        refuse_pickle(path)


def test_read_error_becomes_model_file_error(sample, monkeypatch):
    path, _ = sample

    def failing(*args):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(os, "pread", failing)
    with pytest.raises(ModelFileError, match="^sample.safetensors: the file cannot be read \\(Input/output error\\)") as info:
        read_header(path)
    assert str(path.parent) not in str(info.value)
    monkeypatch.undo()

    entries = list_tensors(path)
    monkeypatch.setattr(os, "preadv", failing)
    with pytest.raises(ModelFileError, match="^sample.safetensors: the file cannot be read"):
        load_entries(entries, "cpu")


def test_file_cut_short_after_listing_names_the_file(sample):
    path, _ = sample
    entries = list_tensors(path)
    path.write_bytes(path.read_bytes()[: entries[-1].start + 1])
    with pytest.raises(ModelFileError, match="^sample.safetensors: unexpected end of file"):
        load_entries(entries, "cpu")


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.complex64, torch.float8_e8m0fnu])
def test_newer_safetensors_dtypes_load_bit_exact(tmp_path, dtype):
    raw = torch.arange(24 * dtype.itemsize, dtype=torch.uint8)
    t = raw.view(dtype).reshape(2, -1)
    path = tmp_path / "newer.safetensors"
    save_file({"t": t}, str(path))
    out = load_file(path)["t"]
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out.reshape(-1).view(torch.uint8), raw)


def test_header_padded_with_whitespace_and_null_metadata_loads(tmp_path):
    header = json.dumps({"__metadata__": None, "w": _OK}).encode() + b"   \n"
    path = _write_raw(tmp_path / "padded.safetensors", header, b"\1\2")
    assert torch.equal(load_file(path)["w"], torch.tensor([1, 2], dtype=torch.uint8))
