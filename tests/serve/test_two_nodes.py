"""Two Ray nodes on this machine (Ray's own test cluster), one ComfyUI replica on each, one front door.

What a second machine joining with `ray start --address` looks like to Serve: the package reaches the other node
through the job's runtime_env, Serve places one replica per node (max_replicas_per_node=1 here stands for one GPU
per node), and concurrent prompts are served by both nodes with the same pixels whichever node ran them.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from serve_helpers import (COMFY_DIR, PRELOAD, comfy_processes, graph, no_comfy_left, pixels, ray_env_clean, run_many)

ray = pytest.importorskip("ray", reason="ray[serve] is in requirements-dev.txt: run scripts/setup.sh")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from scripts.comfy_client import ComfyClient, free_port  # noqa: E402
from zimage_turbo.serve import app  # noqa: E402

SEEDS = [201, 202, 203, 204]


@pytest.fixture(scope="module")
def two_nodes(serve_base, tmp_path_factory):
    ray_env_clean()
    work = tmp_path_factory.mktemp("serve_two_nodes")
    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        app.connect(address=cluster.address, log_to_driver=False)
        settings = app.ServeSettings(
            comfyui=str(COMFY_DIR), replicas=2, cpu=True, base_directory=str(serve_base), work_dir=str(work),
            preload=PRELOAD, port=port, max_replicas_per_node=1, proxy_location="HeadOnly",  # one port, one host
            health_check_period_s=1.0, start_timeout_s=240)
        t0 = time.monotonic()
        app.start(settings)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, work=str(work), started_s=time.monotonic() - t0)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    no_comfy_left(str(work))


def test_both_nodes_serve_concurrent_prompts_with_the_same_pixels(two_nodes):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    first = run_many(two_nodes.url, [graph(s) for s in SEEDS])
    assert [code for code, _ in first] == [200] * len(SEEDS), [a.get("error") for _, a in first]
    nodes = {a["serve"]["node_id"] for _, a in first}
    assert len(nodes) == 2  # one replica per node, and the least loaded gets the next prompt
    assert len(comfy_processes(two_nodes.work)) == 2
    # Again (a new negative prompt: no cache), the pixels of a seed do not depend on which node ran it.
    second = run_many(two_nodes.url, [graph(s, negative="again") for s in SEEDS])
    for seed, (_, a), (_, b) in zip(SEEDS, first, second):
        assert b["status"] == "success"
        assert np.array_equal(pixels(a), pixels(b)), f"seed {seed}: {a['serve']['node_id']} vs {b['serve']['node_id']}"


def test_a_comfyui_client_works_against_the_cluster(two_nodes):
    client = ComfyClient("127.0.0.1", two_nodes.port)
    res = client.run(graph(SEEDS[0], negative="client"), timeout=300)
    assert res.status == "success"
    (image,) = res.outputs()["5"]["images"]
    assert client.view(image["filename"], image["subfolder"], image["type"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert res.history["zimage_serve"]["node_id"] in {n["NodeID"] for n in ray.nodes()}
