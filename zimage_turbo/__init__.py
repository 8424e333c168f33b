"""Z-Image-Turbo for ComfyUI, the shipped code: engine/ (no ComfyUI inside, public face engine/api.py) and
nodes/ (thin ComfyUI adapters). One package with its own name, so it never shadows ComfyUI's modules."""
