"""Sampling and acceleration: the pipeline, where weights live, compile, warm-up and its disk cache."""
