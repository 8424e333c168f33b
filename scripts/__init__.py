"""Set-up, the demo (`python -m scripts.demo`) and the ComfyUI API client (`scripts.comfy_client`)."""
