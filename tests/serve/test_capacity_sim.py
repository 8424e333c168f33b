"""bench/capacity_sim.py against queueing results known in closed form (seeded, so the same numbers every run)."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from bench import capacity_sim as sim


def test_mm1_matches_its_formulas():
    lam, mu = 0.7, 1.0  # M/M/1: the response time is exponential with rate mu - lam
    rng = random.Random(1)
    times = sim.open_loop(lam, 1, lambda: rng.expovariate(mu), n=200_000, warmup=5000, rng=random.Random(2))
    assert statistics.fmean(times) == pytest.approx(1 / (mu - lam), rel=0.05)
    assert sim.percentile(times, 95) == pytest.approx(math.log(20) / (mu - lam), rel=0.05)


def test_md1_matches_pollaczek_khinchine():
    lam, s = 0.8, 1.0  # M/D/1: mean wait rho * s / (2 (1 - rho))
    times = sim.open_loop(lam, 1, lambda: s, n=200_000, warmup=5000, rng=random.Random(3))
    assert statistics.fmean(times) - s == pytest.approx(lam * s / (2 * (1 - lam * s)), rel=0.05)


def test_mm2_matches_erlang_c():
    lam, mu, c = 1.5, 1.0, 2
    a, rho = lam / mu, lam / (c * mu)
    p_wait = (a ** c / math.factorial(c) / (1 - rho)) / (sum(a ** k / math.factorial(k) for k in range(c))
                                                          + a ** c / math.factorial(c) / (1 - rho))
    rng = random.Random(4)
    times = sim.open_loop(lam, c, lambda: rng.expovariate(mu), n=200_000, warmup=5000, rng=random.Random(5))
    assert statistics.fmean(times) == pytest.approx(1 / mu + p_wait / (c * mu - lam), rel=0.05)


def test_closed_loop_is_the_benchmarks_load():
    # Deterministic service s: one GPU serves 1/s images/s whatever the clients; C clients wait C*s each.
    for clients, servers in ((1, 1), (4, 1), (4, 2), (8, 2), (2, 4)):
        got = sim.closed_loop(clients, servers, lambda: 1.0, n=400)
        assert got["images_per_s"] == pytest.approx(min(clients, servers), rel=0.01)
        assert got["p50_s"] == pytest.approx(max(1.0, clients / servers), rel=0.01)


def test_gpus_needed_follows_the_load_and_the_bound():
    s = [1.0]
    # One 1 s job every 6 s: one GPU is busy a sixth of the time, so about 8 % of jobs wait more than 0.5 s (p95 over
    # 1.5 s) but hardly any waits a whole job (p95 under 2 s).
    assert sim.gpus_needed(10, 2.0, s)["gpus"] == 1
    assert sim.gpus_needed(10, 1.5, s)["gpus"] == 2
    many = sim.gpus_needed(1000, 1.5, s, n=5000)  # 16.7 jobs/s of 1 s: at least 17 GPUs to be stable
    assert 17 <= many["gpus"] <= 22 and many["p95_s"] <= 1.5
    assert sim.gpus_needed(100, 0.5, s)["gpus"] is None  # a bound below the service time itself
    looser = sim.gpus_needed(1000, 5.0, s, n=5000)["gpus"]
    assert 17 <= looser <= many["gpus"]


def test_the_scale_json_is_read_and_replayed(tmp_path):
    rng = random.Random(7)
    recs = [{"status": "success", "latency_s": 1.0 + 0.05 * rng.random()} for _ in range(16)]
    scale = {"runs": [
        {"replicas": 1, "levels": [{"concurrency": 1, "succeeded": 16, "images_per_s": 0.97, "p50_s": 1.03,
                                    "p95_s": 1.05, "records": recs},
                                   {"concurrency": 4, "succeeded": 16, "images_per_s": 0.97, "p50_s": 4.1,
                                    "p95_s": 4.2, "records": []}]},
        {"replicas": 2, "levels": [{"concurrency": 4, "succeeded": 16, "images_per_s": 1.9, "p50_s": 2.1,
                                    "p95_s": 2.2, "records": []}]}]}
    path = tmp_path / "2026-01-01-gpu-scale.json"
    path.write_text(json.dumps(scale))
    assert sim.main([str(path), "--p95", "3", "--rates", "10,100"]) == 0
    out = json.loads((tmp_path / "2026-01-01-gpu-scale-capacity.json").read_text())
    assert out["service"]["n"] == 16 and out["service"]["from"] == "Serve, 1 replica, concurrency 1"
    assert [(r["replicas"], r["concurrency"]) for r in out["validation"]] == [(1, 1), (1, 4), (2, 4)]
    assert out["max_throughput_error"] < 0.1 and out["trusted"] is True  # made-up runs the model predicts
    # Two "GPUs" that served no faster than one (as replicas sharing a CPU do): the check says so.
    scale["runs"][1]["levels"][0]["images_per_s"] = 0.97
    path.write_text(json.dumps(scale))
    assert sim.main([str(path), "--p95", "3", "--rates", "10"]) == 0
    assert json.loads((tmp_path / "2026-01-01-gpu-scale-capacity.json").read_text())["trusted"] is False
    assert "does NOT describe these runs" in (tmp_path / "2026-01-01-gpu-scale-capacity.md").read_text()
    # 100/min of ~1 s jobs is 1.7 GPUs of work: 2 GPUs at least, 3 when waits would pass the bound.
    assert out["capacity"][0]["gpus"] == 1 and out["capacity"][1]["gpus"] in (2, 3)
    assert "| 10 | **1**" in (tmp_path / "2026-01-01-gpu-scale-capacity.md").read_text()


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"runs": []}))
    assert sim.main([str(path)]) == 2
    assert "no successful prompt at concurrency 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sim.main(["--service", "-1"])
    with pytest.raises(sim.CapacityError):
        sim.open_loop(0, 1, lambda: 1.0)
