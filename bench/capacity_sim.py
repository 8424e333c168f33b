"""Capacity on paper: how many GPUs keep p95 latency under a bound at a request rate, from measured service times.

A queueing simulation, nothing more: requests arrive at random (Poisson) at a given rate, wait in one first-come
first-served queue, and each runs on the first free GPU for a service time drawn from the measured ones (the latency
of single prompts through the front door with one replica, bench/scale_bench.py's JSON: front door, replica, ComfyUI,
the whole image). Ray Serve's least-loaded routing with a small `max_ongoing_requests` behaves close to that one queue.

Before its table is believed, the simulator replays the measured runs themselves: the benchmark's closed loop
(C clients, each sending its next prompt when the last one came back) on 1 and 2 GPUs, and its predicted images/s
and p50/p95 are set beside the measured ones.

    python -m bench.capacity_sim bench/results/<date>-<device>-scale.json --p95 2,5 --rates 10,100,1000
    python -m bench.capacity_sim --service 1.15 --p95 2 --rates 10,100,1000      # a fixed service time, no JSON

Writes <json stem>-capacity.{md,json} beside the input (or --out).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
from pathlib import Path


TRUSTED_ERROR = 0.15  # largest images/s error of the replayed runs for which the capacity table is believed


class CapacityError(ValueError):
    pass


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise CapacityError("no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def sampler(samples: list[float], rng: random.Random):
    """Service times drawn from the measured ones (an empirical distribution)."""
    if not samples or min(samples) <= 0:
        raise CapacityError("service times must be a non-empty list of positive seconds")
    pool = list(samples)
    return lambda: pool[rng.randrange(len(pool))]


def open_loop(rate_per_s: float, servers: int, service, n: int = 20000, warmup: int = 2000,
              rng: random.Random | None = None) -> list[float]:
    """Response times (wait + service) of `n` Poisson arrivals at `rate_per_s` to `servers` GPUs behind one FCFS queue;
    the first `warmup` are dropped (the queue starts empty)."""
    if rate_per_s <= 0 or servers < 1:
        raise CapacityError("the rate must be positive and there must be at least one server")
    rng = rng or random.Random(0)
    free = [0.0] * servers  # when each server is next free (a heap)
    t, out = 0.0, []
    for i in range(n + warmup):
        t += rng.expovariate(rate_per_s)
        start = max(t, heapq.heappop(free))  # FCFS: the earliest free server takes the next arrival
        end = start + service()
        heapq.heappush(free, end)
        if i >= warmup:
            out.append(end - t)
    return out


def closed_loop(clients: int, servers: int, service, n: int = 2000, rng: random.Random | None = None) -> dict:
    """The benchmark's own load: `clients` each send a prompt, wait for it, send the next at once. Returns images/s
    and latency percentiles over `n` completions (after the first `clients` ones)."""
    if clients < 1 or servers < 1:
        raise CapacityError("clients and servers must be at least 1")
    free = [0.0] * servers
    ready = [0.0] * clients  # when each client sends its next prompt (a heap)
    heapq.heapify(ready)
    lat, ends = [], []
    for i in range(n + clients):
        sent = heapq.heappop(ready)
        start = max(sent, heapq.heappop(free))
        end = start + service()
        heapq.heappush(free, end)
        heapq.heappush(ready, end)
        if i >= clients:
            lat.append(end - sent)
            ends.append(end)
    span = max(ends) - min(ends)
    return {"images_per_s": (len(ends) - 1) / span if span > 0 else float("inf"),
            "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95)}


def gpus_needed(rate_per_min: float, p95_bound_s: float, samples: list[float], max_gpus: int = 256,
                seed: int = 0, n: int = 20000) -> dict:
    """The fewest GPUs whose simulated p95 is within the bound at this rate (None if even `max_gpus` are not)."""
    rate = rate_per_min / 60.0
    mean = statistics.fmean(samples)
    if min(samples) > p95_bound_s:
        return {"gpus": None, "why": f"the bound is below the service time itself ({min(samples):.3f} s)"}
    start = max(1, math.floor(rate * mean) + 1)  # fewer GPUs than the load are never stable
    for c in range(start, max_gpus + 1):
        p95 = percentile(open_loop(rate, c, sampler(samples, random.Random(seed)), n=n, rng=random.Random(seed + 1)), 95)
        if p95 <= p95_bound_s:
            return {"gpus": c, "p95_s": p95, "utilisation": rate * mean / c}
    return {"gpus": None, "why": f"more than {max_gpus} GPUs"}


# ------------------------------------------------------------------------------------------ the scale JSON

def service_samples(scale: dict) -> tuple[list[float], str]:
    """Per-image seconds at concurrency 1 with one replica (the whole path: front door, replica, ComfyUI)."""
    for run in scale.get("runs", []):
        if run.get("replicas") == 1:
            for level in run.get("levels", []):
                if level.get("concurrency") == 1:
                    xs = [r["latency_s"] for r in level.get("records", []) if r.get("status") == "success"]
                    if xs:
                        return xs, "Serve, 1 replica, concurrency 1"
    plain = scale.get("plain_comfyui") or {}
    for level in plain.get("levels", []):
        xs = [r["latency_s"] for r in level.get("records", []) if r.get("status") == "success"]
        if xs:
            return xs, "plain ComfyUI, concurrency 1"
    raise CapacityError("the scale JSON has no successful prompt at concurrency 1 (run bench/scale_bench.py first)")


def validate(scale: dict, samples: list[float], seed: int = 0) -> list[dict]:
    """Each measured level (replicas x concurrency) beside the closed-loop simulation of it."""
    rows = []
    for run in scale.get("runs", []):
        for level in run.get("levels", []):
            if not level.get("succeeded"):
                continue
            sim = closed_loop(level["concurrency"], run["replicas"], sampler(samples, random.Random(seed)),
                              rng=random.Random(seed))
            row = {"replicas": run["replicas"], "concurrency": level["concurrency"]}
            for key in ("images_per_s", "p50_s", "p95_s"):
                measured, predicted = level.get(key), sim[key]
                row[key] = {"measured": measured, "simulated": predicted,
                            "error": (predicted - measured) / measured if measured else None}
            rows.append(row)
    return rows


def render(result: dict) -> str:
    lines = [f"# Capacity on paper ({result['source']})", "",
             f"Service times: {result['service']['n']} measured images ({result['service']['from']}): p50 "
             f"{result['service']['p50_s']:.3f} s, p95 {result['service']['p95_s']:.3f} s. One FCFS queue, Poisson "
             "arrivals, the first free GPU takes the next prompt (`bench/capacity_sim.py`).", ""]
    if result["validation"]:
        lines += ["Check against the measured runs (closed loop: C clients, each sends again when answered):", "",
                  "| GPUs | concurrency | images/s measured / simulated | p50 s measured / simulated | "
                  "p95 s measured / simulated |", "|---|---|---|---|---|"]
        for row in result["validation"]:
            cells = [f"{row[k]['measured']:.3f} / {row[k]['simulated']:.3f} ({row[k]['error']:+.0%})"
                     for k in ("images_per_s", "p50_s", "p95_s")]
            lines.append(f"| {row['replicas']} | {row['concurrency']} | " + " | ".join(cells) + " |")
        err = result["max_throughput_error"]
        verdict = ("the simulation describes these runs" if err is not None and err <= TRUSTED_ERROR else
                   "the simulation does NOT describe these runs (the GPUs are not independent servers here, or the "
                   "service times changed with load): do not trust the table below for this machine")
        lines += ["", f"Largest error of images/s: {err:.0%}: {verdict}.", ""]
    bounds = sorted({c['p95_bound_s'] for c in result["capacity"]})
    lines += ["| requests/min | " + " | ".join(f"GPUs for p95 ≤ {b:g} s" for b in bounds) + " |",
              "|---|" + "---|" * len(bounds)]
    for rate in sorted({c["rate_per_min"] for c in result["capacity"]}):
        cells = []
        for b in bounds:
            c = next(x for x in result["capacity"] if x["rate_per_min"] == rate and x["p95_bound_s"] == b)
            cells.append(f"**{c['gpus']}** (p95 {c['p95_s']:.2f} s)" if c["gpus"] else f"- ({c['why']})")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def floats(text: str) -> list[float]:
    try:
        xs = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, not {text!r}") from None
    if not xs or min(xs) <= 0:
        raise argparse.ArgumentTypeError("expected positive numbers")
    return xs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scale", nargs="?", type=Path, help="bench/scale_bench.py's JSON")
    ap.add_argument("--service", type=floats, help="service seconds instead of a JSON (one value, or several)")
    ap.add_argument("--p95", type=floats, default=[2.0, 5.0], help="p95 bounds in seconds (default 2,5)")
    ap.add_argument("--rates", type=floats, default=[10, 100, 1000], help="requests per minute (default 10,100,1000)")
    ap.add_argument("--out", type=Path, help="folder for the .md and .json (default: beside the scale JSON)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if (args.scale is None) == (args.service is None):
        ap.error("give the scale JSON or --service, one of the two")
    try:
        if args.scale is not None:
            scale = json.loads(args.scale.read_text())
            samples, origin = service_samples(scale)
            source = args.scale.name
        else:
            scale, samples, origin, source = {}, args.service, "--service", "--service " + ",".join(map(str, args.service))
        result = {"source": source,
                  "service": {"n": len(samples), "from": origin, "p50_s": percentile(samples, 50),
                              "p95_s": percentile(samples, 95), "mean_s": statistics.fmean(samples)},
                  "validation": validate(scale, samples, args.seed),
                  "capacity": [{"rate_per_min": rate, "p95_bound_s": bound,
                                **gpus_needed(rate, bound, samples, seed=args.seed)}
                               for rate in args.rates for bound in args.p95]}
    except (CapacityError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    errors = [abs(r["images_per_s"]["error"]) for r in result["validation"] if r["images_per_s"]["error"] is not None]
    result["max_throughput_error"] = max(errors) if errors else None
    result["trusted"] = result["max_throughput_error"] is not None and result["max_throughput_error"] <= TRUSTED_ERROR
    text = render(result)
    print(text)
    if args.scale is not None or args.out is not None:
        out = args.out or args.scale.parent
        stem = (args.scale.stem if args.scale is not None else "service") + "-capacity"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(text)
        print(f"wrote {out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
