"""Z-Image-Turbo engine: loading, LoRA, sampling and probing.

Knows nothing of ComfyUI; the node classes in ``nodes/`` are thin adapters over it.
Only relative imports inside this package, so it works both as ``engine`` (tests,
benchmarks) and as a sub-package of the ComfyUI node pack.
"""
