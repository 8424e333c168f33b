"""The graph the end-to-end tests queue: devtools.graphs.api_graph with small, CPU-friendly defaults."""

from devtools.graphs import MODEL, api_graph  # noqa: F401  (MODEL: for the tests that name the file)

E2E_DEFAULTS = {"seed": 1, "width": 64, "height": 48, "prompt": "a cat in a garden, 一只猫", "dtype": "fp32",
                "prefix": "e2e"}


def api_prompt(**settings) -> dict:
    """Loader -> LoRA stack -> Sampler -> Probe -> SaveImage, in ComfyUI's API format."""
    return api_graph(**{**E2E_DEFAULTS, **settings})
