# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up first.
PY := .venv/bin/python

.PHONY: setup demo test test-engine test-e2e test-gpu browser clean

setup:
	./scripts/setup.sh

demo: setup
	$(PY) -m scripts.demo

# Every test: engine units, the real ComfyUI server, the real browser. GPU tests skip without CUDA.
# pytest exits 5 when it collects nothing, which fails this target too.
test: setup browser
	$(PY) -m pytest tests --timeout 900

test-engine: setup
	$(PY) -m pytest tests/engine --timeout 600

test-e2e: setup
	$(PY) -m pytest tests/e2e --timeout 900

# On the GPU machine (see bench/README.md): pytest -m gpu
test-gpu:
	$(PY) -m pytest tests -m gpu --timeout 1800

# Debian's Chromium for the browser tests (never a downloaded browser).
browser:
	./scripts/setup_browser.sh

clean:
	rm -rf .build .venv
