"""Compiling without making anyone wait: eager images while a background thread compiles, then compiled ones."""

import sys
import threading
import time

import pytest
import torch

from zimage_turbo.engine.sampling import compile_cache
from zimage_turbo.engine.sampling import warmup
from zimage_turbo.engine.files.model_files import DiffusersFolder
from zimage_turbo.engine.lora import LoraSpec
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

CPU = torch.device("cpu")
REQ = GenerationRequest("a lighthouse at dusk, 灯塔", width=64, height=48, seed=5)


class FakePipe:
    """What CompileWarmup needs of a pipeline."""

    def __init__(self):
        self.variant = "base"
        self.saved = 0

    def lora_variant(self):
        return self.variant

    def _save_compiled(self):
        self.saved += 1


def test_state_machine_one_thread_variants_and_failure(monkeypatch):
    calls, gate = [], threading.Event()

    def fake_warm(pipe, everything):
        calls.append(everything)
        gate.wait(5)

    monkeypatch.setattr(warmup, "warm_regions", fake_warm)
    pipe = FakePipe()
    w = warmup.CompileWarmup(pipe)
    assert w.status()["state"] == "pending" and not w.use_compiled("base")
    w.request("base")
    w.request("base")  # idempotent: still one thread, one job
    assert w.status()["state"] == "compiling"
    gate.set()
    assert w.wait(5) and w.use_compiled("base") and calls == [True]
    assert w.status()["state"] == "compiled" and pipe.saved == 1

    # A variant whose LoRA state changed while it traced is not marked ready (it is asked for again).
    gate.clear()
    w.request(("adapters", 1))
    pipe.variant = ("adapters", 2)
    gate.set()
    w.wait(5)
    assert not w.use_compiled(("adapters", 1)) and calls == [True, False]

    def broken(pipe, everything):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(warmup, "warm_regions", broken)
    w.request(("adapters", 2))
    assert not w.wait(5)
    st = w.status()
    assert st["state"] == "failed" and "RuntimeError: no compiler here" in st["error"]
    assert w.use_compiled("base") is False  # nothing compiled is trusted after a failure


def test_failed_background_compile_keeps_serving_eager_images(tiny, fresh_engine, monkeypatch):
    first_done = threading.Event()

    def broken(pipe, everything):
        first_done.wait(30)  # fail after the first image, as a real compile would
        raise RuntimeError("inductor is missing a C compiler")

    monkeypatch.setattr(warmup, "warm_regions", broken)
    src = DiffusersFolder(tiny["built"].diffusers_dir)
    eager = get_pipeline(src, CPU, torch.float32, "resident", "off").generate(REQ)
    assert eager.report.compile_path == "eager (compile off)"
    pipe = get_pipeline(src, CPU, torch.float32, "resident", "background")
    first = pipe.generate(REQ)
    first_done.set()
    assert first.report.compile_path == "eager (compiling in the background)" and not first.report.compiled
    assert pipe.wait_warm(10) is False
    second = pipe.generate(REQ)
    assert "compile failed: RuntimeError: inductor is missing a C compiler" in second.report.compile_path
    assert torch.equal(second.images, eager.images)
    assert pipe.compile_status()["state"] == "failed"


def test_compile_off_says_so(tiny, fresh_engine):
    pipe = get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32, "resident", "off")
    pipe.start_warmup()  # a no-op without compile
    assert pipe.compile_status()["state"] == "off"
    assert pipe.generate(REQ).report.compile_path == "eager (compile off)"


