"""Development tooling, not shipped to ComfyUI: the tiny model the tests, the demo and the benchmarks build."""
