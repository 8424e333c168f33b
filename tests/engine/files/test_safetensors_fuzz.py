"""Property tests for engine.safetensors_io against the reference `safetensors` library.

For any bytes at all, our reader must either return exactly what
safetensors.torch.load_file returns for the same file, or raise ModelFileError;
never another exception, never accept a file the reference refuses, and never
ask torch (or the OS) for more bytes than the file holds. Files written by the
reference library must always load, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file as reference_load
from safetensors.torch import save_file

from zimage_turbo.engine.errors import ModelFileError
from zimage_turbo.engine.files.safetensors_io import DTYPES, list_tensors, load_file, read_header, refuse_pickle


def fuzz_settings(n):
    # derandomize: the same examples on every run, so CI is reproducible; no example database on disk.
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------- the property


class _Guard:
    """While active: every torch.empty and os.pread asks for at most `limit` bytes, or the test fails."""

    def __init__(self, limit):
        self.limit = limit
        self.total = 0

    def _empty(self, *size, dtype=None, **kwargs):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        nbytes = math.prod(int(d) for d in shape) * (dtype or torch.get_default_dtype()).itemsize
        assert nbytes <= self.limit, f"torch.empty asked for {nbytes} bytes; the file has {self.limit}"
        self.total += nbytes
        return self._real_empty(*size, dtype=dtype, **kwargs)

    def _pread(self, fd, n, offset):
        assert n <= self.limit, f"os.pread asked for {n} bytes; the file has {self.limit}"
        return self._real_pread(fd, n, offset)

    def __enter__(self):
        self._real_empty, self._real_pread = torch.empty, os.pread
        torch.empty, os.pread = self._empty, self._pread
        return self

    def __exit__(self, *exc):
        torch.empty, os.pread = self._real_empty, self._real_pread


def _reference(path):
    try:
        return reference_load(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # SafetensorError, and pyo3's PanicException (a BaseException) for anything odd
        return None


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def assert_same_tensors(got: dict, expected: dict):
    assert list(got) == list(expected) or set(got) == set(expected)
    for name, want in expected.items():
        have = got[name]
        assert have.dtype == want.dtype, name
        assert have.shape == want.shape, name
        assert torch.equal(_as_bytes(have), _as_bytes(want)), name


def check_file(path) -> dict | None:
    """Run every entry point on `path`; return what we loaded, or None where we refused (with ModelFileError)."""
    size = path.stat().st_size
    expected = _reference(path)
    with _Guard(limit=size) as guard:
        try:
            refuse_pickle(path)
            pickle_refused = False
        except ModelFileError:
            pickle_refused = True
        try:
            header, data_start = read_header(path)
            entries = list_tensors(path)
            got = load_file(path)
        except ModelFileError as exc:
            message = str(exc)
            assert message.startswith(f"{path.name}: "), message
            assert str(path.parent) not in message, message
            return None
    # We accepted it: so must the reference, with the same tensors.
    assert not pickle_refused, "refuse_pickle refused a valid safetensors file"
    assert expected is not None, "accepted a file the safetensors library refuses"
    assert_same_tensors(got, expected)
    assert guard.total <= size - data_start
    assert isinstance(header, dict) and [e.start for e in entries] == sorted(e.start for e in entries)
    return got


def write(path, raw: bytes):
    path.write_bytes(raw)
    return path


def raw_file(header, data=b"", pad=0) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * pad
    return struct.pack("<Q", len(text)) + text + data


# --------------------------------------------------------------------------- a valid base file

_BASE_TENSORS = {
    "weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
    "bias": torch.tensor([1.5, -2.0, 0.0], dtype=torch.bfloat16),
    "index": torch.tensor([[1, -2], [3, 2**40]], dtype=torch.int64),
    "mask": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 3, dtype=torch.float16),
}


@pytest.fixture(scope="module")
def base_file(workdir) -> bytes:
    path = workdir / "base.safetensors"
    save_file(_BASE_TENSORS, str(path), metadata={"format": "pt", "note": "fuzz base"})
    return path.read_bytes()


def test_base_file_loads(workdir, base_file):
    got = check_file(write(workdir / "base_copy.safetensors", base_file))
    assert_same_tensors(got, _BASE_TENSORS)


def test_every_truncation_is_refused(workdir, base_file):
    path = workdir / "cut.safetensors"
    for n in range(len(base_file)):
        assert check_file(write(path, base_file[:n])) is None, n


@fuzz_settings(250)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=4))
def test_bit_flips(workdir, base_file, flips):
    raw = bytearray(base_file)
    for pos, bit in flips:
        raw[pos % len(raw)] ^= 1 << bit
    check_file(write(workdir / "flipped.safetensors", bytes(raw)))


@fuzz_settings(150)
@given(raw=st.binary(max_size=200))
def test_random_bytes(workdir, raw):
    assert check_file(write(workdir / "random.safetensors", raw)) is None


@fuzz_settings(150)
@given(header_len=st.integers(0, 300), body=st.binary(max_size=300))
def test_random_bytes_behind_a_plausible_length(workdir, header_len, body):
    check_file(write(workdir / "random_len.safetensors", struct.pack("<Q", header_len) + body))


# --------------------------------------------------------------------------- lying headers

_DTYPE_NAMES = sorted(DTYPES)
_ODD_DTYPES = ["F4", "F6_E2M3", "F6_E3M2", "U1", "", "f32", "BF16 ", "F8_E4M3FN"]
_BIG = [2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 2**64 + 8, 10**30]
_ints = st.one_of(st.integers(-3, 40), st.sampled_from(_BIG), st.sampled_from([-(2**63), -(2**64)]))
_odd_scalars = st.one_of(
    _ints,
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
)
_odd_values = st.one_of(
    _odd_scalars,
    st.lists(_odd_scalars, max_size=4),
    st.lists(_ints, min_size=2, max_size=2),
    st.dictionaries(st.text(max_size=3), _odd_scalars, max_size=2),
)
_metadata = st.one_of(
    st.none(),
    st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3),
    st.dictionaries(st.text(max_size=8), _odd_values, min_size=1, max_size=2),
    _odd_values,
)


@st.composite
def lying_files(draw) -> bytes:
    """A consistent header for random tensors, then a few lies told about it."""
    header = {}
    pos = 0
    for i in range(draw(st.integers(0, 4))):
        dtype_name = draw(st.sampled_from(_DTYPE_NAMES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = math.prod(shape) * DTYPES[dtype_name].itemsize
        header[f"t{i}"] = {"dtype": dtype_name, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    data = bytearray(draw(st.binary(min_size=pos, max_size=pos)))
    for info in header.values():  # torch bools are 0 or 1
        if info["dtype"] == "BOOL":
            begin, end = info["data_offsets"]
            data[begin:end] = bytes(b & 1 for b in data[begin:end])
    names = list(header)
    for _ in range(draw(st.integers(0, 3))):
        lies = ["dtype", "shape", "dim", "offsets", "offset", "entry", "drop", "extra", "data", "meta"]
        lie = draw(st.sampled_from(lies))
        info = header[draw(st.sampled_from(names))] if names else None
        if lie == "data":
            cut = draw(st.integers(-4, 4))
            data = data[:cut] if cut < 0 else data + bytes(cut)
        elif lie == "meta":
            header["__metadata__"] = draw(_metadata)
        elif not isinstance(info, dict):  # no tensors, or an earlier lie replaced this one's description
            continue
        elif lie == "dtype":
            info["dtype"] = draw(st.one_of(st.sampled_from(_DTYPE_NAMES + _ODD_DTYPES), _odd_values))
        elif lie == "shape":
            info["shape"] = draw(_odd_values)
        elif lie == "dim" and isinstance(info.get("shape"), list):
            info["shape"] = info["shape"] + [draw(_odd_scalars)]
        elif lie == "offsets":
            info["data_offsets"] = draw(_odd_values)
        elif lie == "offset" and isinstance(info.get("data_offsets"), list) and info["data_offsets"]:
            offsets = list(info["data_offsets"])
            offsets[draw(st.integers(0, len(offsets) - 1))] = draw(_ints)
            info["data_offsets"] = offsets
        elif lie == "entry":
            header[draw(st.sampled_from(names))] = draw(_odd_values)
        elif lie == "extra":  # a field the format does not have: ignored, as long as it is JSON
            value = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), _odd_values)  # NaN: not JSON
            info[draw(st.sampled_from(["extra", "dtype ", "offsets"]))] = draw(value)
        elif lie == "drop" and info:
            del info[draw(st.sampled_from(sorted(info)))]
    return raw_file(header, bytes(data), pad=draw(st.integers(0, 7)))


@fuzz_settings(400)
@given(raw=lying_files())
def test_lying_headers(workdir, raw):
    check_file(write(workdir / "lying.safetensors", raw))


# --------------------------------------------------------------------------- valid files always load


@st.composite
def tensor_dicts(draw) -> dict[str, torch.Tensor]:
    out = {}
    names = draw(
        st.lists(
            st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"), min_size=1, max_size=4, unique=True
        )
    )
    for name in names:
        dtype = DTYPES[draw(st.sampled_from(_DTYPE_NAMES))]
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        raw = draw(st.binary(min_size=math.prod(shape) * dtype.itemsize, max_size=math.prod(shape) * dtype.itemsize))
        if dtype is torch.bool:
            raw = bytes(b & 1 for b in raw)
        out[name] = torch.tensor(list(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    return out


@fuzz_settings(200)
@given(
    tensors=tensor_dicts(),
    metadata=st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=3),
    pad=st.integers(0, 300),
)
def test_files_written_by_safetensors_always_load_bit_exact(workdir, tensors, metadata, pad):
    path = workdir / "valid.safetensors"
    save_file(tensors, str(path), metadata={**metadata, "pad": "p" * pad})
    got = check_file(path)
    assert got is not None, "refused a file written by the safetensors library"
    assert_same_tensors(got, tensors)


def test_every_header_length_residue_loads(workdir):
    """The first bytes of a valid file are its header length: every value must be accepted (0x80, 'PK', ...)."""
    tensors = {"w": torch.arange(6, dtype=torch.int16), "x": torch.ones(2, 2, dtype=torch.float16)}
    header = {
        "w": {"dtype": "I16", "shape": [6], "data_offsets": [0, 12]},
        "x": {"dtype": "F16", "shape": [2, 2], "data_offsets": [12, 20]},
    }
    data = b"".join(_as_bytes(t).numpy().tobytes() for t in tensors.values())
    base = len(json.dumps(header).encode())
    path = workdir / "residue.safetensors"
    seen = set()
    for residue in range(256):
        raw = raw_file(header, data, pad=(residue - base) % 256)
        seen.add(raw[0])
        assert_same_tensors(check_file(write(path, raw)), tensors)
    assert seen == set(range(256))
    # And files the library writes itself (it pads headers to a multiple of 8: 32 residues).
    for pad in range(0, 256, 8):
        save_file(tensors, str(path), metadata={"pad": "p" * pad})
        seen.add(path.read_bytes()[0])
        assert_same_tensors(check_file(path), tensors)
