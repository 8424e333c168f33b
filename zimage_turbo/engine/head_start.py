"""Work done ahead of the first image, on one background thread: heavy imports and CUDA library loading.

What the first image after a start paid for, measured (H100, 2026-11-22, bench/load_profile.py and the API
benchmark's probe): loading the three parts took 9.2 s in a fresh server but 1.5 s the second time in the
same process (the reader itself moves the 20.8 GB in 0.9 s); the difference is one-time work. Naming the
first diffusers model class imports every model class diffusers has (its `models.transformers` package
imports them all: 4.6 s warm, 12.5 s with cold files on a 2-core CPU); transformers' Qwen3 and diffusers'
single-file converters come on top. Then the first text encode took 1.9 s and the first step 2.0 s (0.5 s
each after a restart, when the libraries are in the page cache): cuBLAS and cuDNN load their kernels
lazily, on first use, from libraries of hundreds of MB.

So: the node pack starts the imports once ComfyUI has imported every custom node (not earlier: another
pack importing diffusers at the same moment could fail, see below), and a pipeline that loads on CUDA
starts the library warm-up while its weights are read (reading waits on I/O and releases the GIL; so do most of
the library loads). The loader reads the files beside the model-class import and only then waits for it. One
thread runs the imports, most urgent first (model classes, then the compiler: only for compile "on", whose first
image compiles; by default the first image runs eagerly and the background compile imports the compiler after it,
since beside the first image that import cost it 3.8 s on an H100). The CUDA library warm-up has a thread of its
own: queued behind the import (4.5-6.5 s on an H100 host, bench/import_profile.py) it ran after the weights were
read, beside the first text encode and step, which then paid for the libraries' loading; torch releases the GIL
while a library loads, so beside the import it costs the import almost nothing. The loader waits for the
model-class job instead of importing them itself: diffusers' and transformers' lazy modules are not safe to import from
two threads at once (seen on the GPU machine: "cannot import name 'ZImageTransformer2DModel' from
'diffusers'" while the head-start thread was inside the same import). Each job runs once per process; a job that fails is logged and
left to the code that needs it, which raises where a user sees it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from . import switch_interval

log = logging.getLogger("zimage_turbo")

_LOCK = threading.Lock()
_JOBS: queue.PriorityQueue = queue.PriorityQueue()
_ORDER = {"model_classes": 0, "compiler": 2}  # jobs of the import thread, most urgent first
_count = [0]
_STARTED: set[str] = set()
_DONE: dict[str, threading.Event] = {}
_THREAD: list[threading.Thread] = []
# Seconds each job took (for the benchmark's notes and tests).
TIMINGS: dict[str, float] = {}


def _run() -> None:
    while True:
        _, _, name, job = _JOBS.get()
        # A loader reads the model files beside this job (load_components reads before it waits for the model
        # classes): with the default switch interval each of the reader's returns to Python waits up to 5 ms.
        with switch_interval.short():
            _run_one(name, job)


def _run_one(name: str, job: Callable[[], None]) -> None:
    """Run a job, time it, and set its event whatever happens."""
    t0 = time.perf_counter()
    try:
        job()
    except Exception as exc:  # noqa: BLE001 - the code that needs it raises it where a user sees it
        log.debug("zimage_turbo head start %s failed: %s", name, exc)
    finally:
        TIMINGS[name] = time.perf_counter() - t0
        log.info("zimage_turbo: head start %s done in %.2f s", name, TIMINGS[name])
        _DONE[name].set()


def _submit(name: str, job: Callable[[], None], own_thread: bool = False) -> threading.Event:
    """Run `job` once per process: on the import thread (by _ORDER), or at once on a thread of its own."""
    with _LOCK:
        if name in _STARTED:
            return _DONE[name]
        _STARTED.add(name)
        _DONE[name] = threading.Event()
        if own_thread:
            threading.Thread(target=_run_one, args=(name, job), name=f"zimage-turbo-{name}", daemon=True).start()
            return _DONE[name]
        if not _THREAD:
            t = threading.Thread(target=_run, name="zimage-turbo-head-start", daemon=True)
            _THREAD.append(t)
            t.start()
        _count[0] += 1
        _JOBS.put((_ORDER[name.split(":")[0]], _count[0], name, job))
        return _DONE[name]


def _import_model_classes() -> None:
    # The classes and converters model_files.py names when it loads a part.
    import diffusers.loaders.single_file_utils  # noqa: F401
    from diffusers import AutoencoderKL, ZImageTransformer2DModel  # noqa: F401
    from transformers import Qwen3Config, Qwen3Model  # noqa: F401


def _import_compiler() -> None:
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401


def import_model_classes() -> threading.Event:
    """Start importing diffusers' and transformers' model classes (idempotent); the event is set when done."""
    return _submit("model_classes", _import_model_classes)


def import_compiler() -> threading.Event:
    """Start importing torch's compiler stack (dynamo, inductor: 2-4 s); idempotent."""
    return _submit("compiler", _import_compiler)


def warm_cuda_libraries(device) -> threading.Event:
    """Start running one small call of each library kernel family an image uses on `device` (idempotent).

    bf16 matrix products (cuBLAS/cuBLASLt), the attention kernel (cuDNN / flash SDPA) at the transformer's
    head size, and a convolution (cuDNN, the VAE decoder): each first call loads its library's code. The
    calls are tiny; what they cost is the one-time loading, which otherwise lands in the first image.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        done = threading.Event()
        done.set()
        return done

    def job():
        with torch.inference_mode(), torch.cuda.device(device):
            stream = torch.cuda.Stream(device)  # never waits on, or delays, the loader's copies
            with torch.cuda.stream(stream):
                for dtype in (torch.bfloat16, torch.float16):
                    a = torch.randn(256, 256, device=device, dtype=dtype)
                    (a @ a).float().sum()
                    torch.nn.functional.linear(a, a, a[0])
                    q = torch.randn(1, 4, 256, 128, device=device, dtype=dtype)
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)
                    x = torch.randn(1, 16, 32, 32, device=device, dtype=dtype)
                    w = torch.randn(16, 16, 3, 3, device=device, dtype=dtype)
                    torch.nn.functional.conv2d(x, w, padding=1)
                    torch.nn.functional.group_norm(x, 4)
            stream.synchronize()

    return _submit(f"cuda_libraries:{device}", job, own_thread=True)