def test_background_compile_then_compiled_images_and_artifacts_on_disk(tiny, fresh_engine, tmp_path, monkeypatch):
    """The real thing on the CPU (inductor's C++ backend): slow, one test for the whole path."""
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "cache"))
    src = DiffusersFolder(tiny["built"].diffusers_dir)
    path, _ = tiny["loras"]["kohya_fused"]
    eager_pipe = get_pipeline(src, CPU, torch.float32, "resident", "off")
    ref = eager_pipe.generate(REQ).images
    ref_lora = eager_pipe.generate(REQ, [LoraSpec(path, 0.7)]).images

    pipe = get_pipeline(src, CPU, torch.float32, "resident", "background")
    interval_before = sys.getswitchinterval()
    t0 = time.perf_counter()
    first = pipe.generate(REQ)
    assert first.report.compile_path == "eager (compiling in the background)"
    assert time.perf_counter() - t0 < 30  # did not wait for the compiler
    assert torch.equal(first.images, ref)  # the eager path is the plain model
    # The first image made no compiled callable (that needs the compiler's modules: on an H100 a cold first image
    # waited 3.8 s for their import); the warm-up thread makes them when it compiles.
    from zimage_turbo.engine.sampling import acceleration as acc

    regions = [m for m in pipe.transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert regions and not any(r._compiled_call_impl.compiled_made() for r in regions)
    # The thread is compiling now, sharing the interpreter finely; an image meanwhile runs eagerly.
    deadline = time.perf_counter() + 5
    while sys.getswitchinterval() > 2 * warmup.SWITCH_INTERVAL_S and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert sys.getswitchinterval() == pytest.approx(warmup.SWITCH_INTERVAL_S)
    meanwhile = pipe.generate(REQ)
    assert meanwhile.report.compile_path == "eager (compiling in the background)"
    assert torch.equal(meanwhile.images, ref)
    assert pipe.wait_warm(900), pipe.compile_status()
    assert sys.getswitchinterval() == pytest.approx(interval_before)  # given back when the thread is done
    done = pipe.generate(REQ)
    assert done.report.compiled and done.report.compile_path == "compiled"
    assert all(r._compiled_call_impl.compiled_made() for r in regions) and acc.is_compiled(pipe.transformer)
    torch.testing.assert_close(done.images, ref, rtol=0, atol=1e-4)
    # A merged LoRA changes no structure: the styled image runs compiled at once, no new variant.
    styled = pipe.generate(REQ, [LoraSpec(path, 0.7)])
    assert styled.report.lora_path == "merged" and styled.report.compile_path == "compiled"
    torch.testing.assert_close(styled.images, ref_lora, rtol=0, atol=1e-4)
    blobs = list((tmp_path / "cache").glob("zimage_turbo_*.bin"))
    assert len(blobs) == 1 and blobs[0].stat().st_size > 10_000
    # Once torch gives up compiling one of our regions (its recompile limit; test_recompile_limit.py makes it
    # happen for real), that region runs eagerly without a word from torch: our probe says it, not "compiled".
    from zimage_turbo.engine.sampling import acceleration

    monkeypatch.setattr(acceleration._limit_watch, "hits", acceleration._limit_watch.hits + 1)
    monkeypatch.setattr(acceleration._limit_watch, "last", "function: 'forward' (transformer_z_image.py:228)")
    after = pipe.generate(REQ).report
    assert after.compile_path.startswith("compiled, but some compiled blocks hit torch's recompile limit")
    assert "transformer_z_image.py" in after.to_text()


def test_compile_cache_ignores_a_damaged_blob(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path))
    name = "zimage_turbo_damaged_test"
    (tmp_path / f"{name}.bin").write_bytes(b"not a cache blob")
    assert compile_cache.load(name) is False
    assert "not used" in caplog.text
    assert compile_cache.load(name) is False  # tried once per process


@pytest.mark.parametrize("mode", ["fast", ""])
def test_unknown_compile_setting_is_refused(tiny, fresh_engine, mode):
    from zimage_turbo.engine.errors import InvalidSettingError

    with pytest.raises(InvalidSettingError, match="compile setting"):
        get_pipeline(DiffusersFolder(tiny["built"].diffusers_dir), CPU, torch.float32, "resident", mode)


def test_a_spoilt_trace_is_tried_again(monkeypatch):
    tries = []

    def flaky(pipe, everything):
        tries.append(everything)
        if len(tries) < 3:
            raise RuntimeError("SpeculationLog diverged at index 10")

    monkeypatch.setattr(warmup, "warm_regions", flaky)
    w = warmup.CompileWarmup(FakePipe())
    w.request("base")
    assert w.wait(5) and w.use_compiled("base") and len(tries) == 3


def test_a_generation_only_queues_the_compile_until_its_image_is_done(monkeypatch):
    started = []
    monkeypatch.setattr(warmup, "warm_regions", lambda pipe, everything: started.append(time.perf_counter()))
    w = warmup.CompileWarmup(FakePipe())
    w.request("base", start=False)
    time.sleep(0.2)
    assert started == [] and w.status()["state"] == "compiling"
    w.start_queued(idle_s=0)
    assert w.wait(5) and len(started) == 1


def test_the_compile_waits_for_a_quiet_moment_but_not_for_ever(monkeypatch):
    started = []
    monkeypatch.setattr(warmup, "warm_regions", lambda pipe, everything: started.append(time.perf_counter()))
    w = warmup.CompileWarmup(FakePipe())
    w.request("base", start=False)
    w.start_queued(idle_s=0.3)  # an image ended
    time.sleep(0.1)
    w.note_generation()  # the next one began before the quiet time was over
    time.sleep(0.4)
    assert started == []
    t_end = time.perf_counter()
    w.start_queued(idle_s=0.3)  # it ended: now nothing comes
    assert w.wait(5) and len(started) == 1 and started[0] - t_end >= 0.3
    # Steady traffic: once MAX_DEFER_S has passed since the first deferral, the next image's end starts it.
    monkeypatch.setattr(warmup, "MAX_DEFER_S", 0.2)
    w2 = warmup.CompileWarmup(FakePipe())
    w2.request("base", start=False)
    w2.start_queued(idle_s=10)
    time.sleep(0.3)
    w2.note_generation()
    w2.start_queued(idle_s=10)
    assert w2.wait(5) and len(started) == 2
