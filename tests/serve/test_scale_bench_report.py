"""bench/scale_bench.py's bookkeeping and report, on made-up levels (the measuring itself runs against the test
cluster in test_local_cluster.py): a GPU run must not be lost to a bug in writing its result."""

from __future__ import annotations

import json

from bench import scale_bench as sb


def level(c: int, ips: float, p50: float, replicas=("r1",), styles=("a", "b")) -> dict:
    records = [{"index": i, "style": styles[i % len(styles)], "status": "success", "latency_s": p50,
                "t_start": float(i), "t_end": i + p50, "replica": replicas[i % len(replicas)], "lora_s": 0.06,
                "total_s": p50 - 0.02, "device_name": "NVIDIA H200", "attempts": 1} for i in range(8)]
    return {"concurrency": c, "requests": 8, "succeeded": 8, "lost": 0, "wall_s": 8 / ips, "images_per_s": ips,
            "p50_s": p50, "p95_s": p50 * 1.1, "records": records, "lora_switches": sb.lora_switches(records)}


def test_the_result_has_the_keys_the_issue_asks_for_and_the_speedup(tmp_path):
    args = sb.build_parser().parse_args(["--tiny", "--out", str(tmp_path)])
    args.replicas, args.levels, args.requests, args.size, args.sections = [1, 2], [1, 2], 8, 64, {"replicas"}
    bench = sb.Bench(args, sb.style_workflows(64), tmp_path, tmp_path, "made up")
    bench.r["plain_comfyui"] = {"ready_s": 30.0, **sb.summary(level(1, 0.87, 1.150)), "levels": [level(1, 0.87, 1.150)]}
    one = [level(1, 0.85, 1.170), level(2, 0.87, 2.3)]
    two = [level(1, 0.85, 1.172, ("r1", "r2")), level(2, 1.70, 1.175, ("r1", "r2"))]
    bench.r["runs"] = [{"replicas": n, "route": "least_loaded", **sb.summary_of_levels(lv), "levels": lv}
                       for n, lv in ((1, one), (2, two))]
    paths = bench.write()
    r = json.loads(paths["json"].read_text())
    assert paths["json"].name.endswith("-cpu-tiny-scale.json")
    assert r["replicas"] == [1, 2] and r["lost"] == 0
    assert r["runs"][1]["images_per_s"] == {"1": 0.85, "2": 1.70}
    assert set(r["runs"][1]) >= {"replicas", "images_per_s", "p50_s", "p95_s", "lost", "speedup_vs_one"}
    assert r["speedup_vs_one"]["2"] == 1.70 / 0.87
    assert abs(r["p50_c1_vs_plain_ms"] - 20.0) < 1e-6
    assert r["targets"]["speedup_two_gpus"]["met"] is True and r["targets"]["p50_c1_vs_plain_ms"]["met"] is True
    md = paths["md"].read_text()
    assert "| 2 | 2 | 1.700 | 1.175 |" in md and "best **1.95x**" in md and "**+20 ms**" in md


def test_switches_are_counted_per_replica_in_time_order():
    recs = [{"status": "success", "style": s, "replica": rep, "t_start": t, "lora_s": 0.1}
            for t, (rep, s) in enumerate([("r1", "a"), ("r2", "a"), ("r1", "b"), ("r2", "a"), ("r1", "b")])]
    assert sb.lora_switches(recs) == {"switches": 1, "prompts": 5, "lora_apply_p50_s_on_switch": 0.1}


def test_requests_get_their_own_seed_and_prompt():
    styles = sb.style_workflows(64)
    reqs = sb.requests_for(styles, 6, 100, "t")
    assert [name for name, _ in reqs[:len(styles)]] == [name for name, _ in styles]  # each style in turn
    seeds = [n["inputs"]["seed"] for _, g in reqs for n in g.values() if n["class_type"] == sb.SAMPLER]
    assert seeds == list(range(100, 106))
    random_mix = [name for name, _ in sb.requests_for(styles, 12, 0, "t", order="random", rng_seed=4)]
    assert random_mix == [name for name, _ in sb.requests_for(styles, 12, 0, "u", order="random", rng_seed=4)]
    assert len(set(random_mix)) > 1
    assert sb.parse_ints("1+2+4") == [1, 2, 4] == sb.parse_ints("1,2,4")
