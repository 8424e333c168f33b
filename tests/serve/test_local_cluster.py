"""A local Ray cluster with two ComfyUI replicas behind the front door, on the CPU with the tiny model.

One cluster for the module (starting Ray and two ComfyUIs is most of the time): concurrent prompts land on both
replicas, ComfyUI's own clients work unchanged, an invalid prompt comes back as ComfyUI's error and harms no replica,
a ComfyUI killed under a prompt loses nothing (the prompt runs again elsewhere and gives the same pixels), and
stopping the application drains the replicas (what they hold finishes first).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from serve_helpers import (COMFY_DIR, PRELOAD, comfy_processes, graph, http, no_comfy_left, pixels, ray_env_clean, run,
                      run_many, running_prompt, wait_for)

ray = pytest.importorskip("ray", reason="ray[serve] is in requirements-dev.txt: run scripts/setup.sh")
from ray import serve  # noqa: E402

from scripts.comfy_client import ComfyClient, free_port  # noqa: E402
from zimage_turbo.serve import app  # noqa: E402

SEEDS = [101, 102, 103, 104, 105, 106]


@pytest.fixture(scope="module")
def cluster(serve_base, tmp_path_factory):
    ray_env_clean()
    work = tmp_path_factory.mktemp("serve_work")
    port = free_port()
    settings = app.ServeSettings(
        comfyui=str(COMFY_DIR), replicas=2, cpu=True, base_directory=str(serve_base), work_dir=str(work),
        preload=PRELOAD, port=port, health_check_period_s=1.0, retry_window_s=180, graceful_shutdown_timeout_s=120,
        start_timeout_s=240)
    app.connect(num_cpus=2, log_to_driver=False)
    try:
        t0 = time.monotonic()
        app.start(settings)
        started_s = time.monotonic() - t0
        url = f"http://127.0.0.1:{port}"
        # The reference images: each seed alone, no faults. Later passes must give the very same pixels.
        answers = run_many(url, [graph(s) for s in SEEDS])
        yield SimpleNamespace(url=url, port=port, settings=settings, work=str(work), base=serve_base,
                              first=answers, started_s=started_s,
                              reference={s: pixels(a) for s, (code, a) in zip(SEEDS, answers) if code == 200})
    finally:
        serve.shutdown()
        ray.shutdown()
    no_comfy_left(str(work))  # the replicas stopped their ComfyUI (a leftover would keep its GPU)


def test_concurrent_prompts_are_served_by_both_replicas(cluster):
    assert [code for code, _ in cluster.first] == [200] * len(SEEDS), cluster.first
    served_by = {a["serve"]["replica"] for _, a in cluster.first}
    assert len(served_by) == 2  # least loaded of two: six concurrent prompts cannot all go to one
    for _, a in cluster.first:
        assert a["status"] == "success" and a["error"] is None
        assert pixels(a).shape == (64, 64, 3) and pixels(a).std() > 1
        (probe,) = a["probe"].values()  # the probe's report comes back with the image
        assert probe["width"] == 64 and probe["steps"] == 8 and probe["device"] == "cpu"
        assert probe["base_reloaded"] is False  # preloaded before the replica said it was ready
    # Different seeds, different images; and the files of both replicas kept apart behind one /view.
    assert not np.array_equal(cluster.reference[101], cluster.reference[102])
    names = [(i["subfolder"], i["filename"]) for _, a in cluster.first for i in a["images"]]
    assert len(set(names)) == len(names)


def test_comfyui_clients_work_against_the_front_door(cluster):
    client = ComfyClient("127.0.0.1", cluster.port)
    assert client.alive()
    assert "ZImageTurboSampler" in client.object_info()
    stats = client.get("/system_stats")[1]
    assert stats["system"]["comfyui_version"] and "argv" not in stats["system"]  # no server paths
    # comfy_client: POST /prompt, the websocket until execution_success, GET /history, GET /view.
    res = client.run(graph(101, negative="client"), timeout=300)
    assert res.status == "success"
    assert [m["data"]["value"] for m in res.messages if m["type"] == "progress"] == list(range(1, 9))
    (image,) = res.outputs()["5"]["images"]
    got = np.asarray(Image.open(io.BytesIO(client.view(image["filename"], image["subfolder"], image["type"]))))
    assert np.array_equal(got[..., :3], cluster.reference[101])
    assert client.history(res.prompt_id)["status"]["status_str"] == "success"
    assert client.get("/queue")[1] == {"queue_running": [], "queue_pending": []}

    # The load test (bench/load_test.py) unchanged.
    from bench import load_test

    report = load_test.run_load_test(client, load_test.Workflow.from_graph(graph(0)), [2], 2, warmup=0,
                                     log=lambda *_: None)
    assert [lv["succeeded"] for lv in report["levels"]] == [2]

    # The scale benchmark's own client (bench/scale_bench.py), with the saved style workflows, asking for LoRA affinity.
    from bench import scale_bench

    styles = scale_bench.style_workflows(64)
    level = scale_bench.run_requests(scale_bench.RoutedClient(client, "lora"),
                                     scale_bench.requests_for(styles, 2, 500, "test"), 2)
    assert level["succeeded"] == 2 and level["lost"] == 0 and level["images_per_s"] > 0
    assert all(r["replica"] and r["lora_s"] is not None for r in level["records"])

    # comfy-cli's `comfy run`, as the README shows it.
    wf = os.path.join(cluster.work, "api_workflow.json")
    with open(wf, "w") as f:
        json.dump(graph(7), f)
    comfy = os.path.join(os.path.dirname(sys.executable), "comfy")
    out = subprocess.run([comfy, "--skip-prompt", "run", "--workflow", wf, "--wait", "--host", "127.0.0.1",
                          "--port", str(cluster.port), "--timeout", "300"], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    envelope = json.loads(out.stdout.strip().splitlines()[-1])
    assert envelope["ok"] is True and envelope["data"]["status"] == "completed"
    (view_url,) = envelope["data"]["outputs"]
    assert http("GET", view_url)[0] == 200


def test_an_invalid_prompt_returns_its_error_and_no_replica_is_harmed(cluster):
    before = comfy_processes(cluster.work)
    bad = graph(11, loras=[{"lora": "not_there.safetensors", "strength": 1.0, "on": True}])
    code, body = http("POST", f"{cluster.url}/prompt", {"prompt": bad, "client_id": "invalid-test"})
    assert code == 400
    assert "not_there.safetensors was not found in models/loras" in json.dumps(body["node_errors"]["2"])
    assert str(cluster.base) not in json.dumps(body) and "/tmp/" not in json.dumps(body)
    code, body = run(cluster.url, bad)  # the same through the simple route
    assert code == 400 and "not_there.safetensors" in json.dumps(body)
    # Not a workflow at all: the front door's own error, in ComfyUI's form.
    code, body = http("POST", f"{cluster.url}/prompt", {"prompt": {"1": {"inputs": {}}}})
    assert code == 400 and body["error"]["message"] == "node '1' has no class_type"
    code, body = http("POST", f"{cluster.url}/prompt", b"{not json")
    assert code == 400 and body["error"]["message"] == "the request body is not JSON"
    code, body = http("POST", f"{cluster.url}/prompt", {"client_id": "x"})
    assert code == 400 and body["error"]["type"] == "no_prompt"
    # An execution error (a size that is not a multiple of 16) is the prompt's own error too.
    code, body = run(cluster.url, graph(12, size=72))
    assert code == 422 and body["status"] == "error" and "multiple of 16" in body["error"]["exception_message"]
    # Every replica goes on serving, none was restarted.
    code, body = run(cluster.url, graph(13))
    assert code == 200 and body["status"] == "success"
    assert comfy_processes(cluster.work) == before
    status = serve.status().applications[app.APP_NAME]
    assert status.status == "RUNNING"
    assert status.deployments[app.REPLICA_DEPLOYMENT].replica_states == {"RUNNING": 2}


def test_a_comfyui_killed_mid_prompt_loses_nothing(cluster):
    before = comfy_processes(cluster.work)
    assert len(before) == 2
    counts_before = http("GET", f"{cluster.url}/zimage_serve/status")[1]["counts"]
    # The same prompts as the references, with a new negative prompt: ComfyUI must really run them (no cache), and
    # the pixels must not change.
    results: list = []
    thread = threading.Thread(target=lambda: results.extend(run_many(cluster.url, [graph(s, negative="second pass")
                                                                                  for s in SEEDS])))
    thread.start()
    victim = wait_for(lambda: next((pid for pid, port in before.items() if running_prompt(port)), None), 120,
                      "a ComfyUI running a prompt", every=0.05)
    os.kill(victim, signal.SIGKILL)
    thread.join(300)
    assert not thread.is_alive()
    assert [code for code, _ in results] == [200] * len(SEEDS), [a.get("error") for _, a in results]
    for seed, (_, answer) in zip(SEEDS, results):
        assert answer["status"] == "success"
        assert np.array_equal(pixels(answer), cluster.reference[seed]), f"seed {seed}: other pixels after the retry"
    assert max(a["serve"]["attempts"] for _, a in results) >= 2  # at least one prompt ran again elsewhere
    counts = http("GET", f"{cluster.url}/zimage_serve/status")[1]["counts"]
    assert counts.get("lost", 0) == counts_before.get("lost", 0) and counts["retries"] > counts_before.get("retries", 0)
    # Serve noticed (health check) and replaced the replica: two ComfyUIs again, one of them new.
    def replaced():
        now = comfy_processes(cluster.work)
        return now if len(now) == 2 and victim not in now else None

    now = wait_for(replaced, 180, "Serve to replace the replica")
    assert len(set(now) & set(before)) == 1
    wait_for(lambda: serve.status().applications[app.APP_NAME].deployments[app.REPLICA_DEPLOYMENT]
             .replica_states == {"RUNNING": 2}, 120, "two running replicas")
    code, body = run(cluster.url, graph(SEEDS[0], negative="after the restart"))
    assert code == 200 and np.array_equal(pixels(body), cluster.reference[SEEDS[0]])


def test_stopping_the_application_drains_what_the_replicas_hold(cluster):
    """Serve stops a replica (scale-down, redeploy, shutdown) only once the prompts it holds have finished: each
    replica is given two prompts, the application is deleted while they run, and both come back whole."""
    handle = serve.get_deployment_handle(app.REPLICA_DEPLOYMENT, app.APP_NAME)
    marker = cluster.work
    before = comfy_processes(marker)

    async def one(seed):
        events = [ev async for ev in handle.options(stream=True).run.remote(
            {"prompt_id": f"drain-{seed}", "graph": graph(seed, negative="drain"), "extra_data": {}, "lora_key": ""})]
        return events

    async def main():
        tasks = [asyncio.ensure_future(one(s)) for s in SEEDS[:4]]
        await asyncio.get_running_loop().run_in_executor(
            None, wait_for, lambda: any(running_prompt(p) for p in before.values()), 120, "a prompt running", 0.05)
        deleting = asyncio.get_running_loop().run_in_executor(None, serve.delete, app.APP_NAME)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await deleting
        return results

    # On a thread of its own: in the full suite the browser tests' Playwright keeps an event loop running on the
    # main thread, where asyncio.run() refuses to start another.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        results = pool.submit(asyncio.run, main()).result()
    for seed, events in zip(SEEDS, results):
        assert not isinstance(events, BaseException), f"seed {seed}: {events!r}"
        final = events[-1]
        assert final["event"] == "result" and final["history"]["status"]["status_str"] == "success"
        (f,) = final["files"]
        got = np.asarray(Image.open(io.BytesIO(f["data"])).convert("RGB"))
        assert np.array_equal(got, cluster.reference[seed])
    no_comfy_left(marker)  # and once drained, each replica stopped its ComfyUI
