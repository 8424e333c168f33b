"""Where the loader's seconds go on a GPU machine: CUDA start-up, reading, copying, renaming, assigning.

    python -m bench.load_profile --root /tmp/zfull [--out DIR]

For the ComfyUI-layout files of bench/build_model.py (read from the page cache, as on a restart), it
times each stage separately, so the first-image work is aimed at a measured cost:
  * CUDA start-up: context, first cuBLAS matmul, first SDPA;
  * the reader alone: bytes read into pinned host buffers by N threads (no device copy), and the full
    host-to-device load (engine reader) with several worker counts and chunk sizes;
  * the loader: each part through load_components (reader + diffusers converter + assign).
Prints a JSON line per section as it goes and writes load_profile.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def _t(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def cuda_startup(device: torch.device) -> dict:
    res = {}
    res["context_s"], _ = _t(lambda: torch.zeros(1, device=device))
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    res["first_matmul_s"], _ = _t(lambda: (a @ a, torch.cuda.synchronize(device)))
    res["second_matmul_s"], _ = _t(lambda: (a @ a, torch.cuda.synchronize(device)))
    q = torch.randn(1, 30, 4160, 128, device=device, dtype=torch.bfloat16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    res["first_sdpa_s"], _ = _t(lambda: (sdpa(q, q, q), torch.cuda.synchronize(device)))
    res["second_sdpa_s"], _ = _t(lambda: (sdpa(q, q, q), torch.cuda.synchronize(device)))
    return {k: round(v, 3) for k, v in res.items()}


def host_read(files: list[Path], threads: int, chunk: int) -> dict:
    """Bytes of the files into pinned buffers, `threads` readers, no device copy: the page-cache ceiling."""
    jobs = []
    for f in files:
        size = f.stat().st_size
        jobs += [(f, off, min(chunk, size - off)) for off in range(0, size, chunk)]
    bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(threads)]
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    lanes = [jobs[i::threads] for i in range(threads)]

    def lane(i):
        view = memoryview(bufs[i].numpy())
        for f, off, n in lanes[i]:
            os.preadv(fds[f], [view[:n]], off)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lane, range(threads)))
    dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    total = sum(n for _, _, n in jobs)
    return {"threads": threads, "chunk_mib": chunk >> 20, "s": round(dt, 3), "gb_per_s": round(total / dt / 1e9, 2)}


def reader_to_device(files: list[Path], device, workers: int, chunk: int) -> dict:
    from zimage_turbo.engine.files import safetensors_io as st

    entries = [e for f in files for e in st.list_tensors(f)]
    old_chunk = st._PinnedPool.CHUNK
    st._PinnedPool.CHUNK = chunk
    st._PINNED._free.clear()
    try:
        dt, out = _t(lambda: st.load_entries(entries, device, torch.bfloat16, workers=workers))
    finally:
        st._PinnedPool.CHUNK = old_chunk
        st._PINNED._free.clear()
    total = sum(e.nbytes for e in entries)
    del out
    torch.cuda.empty_cache()
    return {"workers": workers, "chunk_mib": chunk >> 20, "s": round(dt, 3), "gb_per_s": round(total / dt / 1e9, 2)}


def loader_parts(root: Path, device) -> dict:
    from devtools.graphs import MODEL, TEXT_ENCODER, VAE
    from zimage_turbo.engine.files import model_files as mf

    source = mf.SplitFiles(root / "diffusion_models" / MODEL, root / "text_encoders" / TEXT_ENCODER,
                           root / "vae" / VAE, root / "qwen_tokenizer")
    mf.COMPONENTS.clear()
    torch.cuda.empty_cache()
    dt, comps = _t(lambda: mf.load_components(source, device, torch.bfloat16, te_on_host=False))
    res = {"total_s": round(dt, 3), **{k: round(v, 3) for k, v in comps.fresh_loads.items()}}
    mf.COMPONENTS.clear()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda:0")
    result = {"device": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d")}
    t0 = time.perf_counter()

    def section(name, fn):
        # Printed as it comes: a section that fails or a call cut short still leaves the earlier ones.
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001 - a profile reports what broke and goes on
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({name: result[name]}), flush=True)

    section("cuda_startup", lambda: cuda_startup(device))
    files = sorted(p for sub in ("diffusion_models", "text_encoders", "vae") for p in (args.root / sub).glob("*.safetensors"))
    result["files_gb"] = round(sum(f.stat().st_size for f in files) / 1e9, 2)
    section("loader_parts", lambda: loader_parts(args.root, device))
    section("host_read", lambda: [host_read(files, t, c << 20) for t, c in ((1, 32), (4, 32), (8, 32), (16, 32), (8, 128))])
    section("reader_to_device", lambda: [reader_to_device(files, device, w, c << 20)
                                         for w, c in ((8, 32), (16, 32), (8, 128), (4, 128), (16, 64))])
    section("loader_parts_again", lambda: loader_parts(args.root, device))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "load_profile.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
