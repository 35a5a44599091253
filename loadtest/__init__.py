"""Benchmarks and load tests. Each writes its figures to loadtest/results/."""
