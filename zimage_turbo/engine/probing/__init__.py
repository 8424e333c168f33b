"""Probing: the run report and the device's memory/utilisation figures."""
