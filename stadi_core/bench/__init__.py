"""Benchmark scripts: they print tables; nothing here is a test."""
