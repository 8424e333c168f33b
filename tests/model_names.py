"""The file names the test server and the saved workflows share; they live in devtools/graphs.py."""

from devtools.graphs import MODEL, STYLE_LORAS, TEXT_ENCODER, VAE  # noqa: F401
