"""Benchmarks, the load test and the soak: run them as modules from the repository root, e.g.
`python -m bench.load_test --help` (they import devtools/ and scripts/ as packages)."""
