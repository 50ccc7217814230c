"""Benchmark scripts (not shipped): run each as `python benchmarks/<name>.py --help`."""
