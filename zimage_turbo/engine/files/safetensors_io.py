"""Reading safetensors files: validation, pickle refusal, and loading straight to a device.

The format is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. We parse the header
ourselves so that a corrupt or foreign file fails with a message a user can act
on, and so that tensors can be read in parallel straight into their final place
(pinned staging + async copies on CUDA; no full-size CPU copy of the model).

What a file is gets decided by parsing it as safetensors, never by sniffing its
first bytes: those bytes are the header length, so any value can occur in a
valid file. Only a file that is *not* valid safetensors is looked at again, to
say whether it is a pickle/zip checkpoint in the error message.

Every tensor of the header is checked (dtype, shape, byte range, no overlap, no
unused bytes, as the safetensors format requires) before anything is
allocated, so a lying header can neither make us allocate more than the file
holds nor reach torch with a shape it chokes on. For a bad file the only
exception that comes out is ModelFileError, naming the file by its base name
(these messages reach API clients) and saying what to do.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import ModelFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# The reference implementation's limit; a real header is a few hundred kB at most.
MAX_HEADER_BYTES = 100_000_000

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Safetensors dtypes that map one to one onto a torch dtype of the same element size, where this torch has it.
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("C64", "complex64"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
del _name, _attr
# Real safetensors dtypes we cannot hold one element per torch element (sub-byte) or that this torch lacks.
_KNOWN_UNSUPPORTED = {"F4", "F6_E2M3", "F6_E3M2", "U16", "U32", "U64", "C64", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
_KNOWN_UNSUPPORTED -= DTYPES.keys()

_INT64_MAX = 2**63 - 1
_CORRUPT = "The file is corrupt or truncated: download it again."


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


# ------------------------------------------------------------------ messages


def _show(value, limit: int = 80) -> str:
    """repr() of a name or value from the file, cut short: a hostile header can hold megabyte-long names."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bad(path: Path, problem: str, advice: str = _CORRUPT) -> ModelFileError:
    return ModelFileError(f"{path.name}: {problem}. {advice}")


def _suffix_error(path: Path) -> ModelFileError:
    return ModelFileError(
        f"{path.name}: pickle checkpoints ({path.suffix}) are refused because loading them can run "
        "arbitrary code. Use the .safetensors version of this model (or convert it once with a "
        "trusted tool) and put it in the same folder."
    )


def _disguised_pickle_error(path: Path) -> ModelFileError:
    return ModelFileError(
        f"{path.name}: this file is a pickle/zip checkpoint despite its name; refused because "
        "loading it can run arbitrary code. Use a real .safetensors file (or convert this one once "
        "with a trusted tool)."
    )


def _os_error(path: Path, exc: OSError) -> ModelFileError:
    # exc.strerror only: str(exc) carries the absolute path.
    if exc.errno == errno.ENOENT:
        return ModelFileError(f"{path.name}: file not found. Check the file name and that it is in the model folder.")
    reason = exc.strerror or type(exc).__name__
    return ModelFileError(f"{path.name}: the file cannot be read ({reason}). Check that it exists and is readable.")


def _looks_like_pickle(head: bytes) -> bool:
    """Whether the first bytes of a file that is NOT valid safetensors are those of a pickle or a zip (torch.save)."""
    pickle = len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5  # PROTO opcode, protocol 2+
    return pickle or head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")  # zip signatures


# ------------------------------------------------------------------ low-level reads


def _open(path: Path) -> tuple[int, int]:
    """Open `path` for reading; return (fd, size). Only regular files are accepted."""
    try:
        # O_NONBLOCK: opening a FIFO must not hang; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(f"{path.name}: not a regular file. Select a .safetensors model file.")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _pread_exact(fd: int, n: int, offset: int, path: Path) -> bytes:
    """Exactly `n` bytes at `offset` (unbuffered: nothing past them is read)."""
    parts = []
    done = 0
    while done < n:
        try:
            chunk = os.pread(fd, n - done, offset + done)
        except OSError as exc:
            raise _os_error(path, exc) from None
        if not chunk:
            raise _bad(path, "unexpected end of file (the file changed or was cut short while being read)")
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


# ------------------------------------------------------------------ header parsing and validation


