"""The Serve application: the replica deployment (one ComfyUI per GPU) behind the front door, and starting it.

    settings = ServeSettings(comfyui="/opt/ComfyUI", replicas=2)
    start(settings)          # ray.init (a local cluster, or address=...), serve.start, serve.run

Every option of the deployments that Serve owns is set here: one GPU per replica (none on a CPU), how many
prompts a replica holds (one running in ComfyUI plus one queued behind it, so the GPU never waits for the next),
health checks every few seconds, graceful shutdown long enough to finish what a draining replica holds, and
autoscaling when asked for.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import ray
from ray import serve

from .front_door import ROUTES, FrontDoor, FrontSettings
from .replica import ComfyReplica, ReplicaSettings

APP_NAME = "zimage_turbo"
REPLICA_DEPLOYMENT = "ComfyReplica"
FRONT_DEPLOYMENT = "FrontDoor"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the zimage_turbo package: shipped to every node by Ray


@dataclass
class ServeSettings:
    comfyui: str
    replicas: int | None = None  # fixed number of replicas; None with autoscale
    autoscale: tuple | None = None  # (min, max) replicas: Serve's autoscaling on ongoing requests
    cpu: bool = False  # replicas without a GPU (tests, a CPU-only try-out)
    base_directory: str | None = None
    output_directory: str | None = None
    work_dir: str = field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "zimage_serve"))
    python: str | None = None
    comfy_args: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    preload: str | None = None
    wait_for_preload: bool = True
    serial_start: bool = True
    route: str = "least_loaded"
    max_ongoing_requests: int = 2
    max_replicas_per_node: int | None = None
    replica_resources: dict = field(default_factory=dict)  # extra Ray resources each replica needs
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 300.0
    start_timeout_s: float = 900.0
    prompt_timeout_s: float = 1800.0
    retry_window_s: float = 600.0
    max_crashes: int = 2
    keep_results: int = 500
    host: str = "127.0.0.1"
    port: int = 8188
    proxy_location: str = "EveryNode"  # Serve's HTTP proxy on every node (HeadOnly: one, e.g. many nodes on one host)

    def __post_init__(self):
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, not {self.route!r}")
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if not (0 <= lo <= hi and hi >= 1):
                raise ValueError(f"autoscale needs 0 <= min <= max and max >= 1, not {lo}..{hi}")
        elif self.replicas is None or self.replicas < 1:
            raise ValueError("give the number of replicas (one per GPU), at least 1, or an autoscale range")
        if self.max_ongoing_requests < 1:
            raise ValueError("max_ongoing_requests must be at least 1")
        if not (Path(self.comfyui) / "main.py").is_file():
            # Checked here for the machine that deploys; other nodes check their own (ZIMAGE_SERVE_COMFYUI).
            raise ValueError(f"no ComfyUI at {self.comfyui} (main.py not found): give the folder that holds main.py")

    def replica_settings(self) -> dict:
        names = {f.name for f in fields(ReplicaSettings)}
        return ReplicaSettings(**{k: v for k, v in asdict(self).items() if k in names}).to_dict()

    def front_settings(self) -> dict:
        names = {f.name for f in fields(FrontSettings)}
        return asdict(FrontSettings(**{k: v for k, v in asdict(self).items() if k in names}))


def runtime_env() -> dict:
    # The package travels to every node through Ray (the replicas import it); ComfyUI and the models must be there.
    # Ray uploads local folders only for a job's runtime_env (ray.init); serve.run gives it to the deployments.
    return {"py_modules": [str(PACKAGE_DIR)], "excludes": ["__pycache__", "*.pyc"]}


def connect(address: str | None = None, **kwargs) -> None:
    """ray.init with this package in the job's runtime_env: a new local cluster, or `address` ('auto', ip:port)."""
    if address:
        kwargs["address"] = address
    else:
        kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("namespace", "zimage_turbo")
    ray.init(runtime_env=runtime_env(), **kwargs)


def build_app(settings: ServeSettings):
    replica_opts = {
        "name": REPLICA_DEPLOYMENT,
        "max_ongoing_requests": settings.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": 0, "num_gpus": 0 if settings.cpu else 1,
                              "resources": dict(settings.replica_resources)},
        "health_check_period_s": settings.health_check_period_s,
        "health_check_timeout_s": settings.health_check_timeout_s,
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_timeout_s,
        "max_constructor_retry_count": 3,
    }
    if settings.max_replicas_per_node:
        replica_opts["max_replicas_per_node"] = settings.max_replicas_per_node
    if settings.autoscale is not None:
        lo, hi = settings.autoscale
        replica_opts["autoscaling_config"] = {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
            # Ongoing prompts per replica that Serve aims for: one running, the next queued behind it.
            "target_ongoing_requests": max(1, settings.max_ongoing_requests - 1),
            "upscale_delay_s": 10, "downscale_delay_s": 300}
    else:
        replica_opts["num_replicas"] = settings.replicas
    replica = serve.deployment(ComfyReplica).options(**replica_opts).bind(settings.replica_settings())
    front = serve.deployment(FrontDoor).options(
        name=FRONT_DEPLOYMENT, num_replicas=1, max_ongoing_requests=100_000,  # each open websocket is a request
        ray_actor_options={"num_cpus": 0})
    return front.bind(replica, settings.front_settings())


def start(settings: ServeSettings, address: str | None = None, blocking: bool = False):
    """Connect to (or start) Ray, start Serve's HTTP proxy on settings.host:port, and run the application."""
    if not ray.is_initialized():
        connect(address)
    elif "py_modules" not in (ray.get_runtime_context().runtime_env or {}):
        raise RuntimeError("Ray was started without this package in its runtime_env: use zimage_turbo.serve.app."
                           "connect() instead of ray.init(), so the replicas on every node can import it")
    serve.start(proxy_location=settings.proxy_location, http_options={"host": settings.host, "port": settings.port})
    return serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=blocking)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def stop() -> None:
    """Shut Serve down: replicas drain (up to graceful_shutdown_timeout_s) and stop their ComfyUI."""
    serve.shutdown()


def environment_summary() -> dict:
    return {"ray": ray.__version__, "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
            "gpus": cluster_gpus(), "pid": os.getpid()}
