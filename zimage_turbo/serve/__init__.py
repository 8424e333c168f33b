"""Serving Z-Image-Turbo from many GPUs and machines on Ray Serve (`python -m zimage_turbo.serve --help`).

One replica per GPU, each running its own ComfyUI server with this node pack (the base model preloaded and warm
before the replica reports ready), behind one front door that speaks ComfyUI's API (POST /prompt, GET /history,
GET /view, the /ws websocket) and a simpler POST /zimage_serve/run. Routing, health checks, restarts, autoscaling
and draining are Ray Serve's own; this package only adapts a ComfyUI process to a Serve replica.

Never imported by the node pack (ComfyUI loads `zimage_turbo.nodes` alone), and the only place that imports ray:
  prompts.py        pure helpers: checking a graph's shape, the LoRA-set key, renaming output files, redaction
  comfy_process.py  one ComfyUI server process: start, ready (HTTP answers, preload warm), health, stop
  replica.py        the Serve replica around one ComfyUI process
  front_door.py     the Serve ingress: ComfyUI-compatible routes, retries on another replica, results kept
  app.py            settings and the application graph (what `serve.run` gets)
  __main__.py       the command line
"""
