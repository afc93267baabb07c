"""Benchmarks with committed results tables under bench/results/ (speed and accuracy claims live here,
not in timed tests)."""
