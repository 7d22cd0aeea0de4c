"""Benchmarks for docker-mirror (not tests: they measure, they do not assert)."""
