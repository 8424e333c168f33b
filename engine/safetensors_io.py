"""Reading safetensors files: validation, pickle refusal, and loading straight to a device.

The format is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. We parse the header
ourselves so that a corrupt or foreign file fails with a message a user can act
on, and so that tensors can be read in parallel straight into their final place
(pinned staging + async copies on CUDA; no full-size CPU copy of the model).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import ModelFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024

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


def refuse_pickle(path: Path) -> None:
    """Raise if `path` is (or looks like) a pickle checkpoint: those can run code when loaded."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFileError(
            f"{path.name}: pickle checkpoints ({path.suffix}) are refused because loading them can run "
            "arbitrary code. Use the .safetensors version of this model (or convert it once with a "
            "trusted tool) and put it in the same folder."
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK" or magic[:1] == b"\x80":
        raise ModelFileError(
            f"{path.name}: this file is a pickle/zip checkpoint despite its name; refused because "
            "loading it can run arbitrary code. Use a real .safetensors file."
        )


def read_header(path: Path) -> tuple[dict, int]:
    """Return (header, data_start) of a safetensors file, or raise ModelFileError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: file not found.")
    refuse_pickle(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ModelFileError(f"{path.name}: not a safetensors file (only {size} bytes).")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len <= 1 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise ModelFileError(
                f"{path.name}: not a valid safetensors file (header length {header_len} for a file of "
                f"{size} bytes). The file is corrupt or truncated: download it again."
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{path.name}: corrupt safetensors header ({exc}). Download it again.") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name}: corrupt safetensors header. Download it again.")
    data_start = 8 + header_len
    data_len = size - data_start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            ok = info["dtype"] in DTYPES and 0 <= begin <= end <= data_len
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelFileError(
                f"{path.name}: tensor {name!r} points outside the file or has an unknown dtype; the file is "
                "corrupt or truncated. Download it again."
            )
    return header, data_start


def list_tensors(path: Path) -> list[TensorEntry]:
    header, data_start = read_header(path)
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        entries.append(
            TensorEntry(Path(path), name, DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin, data_start + end)
        )
    entries.sort(key=lambda e: e.start)
    return entries


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


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ModelFileError("unexpected end of file while reading tensor data (file truncated?)")
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
    for e in entries:
        if e.path not in fds:
            fds[e.path] = os.open(e.path, os.O_RDONLY)
    try:
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
                _pread_into(fds[e.path], memoryview(dest.view(-1).view(torch.uint8).numpy()), e.start)
        else:
            raw = torch.empty(e.nbytes, dtype=torch.uint8)
            _pread_into(fds[e.path], memoryview(raw.numpy()), e.start)
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
                    _pread_into(fds[e.path], memoryview(buf.numpy())[:n], e.start + off)
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
    entries = [e for e in list_tensors(path) if select is None or select(e.name)]
    return load_entries(entries, device, dtype)
