"""Benchmarks: scripts that write measured figures to bench/results/ (never timed tests)."""
