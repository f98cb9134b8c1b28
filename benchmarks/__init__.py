"""Benchmark harness behind the `prodsample` CLI, shipped as prodsample.benchmarks."""