class _DuplicateKey(ValueError):
    pass


class _NotJson(ValueError):
    pass


def _no_constants(name):
    raise _NotJson(f"{name} is not JSON")  # Python's json accepts NaN and Infinity; the format does not


def _object_no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value) -> bool:
    """A str that is valid Unicode text (JSON escapes can smuggle in lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse(path: Path, fd: int, size: int, head: bytes) -> tuple[dict, int, list[TensorEntry]]:
    """Parse and validate the header; `head` is the file's first 8 bytes (fewer for a tiny file)."""
    if len(head) < 8:
        raise _bad(path, f"not a valid safetensors file (only {size} bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len < 2 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        # Decided from 8 bytes alone: a text or foreign file is never read further.
        raise _bad(
            path,
            f"not a valid safetensors file (header length {header_len} for a file of {size} bytes)",
            "The file is corrupt or truncated, or not a model file: download it again.",
        )
    raw = _pread_exact(fd, header_len, 8, path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(path, "corrupt safetensors header (not UTF-8 text)") from None
    try:
        header = json.loads(text, object_pairs_hook=_object_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as exc:
        raise _bad(path, f"corrupt safetensors header (the key {_show(exc.args[0])} appears twice)") from None
    except RecursionError:
        raise _bad(path, "corrupt safetensors header (JSON nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, int() refusing a number with thousands of digits
        if isinstance(exc, json.JSONDecodeError):
            detail = exc.msg
        else:
            detail = str(exc) if isinstance(exc, _NotJson) else "a number with too many digits"
        raise _bad(path, f"corrupt safetensors header (invalid JSON: {detail})") from None
    if not isinstance(header, dict):
        raise _bad(path, "corrupt safetensors header (not a JSON object)")

    # null is accepted as "no metadata", as the reference implementation does.
    metadata = header.get("__metadata__")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(_is_text(k) and _is_text(v) for k, v in metadata.items())
    ):
        raise _bad(path, "corrupt safetensors header (__metadata__ must map text to text)")

    data_start = 8 + header_len
    data_len = size - data_start
    entries = []
    spans = []  # (begin, end, name) relative to data_start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entry, begin, end = _check_tensor(path, name, info, data_start, data_len)
        entries.append(entry)
        spans.append((begin, end, name))

    # The format requires the tensors to tile the data area: no overlap, no unused bytes.
    spans.sort(key=lambda s: (s[0], s[1]))
    pos = 0
    prev = None
    for begin, end, name in spans:
        if begin < pos:
            raise _bad(path, f"tensors {_show(prev)} and {_show(name)} overlap in the file")
        if begin > pos:
            raise _bad(path, f"bytes {pos}..{begin} of the data belong to no tensor (before {_show(name)})")
        pos = end
        prev = name
    if pos != data_len:
        raise _bad(path, f"the file holds {data_len - pos} bytes after its last tensor")
    return header, data_start, entries


def _check_tensor(path: Path, name: str, info, data_start: int, data_len: int) -> tuple[TensorEntry, int, int]:
    where = f"tensor {_show(name)}"
    if not _is_text(name):
        raise _bad(path, f"corrupt safetensors header ({where} has a name that is not valid text)")
    if not isinstance(info, dict):
        raise _bad(path, f"corrupt safetensors header ({where} is not described by a JSON object)")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise _bad(path, f"corrupt safetensors header ({where} has no {field!r})")

    dtype_name = info["dtype"]
    if not isinstance(dtype_name, str) or not (dtype_name in DTYPES or dtype_name in _KNOWN_UNSUPPORTED):
        raise _bad(path, f"{where} has unknown dtype {_show(dtype_name, 40)}")
    if dtype_name in _KNOWN_UNSUPPORTED:
        raise _bad(
            path,
            f"{where} has unsupported dtype {dtype_name} (this loader reads {', '.join(DTYPES)})",
            "Use a version of the file saved in BF16, F16 or F32.",
        )
    dtype = DTYPES[dtype_name]

    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _bad(path, f"{where} has an invalid shape {_show(shape)} (must be a list of non-negative integers)")
    # torch computes strides as products of the dims (a 0 dim counting as 1): they must fit in int64.
    if math.prod(max(d, 1) for d in shape) > _INT64_MAX:
        raise _bad(path, f"{where} has an impossible shape {_show(shape)}")

    offsets = info["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _bad(path, f"{where} has invalid data_offsets {_show(offsets)} (must be two integers)")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _bad(
            path, f"{where} points outside the file (bytes {begin}..{end} of a data area of {data_len} bytes)"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != end - begin:
        raise _bad(
            path,
            f"{where}: its shape {_show(shape)} and dtype {dtype_name} need {nbytes} bytes but the header "
            f"gives it {end - begin}",
        )
    entry = TensorEntry(path, name, dtype, tuple(shape), data_start + begin, data_start + end)
    return entry, begin, end


def _is_disguised_pickle(fd: int, size: int, head: bytes) -> bool:
    """For a file that failed to parse: whether it is a pickle/zip rather than a damaged safetensors file.

    A damaged safetensors file can start like a pickle too (a header length of
    0x280 starts with 0x80 0x02), so one whose length is one the format allows
    and whose header begins with "{" is not called a pickle. That byte is only
    read after such a length: a text file is still never read past 8 bytes.
    """
    if not _looks_like_pickle(head):
        return False
    if len(head) < 8:
        return True
    (header_len,) = struct.unpack("<Q", head)
    if not 2 <= header_len <= MAX_HEADER_BYTES or size <= 8:
        return True
    try:
        return os.pread(fd, 1, 8) != b"{"  # "{" is no pickle opcode, and no zip has it there
    except OSError:
        return True


def _inspect(path) -> tuple[dict, int, list[TensorEntry]]:
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _suffix_error(path)
    fd, size = _open(path)
    try:
        head = _pread_exact(fd, min(8, size), 0, path)
        try:
            return _parse(path, fd, size, head)
        except ModelFileError:
            # Not safetensors: only now may the first bytes say what it is instead.
            if _is_disguised_pickle(fd, size, head):
                raise _disguised_pickle_error(path) from None
            raise
    finally:
        os.close(fd)


# ------------------------------------------------------------------ public API


def refuse_pickle(path: Path) -> None:
    """Raise ModelFileError if `path` is a pickle checkpoint (those can run code when loaded).

    Refuses by suffix, and a file with another name only when it is not valid
    safetensors and starts like a pickle or a zip; a valid safetensors file is
    never refused, whatever its first bytes. Any other problem with the file
    (missing, unreadable, corrupt) is left for read_header / list_tensors to report.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _suffix_error(path)
    try:
        fd, size = _open(path)
    except ModelFileError:
        return
    try:
        try:
            head = _pread_exact(fd, min(8, size), 0, path)
        except ModelFileError:
            return
        if not _looks_like_pickle(head):
            return
        try:
            _parse(path, fd, size, head)
        except ModelFileError:
            if _is_disguised_pickle(fd, size, head):
                raise _disguised_pickle_error(path) from None
    finally:
        os.close(fd)


def read_header(path: Path) -> tuple[dict, int]:
    """Return (header, data_start) of a safetensors file, or raise ModelFileError naming the problem.

    The whole header is validated: on return every tensor's dtype, shape and byte
    range are consistent and inside the file.
    """
    header, data_start, _ = _inspect(path)
    return header, data_start


def list_tensors(path: Path) -> list[TensorEntry]:
    """The tensors of a validated safetensors file, in file order."""
    return read_index(path)[1]


def read_index(path: Path) -> tuple[dict[str, str], list[TensorEntry]]:
    """(header metadata, tensors in file order) of a validated safetensors file, from one parse."""
    header, _, entries = _inspect(path)
    entries.sort(key=lambda e: e.start)
    return dict(header.get("__metadata__") or {}), entries


class _PinnedPool:
    """Process-wide pinned staging buffers, reused by every load (allocating pinned memory is slow)."""

    CHUNK = 32 * 1024 * 1024
    WORKERS = 8

    def __init__(self):
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []

    def take(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
        return torch.empty(self.CHUNK, dtype=torch.uint8, pin_memory=True)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)


_PINNED = _PinnedPool()


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise _os_error(path, exc) from None
        if n <= 0:
            raise _bad(path, "unexpected end of file while reading tensor data (the file changed or was cut short)")
        done += n


def load_entries(
    entries: Iterable[TensorEntry],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    workers: int | None = None,
) -> dict[str, torch.Tensor]:
    """Read tensors into new tensors on `device`, converted to `dtype` (floating tensors only).

    CUDA: each worker reads file pieces into its own pinned buffer and copies them
    asynchronously into the destination on its own stream; conversion happens on the
    device piece by piece, so peak memory is the converted model plus a few chunks.
    CPU: bytes are read straight into the destination tensors.
    """
    device = torch.device(device)
    entries = list(entries)
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        target = dtype if (dtype is not None and e.dtype.is_floating_point and e.dtype.itemsize >= 2) else e.dtype
        out[e.name] = torch.empty(e.shape, dtype=target, device=device)
    if not entries:
        return out

    # Inference mode is per thread: workers must share the caller's (ComfyUI runs nodes inside it).
    inference = torch.is_inference_mode_enabled()
    fds: dict[Path, int] = {}
    try:
        for e in entries:
            if e.path not in fds:
                try:
                    fds[e.path] = os.open(e.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise _os_error(Path(e.path), exc) from None
        if device.type == "cuda":
            _load_cuda(entries, out, fds, device, workers or _PinnedPool.WORKERS, inference)
        else:
            _load_host(entries, out, fds, workers or 4, inference)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def _load_host(entries, out, fds, workers, inference):
    def read_one(e: TensorEntry):
        with torch.inference_mode(inference):
            _read_host(e)

    def _read_host(e: TensorEntry):
        dest = out[e.name]
        if dest.dtype == e.dtype:
            if e.nbytes:
                _pread_into(fds[e.path], memoryview(dest.view(-1).view(torch.uint8).numpy()), e.start, Path(e.path))
        else:
            raw = torch.empty(e.nbytes, dtype=torch.uint8)
            _pread_into(fds[e.path], memoryview(raw.numpy()), e.start, Path(e.path))
            dest.copy_(raw.view(e.dtype).view(e.shape))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(read_one, entries))


def _load_cuda(entries, out, fds, device, workers, inference):
    chunk = _PinnedPool.CHUNK
    pieces = []  # (entry, byte offset inside the tensor, length)
    for e in entries:
        for off in range(0, e.nbytes, chunk):
            pieces.append((e, off, min(chunk, e.nbytes - off)))
    # Big pieces first spreads the work evenly over the workers.
    lanes = [pieces[i::workers] for i in range(workers)]
    errors: list[BaseException] = []

    def run_lane(lane):
        if not lane:
            return
        stream = torch.cuda.Stream(device)
        bufs = [_PINNED.take(), _PINNED.take()]
        events = [None, None]
        try:
            with torch.inference_mode(inference), torch.cuda.stream(stream):
                for i, (e, off, n) in enumerate(lane):
                    slot = i % 2
                    if events[slot] is not None:
                        events[slot].synchronize()  # the buffer's previous copy has finished
                    buf = bufs[slot]
                    _pread_into(fds[e.path], memoryview(buf.numpy())[:n], e.start + off, Path(e.path))
                    dest = out[e.name]
                    if dest.dtype == e.dtype:
                        dest.view(-1).view(torch.uint8)[off : off + n].copy_(buf[:n], non_blocking=True)
                    else:
                        staged = buf[:n].to(device, non_blocking=True).view(e.dtype)
                        first = off // e.dtype.itemsize
                        dest.view(-1)[first : first + staged.numel()].copy_(staged)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    events[slot] = ev
                stream.synchronize()
        except BaseException as exc:  # surfaced below, in the caller's thread
            errors.append(exc)
        finally:
            for ev in events:
                if ev is not None:
                    ev.synchronize()
            for b in bufs:
                _PINNED.give(b)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run_lane, lanes))
    if errors:
        raise errors[0]
    torch.cuda.synchronize(device)


def load_file(
    path: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    select: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Load the tensors of a safetensors file (those `select` accepts) onto `device`; see load_entries."""
    entries = [e for e in list_tensors(path) if select is None or select(e.name)]
    return load_entries(entries, device, dtype)
